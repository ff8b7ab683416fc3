"""``/healthz``, ``/readyz`` and ``/metrics``: for the ops network, no API key."""

import socket
import ssl
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from sqlalchemy import Engine, text

from services.api.settings import ApiSettings

READY_TIMEOUT_S = 2.0

router = APIRouter(tags=["operations"])


class Health(BaseModel):
    """Liveness: the process answers."""

    status: str


class Readiness(BaseModel):
    """Readiness: each dependency and whether it answered."""

    status: str
    database: bool
    broker: bool


def _engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def _settings(request: Request) -> ApiSettings:
    settings: ApiSettings = request.app.state.settings
    return settings


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The process is alive."""
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "a dependency is unreachable"}},
)
def readyz(
    response: Response,
    engine: Annotated[Engine, Depends(_engine)],
    settings: Annotated[ApiSettings, Depends(_settings)],
) -> Readiness:
    """Ready when the database answers a query and the broker accepts a connection (a TLS
    handshake that verifies the broker's certificate, unless TLS is off)."""
    database = _database_ok(engine)
    broker = _broker_ok(settings.mqtt_host, settings.mqtt_port, settings.mqtt_tls_context())
    ready = database and broker
    if not ready:
        response.status_code = 503
    return Readiness(status="ready" if ready else "unavailable", database=database, broker=broker)


def _database_ok(engine: Engine) -> bool:
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception:  # noqa: BLE001 - any failure means "not ready", reported as such
        return False
    return True


def _broker_ok(host: str, port: int, tls: ssl.SSLContext | None) -> bool:
    # The API's publishers fail on a broker they cannot verify, so the handshake is part of
    # being ready; ssl.SSLError (a failed verification too) is an OSError.
    try:
        with socket.create_connection((host, port), timeout=READY_TIMEOUT_S) as sock:
            if tls is not None:
                tls.wrap_socket(sock, server_hostname=host).close()
    except OSError:
        return False
    return True


@router.get("/metrics", response_class=Response, include_in_schema=False)
def metrics() -> Response:
    """Prometheus exposition of this process's metrics."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
