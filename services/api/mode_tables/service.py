"""Creating mode tables: shape checked by the schema, then the safety envelope here."""

from typing import Any

from services.api.mode_tables.repository import ModeTableRepository
from services.api.mode_tables.schemas import ModeTable, ModeTableCreate
from services.api.models import ModeTableRow
from services.api.problems import ProblemError
from services.common.mode_tables import envelope_problems


def outside_envelope(problems: list[Any]) -> ProblemError:
    """The 422 for envelope violations: each names its field, the limit and the value."""
    listed = "; ".join(f"{p.path}: {p.message}" for p in problems)
    return ProblemError(
        422,
        "outside-envelope",
        "Outside the safety envelope",
        f"the table leaves the safety envelope: {listed}",
        errors=[
            {"field": p.path, "limit": p.limit, "value": p.value, "message": p.message}
            for p in problems
        ],
    )


def body_of(table: ModeTableCreate) -> dict[str, Any]:
    """What is stored and later signed: the modes (as on the wire) and the locked modes."""
    return {
        "modes": {mode.value: spec.model_dump(mode="json") for mode, spec in table.modes.items()},
        "locked_modes": [mode.value for mode in table.locked_modes],
    }


def create(
    tables: ModeTableRepository, brand_id: str, table: ModeTableCreate, actor: str
) -> ModeTableRow:
    """Check ``table`` against the envelope and store it for ``brand_id``."""
    body = body_of(table)
    problems = envelope_problems(body["modes"])
    if problems:
        raise outside_envelope(problems)
    return tables.add(ModeTableRow(brand_id=brand_id, name=table.name, body=body, created_by=actor))


def to_schema(row: ModeTableRow) -> ModeTable:
    """The API's view of a stored table."""
    return ModeTable.model_validate(
        {
            "id": row.id,
            "brand": row.brand_id,
            "name": row.name,
            "modes": row.body["modes"],
            "locked_modes": row.body.get("locked_modes", []),
            "created_at": row.created_at,
            "created_by": row.created_by,
        }
    )
