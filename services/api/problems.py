"""Errors as RFC 9457 problem details (``application/problem+json``) with stable types."""

import logging
from typing import Any, Final

import psycopg
import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

PROBLEM_JSON: Final = "application/problem+json"
TYPE_BASE: Final = "https://galvani.dev/problems/"


class Problem(BaseModel):
    """A problem detail: ``type`` is stable, ``detail`` is a sentence a person can act on."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[dict[str, Any]] | None = None


class ProblemError(Exception):
    """Raised by endpoints and dependencies; rendered as problem+json."""

    def __init__(
        self,
        status: int,
        kind: str,
        title: str,
        detail: str,
        *,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.problem = Problem(
            type=TYPE_BASE + kind, title=title, status=status, detail=detail, errors=errors
        )
        self.headers = headers


def problem_response(problem: Problem, headers: dict[str, str] | None = None) -> JSONResponse:
    """The response for ``problem``."""
    return JSONResponse(
        problem.model_dump(exclude_none=True),
        status_code=problem.status,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries documenting problem responses."""
    return {
        status: {"model": Problem, "content": {PROBLEM_JSON: {}}, "description": "a problem"}
        for status in statuses
    }


def _problem_response(description: str) -> dict[str, Any]:
    schema = {"$ref": "#/components/schemas/Problem"}
    return {"description": description, "content": {PROBLEM_JSON: {"schema": schema}}}


def document_problems(document: dict[str, Any]) -> dict[str, Any]:
    """Make ``document`` (the app's OpenAPI) say what :func:`install` makes true of every
    operation, whatever its endpoint declared:

    - a problem response is ``application/problem+json`` with the ``Problem`` schema only
      (``responses(...)`` passes the model, which FastAPI files under ``application/json``);
    - a request FastAPI refuses (422) is problem+json, not FastAPI's ``HTTPValidationError``;
    - a body that cannot be read as text answers 400 (FastAPI: "error parsing the body");
    - an operation that takes an API key may answer 401, and 429 when the key is over its
      rate, and 503 when the database cannot be reached.
    """
    components = document.setdefault("components", {}).setdefault("schemas", {})
    components.setdefault("Problem", Problem.model_json_schema(ref_template="#/components/{model}"))
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            answers = operation.setdefault("responses", {})
            for status, answer in answers.items():
                if PROBLEM_JSON in answer.get("content", {}):
                    answers[status] = _problem_response(answer.get("description", "a problem"))
            invalid = answers.get("422")
            if invalid is not None and PROBLEM_JSON not in invalid.get("content", {}):
                answers["422"] = _problem_response("a problem: the request is invalid")
            if "requestBody" in operation:
                answers.setdefault("400", _problem_response("a problem: the body is unreadable"))
            if operation.get("security"):
                answers.setdefault("401", _problem_response("a problem: no valid API key"))
                answers.setdefault("429", _problem_response("a problem: over the rate limit"))
                answers.setdefault("503", _problem_response("a problem: database unavailable"))
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    return document


def install(app: FastAPI) -> None:
    """Render every error of ``app`` as problem+json, and say so in its OpenAPI document."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_problems(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    async def on_problem(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ProblemError)
        return problem_response(exc.problem, exc.headers)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = [
            {"field": ".".join(str(p) for p in error["loc"]), "message": error["msg"]}
            for error in exc.errors()
        ]
        first = errors[0] if errors else {"field": "request", "message": "invalid"}
        return problem_response(
            Problem(
                type=TYPE_BASE + "invalid-request",
                title="Invalid request",
                status=422,
                detail=f"{first['field']}: {first['message']}",
                errors=errors,
            )
        )

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        kind = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        return problem_response(
            Problem(
                type=TYPE_BASE + kind,
                title=str(exc.detail) if exc.status_code != 404 else "Not found",
                status=exc.status_code,
                detail=str(exc.detail),
            ),
            dict(exc.headers) if exc.headers else None,
        )

    async def on_database(request: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable for %s %s: %s", request.method, request.url.path, exc)
        return problem_response(
            Problem(
                type=TYPE_BASE + "database-unavailable",
                title="Database unavailable",
                status=503,
                detail="the database cannot be reached just now; retry shortly",
            ),
            {"Retry-After": "1"},
        )

    async def on_data(request: Request, exc: Exception) -> JSONResponse:
        # Values the request carried that PostgreSQL cannot hold (a NUL byte in a string, a
        # number out of its column's range): the request is at fault; the transaction was
        # rolled back by the request's session.
        return problem_response(
            Problem(
                type=TYPE_BASE + "invalid-request",
                title="Invalid request",
                status=422,
                detail=f"a value cannot be stored or compared: {str(exc).splitlines()[0]}",
            )
        )

    app.add_exception_handler(ProblemError, on_problem)
    app.add_exception_handler(psycopg.DataError, on_data)
    app.add_exception_handler(psycopg.OperationalError, on_database)
    app.add_exception_handler(sqlalchemy.exc.OperationalError, on_database)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
