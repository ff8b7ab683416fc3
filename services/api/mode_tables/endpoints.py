"""``/v1/mode-tables``: create (validated against the envelope), list, read."""

import uuid
from typing import Annotated

from fastapi import APIRouter, Response, status

from services.api.deps import CurrentKey, ModeTableRepo, brand_scope, require
from services.api.mode_tables import schemas, service
from services.api.pagination import NewestFirst, newest_first
from services.api.problems import ProblemError, responses
from services.api.responses import json_response
from services.common.api_keys import Role
from services.common.mode_tables import DEFAULT_MODES, ENVELOPE

router = APIRouter(prefix="/v1/mode-tables", tags=["mode tables"])
MAX_LIMIT = 200
Page = Annotated[NewestFirst, newest_first(default=50, maximum=MAX_LIMIT)]


@router.post(
    "",
    response_model=schemas.ModeTable,
    status_code=status.HTTP_201_CREATED,
    responses=responses(401, 403, 404, 422),
)
def create_mode_table(
    body: schemas.ModeTableCreate, tables: ModeTableRepo, key: CurrentKey
) -> schemas.ModeTable:
    """Store a table for the brand. A table outside the envelope is refused: the 422 lists
    each field (``modes.LIFT.i_max_ua``), its limit and the value given."""
    require(key, Role.ADMIN, Role.OPERATOR)
    brand = brand_scope(tables, key, body.brand)
    return service.to_schema(service.create(tables, brand, body, key.actor))


@router.get("", response_model=schemas.ModeTableList, responses=responses(401, 403, 422))
def list_mode_tables(tables: ModeTableRepo, key: CurrentKey, asked: Page) -> Response:
    """The brand's tables, newest first."""
    rows, next_cursor = asked.answer(
        tables.page(key.brand, after=asked.after, limit=asked.limit + 1)
    )
    items = [service.to_schema(row) for row in rows]
    return json_response(schemas.ModeTableList(items=items, next_cursor=next_cursor))


@router.get("/envelope", response_model=schemas.Envelope, responses=responses(401))
def envelope(key: CurrentKey) -> schemas.Envelope:
    """The safety envelope's limits and the default tables (a form's starting point)."""
    return schemas.Envelope.model_validate(
        {
            "limits": [
                schemas.EnvelopeLimit(field=f, min=low, max=high) for f, low, high in ENVELOPE
            ],
            "defaults": DEFAULT_MODES,
        }
    )


@router.get(
    "/{table_id}", response_model=schemas.ModeTable, responses=responses(401, 403, 404, 422)
)
def get_mode_table(
    table_id: uuid.UUID, tables: ModeTableRepo, key: CurrentKey
) -> schemas.ModeTable:
    """One table of the brand."""
    row = tables.get(key.brand, table_id)
    if row is None:
        raise ProblemError(404, "not-found", "Not found", f"there is no mode table {table_id}")
    return service.to_schema(row)
