"""Request dependencies: the caller's key, and what the request reads and writes with.

Two scopes, each checking the key on the connection it gives the endpoint:

* the **session** scope (``SessionDep``, ``ConnDep``, ``CurrentKey``): a SQLModel session that
  owns the request's transaction, on the thread pool, for endpoints that write and the sync
  services they call;
* the **read** scope (``ReadConnDep``, ``ReadKey``): an async connection from the read pool
  (autocommit, read-only), on the event loop, for the endpoints dashboards poll.
"""

import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from psycopg_pool import AsyncConnectionPool
from sqlalchemy import Engine
from sqlmodel import Session

from services.api.database import raw_connection
from services.api.problems import ProblemError
from services.api.rate_limit import RateLimiter, retry_after_header
from services.common.api_keys import Role, digest
from services.common.db import AsyncConn, Conn

BRAND_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{1,63}$"  # a brand's id, as POST /v1/brands takes it
BRAND_ID_RE = re.compile(BRAND_ID_PATTERN)

_bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer gvk_...`")


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


_KEY_QUERY = (
    "SELECT id, role, brand_id, name FROM api_keys WHERE key_hash = %s AND revoked_at IS NULL"
)


def _secret(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None:
        raise _unauthorized("send an API key as `Authorization: Bearer <key>`")
    return credentials.credentials


def _authenticate(request: Request, conn: Conn, secret: str) -> ApiKey:
    return _admit(request, conn.execute(_KEY_QUERY, [digest(secret)]).fetchone())


async def _authenticate_async(request: Request, conn: AsyncConn, secret: str) -> ApiKey:
    cursor = await conn.execute(_KEY_QUERY, [digest(secret)])
    return _admit(request, await cursor.fetchone())


def _admit(request: Request, row: tuple[object, ...] | None) -> ApiKey:
    """The key of ``row`` (``None``: unknown or revoked), within its rate limit."""
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


@dataclass(frozen=True)
class RequestScope:
    """What an authenticated request works with: its session (which owns the transaction),
    the psycopg connection inside it, and the caller's key."""

    session: Session
    conn: Conn
    key: ApiKey


def _request_scope(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Iterator[RequestScope]:
    """One session per request, committed if the endpoint returns and rolled back if it raises;
    the key is checked inside it.

    One blocking dependency on purpose: FastAPI runs each sync dependency on the thread pool,
    and the hops cost more than the key lookup. Work that must follow the commit (telling the
    broker about new credentials, publishing a signed table) is added with
    :func:`after_commit` and runs before the response, each callback in a transaction of its
    own on the session's connection.
    """
    secret = _secret(credentials)
    engine: Engine = request.app.state.engine
    after: list[Callable[[Conn], None]] = []
    request.state.after_commit = after
    with Session(engine, expire_on_commit=False) as session:
        with session.begin():
            conn = raw_connection(session)
            yield RequestScope(session, conn, _authenticate(request, conn, secret))
        for callback in after:
            with session.begin():
                callback(raw_connection(session))


# scope="function": the transaction commits before the response is sent, so a client never
# sees a success that then fails to commit (the default "request" scope ends after sending).
_ScopeDep = Annotated[RequestScope, Depends(_request_scope, scope="function")]


# The accessors are async: they do no I/O, and FastAPI runs async dependencies on the event
# loop instead of sending each to the thread pool.
async def _session_of(scope: _ScopeDep) -> Session:
    return scope.session


async def _connection_of(scope: _ScopeDep) -> Conn:
    return scope.conn


async def _key_of(scope: _ScopeDep) -> ApiKey:
    return scope.key


SessionDep = Annotated[Session, Depends(_session_of)]
# The psycopg connection inside the request's session: bulk reads and the shared services
# (provisioning, signing pushes) run in the same transaction as the ORM's writes.
ConnDep = Annotated[Conn, Depends(_connection_of)]
CurrentKey = Annotated[ApiKey, Depends(_key_of)]


@dataclass(frozen=True)
class ReadScope:
    """What a read endpoint works with: a connection of the read pool and the caller's key."""

    conn: AsyncConn
    key: ApiKey


async def _read_scope(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> AsyncIterator[ReadScope]:
    """A read pool connection for the request, returned to the pool before the response is
    sent. Each statement on it is its own read-only transaction."""
    secret = _secret(credentials)
    pool: AsyncConnectionPool[AsyncConn] = request.app.state.read_pool
    async with pool.connection() as conn:
        yield ReadScope(conn, await _authenticate_async(request, conn, secret))


_ReadScopeDep = Annotated[ReadScope, Depends(_read_scope, scope="function")]


async def _read_connection_of(scope: _ReadScopeDep) -> AsyncConn:
    return scope.conn


async def _read_key_of(scope: _ReadScopeDep) -> ApiKey:
    return scope.key


# For ``async def`` endpoints that only read: never mixed with the session scope's
# dependencies in one endpoint (that would hold a connection of each pool).
ReadConnDep = Annotated[AsyncConn, Depends(_read_connection_of)]
ReadKey = Annotated[ApiKey, Depends(_read_key_of)]


def after_commit(request: Request, callback: "Callable[[Conn], None]") -> None:
    """Run ``callback`` once the request's transaction has committed."""
    request.state.after_commit.append(callback)


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
    known = BRAND_ID_RE.match(requested) is not None
    if (
        not known
        or conn.execute("SELECT 1 FROM brands WHERE id = %s", [requested]).fetchone() is None
    ):
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
