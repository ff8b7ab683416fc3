"""``/v1/mode-tables``: create (validated against the envelope), list, read."""

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from services.api.deps import CurrentKey, ModeTableRepo, brand_scope, require
from services.api.mode_tables import service
from services.api.mode_tables.schemas import (
    Envelope,
    EnvelopeLimit,
    ModeTable,
    ModeTableCreate,
    ModeTableList,
)
from services.api.pagination import decode_time_cursor, encode_time_cursor, page
from services.api.problems import ProblemError, responses
from services.api.responses import json_response
from services.common.api_keys import Role
from services.common.mode_tables import DEFAULT_MODES, ENVELOPE

router = APIRouter(prefix="/v1/mode-tables", tags=["mode tables"])
MAX_LIMIT = 200


@router.post(
    "",
    response_model=ModeTable,
    status_code=status.HTTP_201_CREATED,
    responses=responses(401, 403, 404, 422),
)
def create_mode_table(body: ModeTableCreate, tables: ModeTableRepo, key: CurrentKey) -> ModeTable:
    """Store a table for the brand. A table outside the envelope is refused: the 422 lists
    each field (``modes.LIFT.i_max_ua``), its limit and the value given."""
    require(key, Role.ADMIN, Role.OPERATOR)
    brand = brand_scope(tables, key, body.brand)
    return service.to_schema(service.create(tables, brand, body, key.actor))


@router.get("", response_model=ModeTableList, responses=responses(401, 403, 422))
def list_mode_tables(
    tables: ModeTableRepo,
    key: CurrentKey,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    """The brand's tables, newest first."""
    after = decode_time_cursor("mode-tables", cursor) if cursor is not None else None
    rows = tables.page(key.brand, after=after, limit=limit + 1)
    kept, next_cursor = page(
        rows, limit, lambda row: encode_time_cursor("mode-tables", row.created_at, row.id)
    )
    return json_response(
        ModeTableList(items=[service.to_schema(row) for row in kept], next_cursor=next_cursor)
    )


@router.get("/envelope", response_model=Envelope, responses=responses(401))
def envelope(key: CurrentKey) -> Envelope:
    """The safety envelope's limits and the default tables (a form's starting point)."""
    return Envelope.model_validate(
        {
            "limits": [EnvelopeLimit(field=f, min=low, max=high) for f, low, high in ENVELOPE],
            "defaults": DEFAULT_MODES,
        }
    )


@router.get("/{table_id}", response_model=ModeTable, responses=responses(401, 403, 404, 422))
def get_mode_table(table_id: uuid.UUID, tables: ModeTableRepo, key: CurrentKey) -> ModeTable:
    """One table of the brand."""
    row = tables.get(key.brand, table_id)
    if row is None:
        raise ProblemError(404, "not-found", "Not found", f"there is no mode table {table_id}")
    return service.to_schema(row)
