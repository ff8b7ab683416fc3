"""Request dependencies: the caller's key, the request's unit of work, and the repositories
built on it.

Each request has one unit of work, owned by a dependency that checks the key on it and
commits at the boundary (or rolls back); endpoints reach the database only through
repositories built from it (``...Repo`` aliases below). Two kinds, chosen by what the endpoint
does, never both in one endpoint (that would hold a connection of each pool):

* the **read-write unit** (:func:`write_unit`): a SQLModel session on the thread pool, for
  endpoints that write and the sync services they call;
* the **read-only unit** (:func:`read_unit`): an async connection of the read pool
  (autocommit, read-only), on the event loop, for the endpoints dashboards poll.
"""

import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar

import anyio.from_thread
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from psycopg_pool import AsyncConnectionPool
from sqlalchemy import Engine
from sqlmodel import Session

from services.api.alerts.repository import AlertReadRepository, AlertRepository
from services.api.auth import AuthReadRepository, AuthRepository, Lookup
from services.api.brands.repository import BrandRepository
from services.api.brands.schemas import BRAND_ID_PATTERN
from services.api.conflicts.repository import ConflictReadRepository
from services.api.database import psycopg_connection
from services.api.devices.repository import DeviceReadRepository, DeviceRepository
from services.api.fleet.repository import FleetReadRepository, FleetRepository
from services.api.mode_tables.repository import ModeTableRepository
from services.api.notification_channels.repository import NotificationChannelRepository
from services.api.problems import ProblemError
from services.api.publisher import ConfigPublisher
from services.api.rate_limit import (
    FailureLimit,
    SharedLimits,
    address_bucket,
    conflict_bucket,
    prefix_bucket,
    retry_after_header,
)
from services.api.repository import ReadRepository, Repository
from services.api.rollouts.repository import RolloutRepository
from services.api.rules.repository import RuleRepository
from services.api.telemetry.repository import TelemetryReadRepository
from services.api.users.repository import UserRepository
from services.common.api_keys import Role
from services.common.config_push import Push
from services.common.db import AsyncConn, Conn

BRAND_ID_RE = re.compile(BRAND_ID_PATTERN)

Db = TypeVar("Db", Session, AsyncConn)

_bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer gvk_...`")
_Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


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


def _secret(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None:
        raise _unauthorized("send an API key as `Authorization: Bearer <key>`")
    return credentials.credentials


def _unauthorized(detail: str) -> ProblemError:
    return ProblemError(
        401, "unauthorized", "Unauthorized", detail, headers={"WWW-Authenticate": "Bearer"}
    )


def _too_many(detail: str, wait_s: float) -> ProblemError:
    return ProblemError(
        429,
        "rate-limited",
        "Too many requests",
        f"{detail}; retry in {wait_s:.1f} s",
        headers={"Retry-After": retry_after_header(wait_s)},
    )


@dataclass(frozen=True)
class _Auth:
    """What admitting a request needs: the shared limits and where the request came from."""

    limits: SharedLimits
    failures: FailureLimit
    address: str

    @classmethod
    def of(cls, request: Request) -> "_Auth":
        # The TCP peer (uvicorn puts a trusted proxy's X-Forwarded-For here when configured).
        address = request.client.host if request.client else "unknown"
        return cls(request.app.state.limits, request.app.state.auth_failures, address)

    def bucket(self) -> str:
        """The address's failure bucket, for the lookup."""
        return address_bucket(self.address)

    def screen(self, found: Lookup) -> uuid.UUID | None:
        """Refuse an address over its failure limit, whatever key it sends now; the key's id
        (None: no active key has the secret)."""
        blocked_s = found.blocked_s(self.failures.failures, self.failures.window_s)
        if blocked_s > 0:
            raise _too_many("too many failed authentications from this address", blocked_s)
        return found.id

    def failure_buckets(self, secret: str) -> tuple[str, str]:
        """Where a failed authentication counts: the address and the presented key prefix."""
        return address_bucket(self.address), prefix_bucket(secret)

    @staticmethod
    def refuse(failure_wait_s: float) -> ProblemError:
        """401 for a failed authentication, or 429 once it is over a failure limit."""
        if failure_wait_s > 0:
            return _too_many(
                "too many failed authentications from this address or with this key prefix",
                failure_wait_s,
            )
        return _unauthorized("the API key is unknown or has been revoked")


def _key(found: Lookup, wait_s: float) -> ApiKey:
    """The admitted caller, or a 429 when its key is over its rate limit."""
    if wait_s > 0:
        raise _too_many("this key is over its rate limit", wait_s)
    assert found.id is not None
    assert found.role is not None
    assert found.name is not None
    return ApiKey(found.id, Role(found.role), found.brand_id, found.name)


def _admit_sync(auth: _Auth, secret: str, found: Lookup) -> ApiKey:
    """Admit on a worker thread (the read-write unit); the shared limits run on the loop."""
    key_id = auth.screen(found)
    if key_id is None:
        buckets = auth.failure_buckets(secret)
        raise auth.refuse(anyio.from_thread.run(auth.limits.count_failure, auth.failures, *buckets))
    if auth.limits.take_local(key_id):
        return _key(found, 0.0)
    return _key(found, anyio.from_thread.run(auth.limits.take, key_id))


async def _admit(auth: _Auth, secret: str, found: Lookup) -> ApiKey:
    """Admit on the event loop (the read-only unit)."""
    key_id = auth.screen(found)
    if key_id is None:
        wait_s = await auth.limits.count_failure(auth.failures, *auth.failure_buckets(secret))
        raise auth.refuse(wait_s)
    return _key(found, 0.0 if auth.limits.take_local(key_id) else await auth.limits.take(key_id))


@dataclass(frozen=True)
class Unit(Generic[Db]):
    """A request's unit of work: what its repositories are built on (the session of the
    read-write unit, or the read-only unit's connection) and the caller's key."""

    db: Db
    key: ApiKey


def write_unit(request: Request, credentials: _Credentials) -> Iterator[Unit[Session]]:
    """One session per request, committed if the endpoint returns and rolled back if it raises;
    the key is checked inside it.

    One blocking dependency on purpose: FastAPI runs each sync dependency on the thread pool,
    and the hops cost more than the key lookup. Work that must follow the commit (telling the
    broker about new credentials, publishing a signed table) is added with
    :func:`after_commit` and runs before the response, each callback in a transaction of its
    own on the session's connection.
    """
    secret, auth = _secret(credentials), _Auth.of(request)
    engine: Engine = request.app.state.engine
    after: list[Callable[[Conn], None]] = []
    request.state.after_commit = after
    with Session(engine, expire_on_commit=False) as session:
        with session.begin():
            found = AuthRepository(session).lookup(secret, auth.bucket())
            key = _admit_sync(auth, secret, found)
            yield Unit(session, key)
        for callback in after:
            with session.begin():
                callback(psycopg_connection(session))


async def read_unit(request: Request, credentials: _Credentials) -> AsyncIterator[Unit[AsyncConn]]:
    """A read pool connection for the request, returned to the pool before the response is
    sent. Each statement on it is its own read-only transaction: nothing to commit."""
    secret, auth = _secret(credentials), _Auth.of(request)
    pool: AsyncConnectionPool[AsyncConn] = request.app.state.read_pool
    async with pool.connection() as conn:
        found = await AuthReadRepository(conn).lookup(secret, auth.bucket())
        yield Unit(conn, await _admit(auth, secret, found))


# scope="function": the unit ends before the response is sent, so a client never sees a
# success that then fails to commit (the default "request" scope ends after sending).
_WriteUnitDep = Annotated[Unit[Session], Depends(write_unit, scope="function")]
_ReadUnitDep = Annotated[Unit[AsyncConn], Depends(read_unit, scope="function")]

R = TypeVar("R", bound=Repository)
RR = TypeVar("RR", bound=ReadRepository)


# The builders are async: they do no I/O, and FastAPI runs async dependencies on the event
# loop instead of sending each to the thread pool.
def _on_write_unit(repository: Callable[[Session], R]) -> Any:
    async def build(unit: _WriteUnitDep) -> R:
        return repository(unit.db)

    return Depends(build)


def _on_read_unit(repository: Callable[[AsyncConn], RR]) -> Any:
    async def build(unit: _ReadUnitDep) -> RR:
        return repository(unit.db)

    return Depends(build)


async def _write_key(unit: _WriteUnitDep) -> ApiKey:
    return unit.key


async def _read_key(unit: _ReadUnitDep) -> ApiKey:
    return unit.key


CurrentKey = Annotated[ApiKey, Depends(_write_key)]
ReadKey = Annotated[ApiKey, Depends(_read_key)]

AlertRepo = Annotated[AlertRepository, _on_write_unit(AlertRepository)]
BrandRepo = Annotated[BrandRepository, _on_write_unit(BrandRepository)]
DeviceRepo = Annotated[DeviceRepository, _on_write_unit(DeviceRepository)]
FleetRepo = Annotated[FleetRepository, _on_write_unit(FleetRepository)]
ModeTableRepo = Annotated[ModeTableRepository, _on_write_unit(ModeTableRepository)]
NotificationChannelRepo = Annotated[
    NotificationChannelRepository, _on_write_unit(NotificationChannelRepository)
]
RolloutRepo = Annotated[RolloutRepository, _on_write_unit(RolloutRepository)]
RuleRepo = Annotated[RuleRepository, _on_write_unit(RuleRepository)]
UserRepo = Annotated[UserRepository, _on_write_unit(UserRepository)]

AlertReadRepo = Annotated[AlertReadRepository, _on_read_unit(AlertReadRepository)]
ConflictReadRepo = Annotated[ConflictReadRepository, _on_read_unit(ConflictReadRepository)]
DeviceReadRepo = Annotated[DeviceReadRepository, _on_read_unit(DeviceReadRepository)]
FleetReadRepo = Annotated[FleetReadRepository, _on_read_unit(FleetReadRepository)]
TelemetryReadRepo = Annotated[TelemetryReadRepository, _on_read_unit(TelemetryReadRepository)]


def after_commit(request: Request, callback: Callable[[Conn], None]) -> None:
    """Run ``callback`` once the request's transaction has committed."""
    request.state.after_commit.append(callback)


def publish_after_commit(request: Request, pushes: Sequence[Push]) -> None:
    """Hand ``pushes`` (recorded in the request's transaction) to the publisher once it has
    committed: a device must never receive a table that was then rolled back."""
    publisher: ConfigPublisher = request.app.state.config_publisher

    def publish(_: Conn) -> None:
        publisher.submit(pushes)

    if pushes:
        after_commit(request, publish)


def brand_scope(repository: Repository, key: ApiKey, requested: str | None) -> str:
    """The brand a request acts on: the key's own, or for the operator the one it names (which
    must exist: 404 otherwise, as for a brand key naming another brand)."""
    if key.brand_id is not None:
        if requested is not None and requested != key.brand_id:
            raise _no_brand(requested)
        return key.brand_id
    if requested is None:
        # 403 as for the operator on a brand's own lists (brand-key-required): the body is
        # valid, this caller may not act without naming a brand (no schema can say it, as it
        # depends on the caller's role).
        raise ProblemError(
            403,
            "brand-required",
            "A brand is required",
            "brand: an operator key must name the brand it acts on",
        )
    known = BRAND_ID_RE.match(requested) is not None
    if not known or not BrandRepository(repository.session).exists(requested):
        raise _no_brand(requested)
    return requested


def _no_brand(requested: str | None) -> ProblemError:
    return ProblemError(404, "not-found", "Not found", f"there is no brand {requested!r}")


@dataclass(frozen=True)
class ProvisionConflicts:
    """A key's provisioning conflicts (a device id already taken) against their limit.

    Device ids are MQTT client ids, one namespace for every brand, so an id another brand
    holds cannot be given: it answers exactly as an id of the caller's own brand (409
    ``device-exists``, the same sentence). Past the limit, every provisioning call of the key
    answers 429 until the window ends, so the 409 cannot be used to enumerate the ids other
    brands hold."""

    limits: SharedLimits
    limit: FailureLimit
    bucket: str

    @classmethod
    def of(cls, request: Request, repository: Repository, key: ApiKey) -> "ProvisionConflicts":
        """The key's conflicts; refuses the call (429) while the key is over the limit."""
        conflicts = cls(
            request.app.state.limits,
            request.app.state.provision_conflicts,
            conflict_bucket(key.id),
        )
        wait_s = AuthRepository(repository.session).failure_wait(
            conflicts.bucket, conflicts.limit.failures, conflicts.limit.window_s
        )
        if wait_s > 0:
            raise conflicts._over(wait_s)
        return conflicts

    def refuse(self, detail: str) -> ProblemError:
        """Count a conflict: 409 ``device-exists`` with ``detail``, or 429 past the limit."""
        wait_s = anyio.from_thread.run(self.limits.count_failure, self.limit, self.bucket)
        if wait_s > 0:
            return self._over(wait_s)
        return ProblemError(409, "device-exists", "Device not provisioned", detail)

    def _over(self, wait_s: float) -> ProblemError:
        return _too_many(
            f"this key named a device id that is taken more than {self.limit.failures} times"
            f" in {self.limit.window_s:.0f} s",
            wait_s,
        )


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
