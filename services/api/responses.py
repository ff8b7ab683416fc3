"""Answering with JSON serialized once.

FastAPI, given a model to return and a ``response_model``, dumps the model to a dict,
validates that dict into the model again and serializes the result. For the read endpoints,
which build their models from database rows they have just validated, that doubled the API's
CPU per request. Returning the JSON (pydantic-core serializes it) skips the round trip; the
``response_model`` on the route still documents the answer in OpenAPI, and the schema tests
check every answer against it.
"""

from typing import Any

import msgspec
from fastapi import Response
from psycopg.abc import AdaptContext
from psycopg.adapt import Buffer, Loader
from pydantic import BaseModel

JSON = "application/json"
_encoder = msgspec.json.Encoder()


def json_response(model: BaseModel, status_code: int = 200) -> Response:
    """``model`` as the JSON body FastAPI would have sent for it (aliases, ``null`` kept)."""
    return Response(model.model_dump_json(by_alias=True), status_code=status_code, media_type=JSON)


def rows_response(body: dict[str, Any]) -> Response:
    """``body`` built from database rows the route's model describes exactly (the same names,
    and types psycopg returns: str, int, float, bool, None, aware datetimes, dicts and lists)
    as JSON, without building models at all: for the answers with many rows (telemetry
    points, alert lists). Datetimes become RFC 3339 strings, as pydantic writes them; jsonb
    read with :func:`jsonb_passed_through` is written as PostgreSQL sent it."""
    return Response(_encoder.encode(body), media_type=JSON)


class _PassThroughLoader(Loader):
    def load(self, data: Buffer) -> msgspec.Raw:
        return msgspec.Raw(bytes(data))


def jsonb_passed_through(context: AdaptContext) -> None:
    """Have ``context`` (a cursor) return jsonb values as the JSON text PostgreSQL sends,
    for :func:`rows_response` to write verbatim: never parsed, never encoded again."""
    context.adapters.register_loader("jsonb", _PassThroughLoader)
