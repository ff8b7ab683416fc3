"""Errors as RFC 9457 problem details (``application/problem+json``) with stable types."""

import logging
from collections.abc import MutableMapping
from typing import Any, Final

import psycopg
import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

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
      rate, and 503 when the database cannot be reached;
    - an optional parameter is left out to mean "none": a query string or header has no
      ``null``, so its schema does not offer one (FastAPI documents ``X | None`` as
      ``anyOf [X, null]``, which generated clients send as the text ``null``).
    """
    components = document.setdefault("components", {}).setdefault("schemas", {})
    components.setdefault("Problem", Problem.model_json_schema(ref_template="#/components/{model}"))
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                parameter["schema"] = _without_null(parameter.get("schema", {}))
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


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with a ``{"type": "null"}`` branch of its ``anyOf`` taken out."""
    branches = schema.get("anyOf")
    if branches is None:
        return schema
    kept = [branch for branch in branches if branch.get("type") != "null"]
    rest = {name: value for name, value in schema.items() if name != "anyOf"}
    return {**kept[0], **rest} if len(kept) == 1 else {**rest, "anyOf": kept}


def allowed_methods(app: Any, scope: MutableMapping[str, Any]) -> list[str]:
    """Every method some route of ``app`` answers at the path of ``scope`` (Starlette's 405
    names only the first route that matched the path, not the others at the same path)."""
    methods: set[str] = set()
    for context in iter_route_contexts(app.routes):
        path_format = context.path_format
        if path_format is None or not context.methods:
            continue
        path_regex, _, _ = compile_path(path_format)
        if path_regex.match(scope["path"]):
            methods |= context.methods
    return sorted(methods - {"HEAD"})


class App(FastAPI):
    """A FastAPI app whose OpenAPI document says what :func:`install` makes true."""

    def openapi(self) -> dict[str, Any]:
        """The document, with :func:`document_problems` applied once."""
        if self.openapi_schema is None:
            self.openapi_schema = document_problems(super().openapi())
        return self.openapi_schema


# What a violated constraint means to the client, by the error's class (its SQLSTATE) and the
# constraint's name: (status, problem type, title). Callers give the sentence.
CONSTRAINTS: Final[dict[tuple[type[psycopg.IntegrityError], str], tuple[int, str, str]]] = {
    (psycopg.errors.UniqueViolation, "brands_pkey"): (409, "brand-exists", "Brand exists"),
    (psycopg.errors.UniqueViolation, "devices_pkey"): (
        409,
        "device-exists",
        "Device not provisioned",
    ),
    (psycopg.errors.ForeignKeyViolation, "devices_brand_id_fkey"): (
        422,
        "invalid-device",
        "Device not provisioned",
    ),
    (psycopg.errors.ForeignKeyViolation, "users_brand_id_fkey"): (
        422,
        "invalid-device",
        "Device not provisioned",
    ),
}


def constraint_problem(exc: BaseException | None, detail: str) -> ProblemError | None:
    """The problem a violated constraint of :data:`CONSTRAINTS` means (``exc`` is psycopg's
    error, or one raised while handling it); None for anything else."""
    if isinstance(exc, sqlalchemy.exc.IntegrityError):
        exc = exc.orig
    if not isinstance(exc, psycopg.IntegrityError):
        return None
    meaning = CONSTRAINTS.get((type(exc), exc.diag.constraint_name or ""))
    if meaning is None:
        return None
    status, kind, title = meaning
    return ProblemError(status, kind, title, detail)


def _answer(error: ProblemError) -> JSONResponse:
    return problem_response(error.problem, error.headers)


def _invalid_request(detail: str, errors: list[dict[str, Any]] | None = None) -> JSONResponse:
    return _answer(ProblemError(422, "invalid-request", "Invalid request", detail, errors=errors))


def install(app: FastAPI) -> None:
    """Render every error of ``app`` as problem+json (:class:`App` documents it so)."""

    async def on_problem(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ProblemError)
        return _answer(exc)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = [
            {"field": ".".join(str(p) for p in error["loc"]), "message": error["msg"]}
            for error in exc.errors()
        ]
        first = errors[0] if errors else {"field": "request", "message": "invalid"}
        if first["field"] == "query.cursor":
            return _answer(
                ProblemError(
                    422,
                    "invalid-cursor",
                    "Invalid cursor",
                    "cursor: pass the next_cursor of a previous page unchanged "
                    f"({first['message']})",
                    errors=errors,
                )
            )
        return _invalid_request(f"{first['field']}: {first['message']}", errors)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        kind = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        title = str(exc.detail) if exc.status_code != 404 else "Not found"
        headers = dict(exc.headers) if exc.headers else None
        if exc.status_code == 405:
            headers = {
                **(headers or {}),
                "Allow": ", ".join(allowed_methods(request.app, request.scope)),
            }
        return _answer(ProblemError(exc.status_code, kind, title, str(exc.detail), headers=headers))

    async def on_database(request: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable for %s %s: %s", request.method, request.url.path, exc)
        detail = "the database cannot be reached just now; retry shortly"
        return _answer(
            ProblemError(
                503,
                "database-unavailable",
                "Database unavailable",
                detail,
                headers={"Retry-After": "1"},
            )
        )

    async def on_data(request: Request, exc: Exception) -> JSONResponse:
        # Values the request carried that PostgreSQL cannot hold (a NUL byte in a string, a
        # number out of its column's range): the request is at fault; the transaction was
        # rolled back by the request's unit of work.
        return _invalid_request(f"a value cannot be stored or compared: {str(exc).splitlines()[0]}")

    app.add_exception_handler(ProblemError, on_problem)
    app.add_exception_handler(psycopg.DataError, on_data)
    app.add_exception_handler(psycopg.OperationalError, on_database)
    app.add_exception_handler(sqlalchemy.exc.OperationalError, on_database)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
