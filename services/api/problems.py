"""Errors as RFC 9457 problem details (``application/problem+json``) with stable types."""

from typing import Any, Final

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

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


def install(app: FastAPI) -> None:
    """Render every error of ``app`` as problem+json."""

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

    app.add_exception_handler(ProblemError, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
