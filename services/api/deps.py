"""Request dependencies: the database connection (transaction owned here) and the caller's key."""

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlmodel import Session

from services.api.database import raw_connection
from services.api.problems import ProblemError
from services.api.rate_limit import RateLimiter, retry_after_header
from services.common.api_keys import Role, digest
from services.common.db import Conn

_bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer gvk_...`")


def _session(request: Request) -> Iterator[Session]:
    """One session per request; committed if the endpoint returns, rolled back if it raises.

    Work that must follow the commit (telling the broker about new credentials, publishing a
    signed table) is added to ``request.state.after_commit`` and runs before the response, each
    callback in a transaction of its own on the session's connection.
    """
    engine: Engine = request.app.state.engine
    after: list[Callable[[Conn], None]] = []
    request.state.after_commit = after
    with Session(engine, expire_on_commit=False) as session:
        with session.begin():
            yield session
        for callback in after:
            with session.begin():
                callback(raw_connection(session))


def after_commit(request: Request, callback: "Callable[[Conn], None]") -> None:
    """Run ``callback`` once the request's transaction has committed."""
    request.state.after_commit.append(callback)


# scope="function": the transaction commits before the response is sent, so a client never
# sees a success that then fails to commit (the default "request" scope ends after sending).
SessionDep = Annotated[Session, Depends(_session, scope="function")]


def _connection(session: SessionDep) -> Conn:
    return raw_connection(session)


# The psycopg connection inside the request's session: bulk reads and the shared services
# (provisioning, signing pushes) run in the same transaction as the ORM's writes.
ConnDep = Annotated[Conn, Depends(_connection)]


@dataclass(frozen=True)
class ApiKey:
    """The caller: its key's id, role and brand (``None`` for the operator)."""

    id: uuid.UUID
    role: Role
    brand_id: str | None
    name: str = ""

    @property
    def brand(self) -> str:
        """The caller's brand; refuses the operator, which has none."""
        if self.brand_id is None:
            raise ProblemError(
                403,
                "brand-key-required",
                "A brand key is required",
                "this endpoint answers for one brand: call it with a key of that brand",
            )
        return self.brand_id

    @property
    def actor(self) -> str:
        """Who did it, as recorded in audit columns."""
        return f"api-key:{self.id}"


def _unauthorized(detail: str) -> ProblemError:
    return ProblemError(
        401,
        "unauthorized",
        "Unauthorized",
        detail,
        headers={"WWW-Authenticate": "Bearer"},
    )


def _current_key(
    request: Request,
    conn: ConnDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> ApiKey:
    if credentials is None:
        raise _unauthorized("send an API key as `Authorization: Bearer <key>`")
    row = conn.execute(
        "SELECT id, role, brand_id, name FROM api_keys WHERE key_hash = %s AND revoked_at IS NULL",
        [digest(credentials.credentials)],
    ).fetchone()
    if row is None:
        raise _unauthorized("the API key is unknown or has been revoked")
    key_id, role, brand_id, name = row
    assert isinstance(key_id, uuid.UUID)
    limiter: RateLimiter = request.app.state.rate_limiter
    wait_s = limiter.take(key_id)
    if wait_s > 0:
        raise ProblemError(
            429,
            "rate-limited",
            "Too many requests",
            f"this key is over its rate limit; retry in {wait_s:.1f} s",
            headers={"Retry-After": retry_after_header(wait_s)},
        )
    return ApiKey(
        key_id, Role(str(role)), str(brand_id) if brand_id is not None else None, str(name)
    )


CurrentKey = Annotated[ApiKey, Depends(_current_key)]


def brand_scope(conn: Conn, key: ApiKey, requested: str | None) -> str:
    """The brand a request acts on: the key's own, or for the operator the one it names (which
    must exist: 404 otherwise, as for a brand key naming another brand)."""
    if key.brand_id is not None:
        if requested is not None and requested != key.brand_id:
            raise ProblemError(404, "not-found", "Not found", f"there is no brand {requested!r}")
        return key.brand_id
    if requested is None:
        raise ProblemError(
            422,
            "brand-required",
            "A brand is required",
            "brand: an operator key must name the brand it acts on",
        )
    if conn.execute("SELECT 1 FROM brands WHERE id = %s", [requested]).fetchone() is None:
        raise ProblemError(404, "not-found", "Not found", f"there is no brand {requested!r}")
    return requested


def require(key: ApiKey, *roles: Role) -> None:
    """Refuse ``key`` unless its role is one of ``roles``."""
    if key.role not in roles:
        allowed = ", ".join(role.value for role in roles)
        raise ProblemError(
            403,
            "forbidden",
            "Forbidden",
            f"a {key.role.value} key cannot do this; it needs one of: {allowed}",
        )
