"""The API application.

Run with ``python -m services.api.main`` (``GALVANI_API_WORKERS`` processes) or
``uvicorn --factory services.api.main:app_from_environment``.
"""

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from services.api import problems, server
from services.api.alerts.endpoints import router as alerts_router
from services.api.alerts.feed import AlertFeed
from services.api.alerts.stream import StreamSlots
from services.api.alerts.stream import router as alert_stream_router
from services.api.brands.endpoints import router as brands_router
from services.api.conflicts.endpoints import router as conflicts_router
from services.api.dashboard import endpoints as dashboard
from services.api.database import create_database_engine, create_read_pool
from services.api.device_authorities.endpoints import router as device_authorities_router
from services.api.devices.endpoints import router as devices_router
from services.api.fleet.endpoints import router as fleet_router
from services.api.health.endpoints import router as health_router
from services.api.metrics import RequestMetrics
from services.api.mode_tables.endpoints import router as mode_tables_router
from services.api.notification_channels.endpoints import router as notification_channels_router
from services.api.publisher import ConfigPublisher
from services.api.query_params import refuse_unknown_query
from services.api.rate_limit import FailureLimit, SharedLimits
from services.api.revocation_renewal import renew_periodically
from services.api.rollouts.endpoints import router as rollouts_router
from services.api.rules.endpoints import router as rules_router
from services.api.settings import ApiSettings
from services.api.signing.endpoints import router as signing_router
from services.api.telemetry.endpoints import router as telemetry_router
from services.api.telemetry.suspect import router as suspect_telemetry_router
from services.api.users.endpoints import router as users_router
from services.common.logs import configure_logging
from services.common.signing import load_or_create_key, public_key_b64


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    """Build the app; the pool lives for the app's lifespan, never at import time."""
    settings = settings or ApiSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        database_url = settings.database_url.get_secret_value()
        engine = create_database_engine(
            database_url, pool_size=settings.pool_size, timeout_s=settings.pool_timeout_s
        )
        app.state.engine = engine
        read_pool = create_read_pool(
            database_url, size=settings.pool_size, timeout_s=settings.pool_timeout_s
        )
        # Without waiting: a database that is down fails requests (503), not the start.
        await read_pool.open(wait=False)
        app.state.read_pool = read_pool
        app.state.settings = settings
        limits = SharedLimits(
            database_url, rate_per_s=settings.rate_limit_per_s, burst=settings.rate_limit_burst
        )
        await limits.open()
        app.state.limits = limits
        app.state.auth_failures = FailureLimit(
            settings.auth_failures_per_window, settings.auth_failure_window_s
        )
        app.state.provision_conflicts = FailureLimit(
            settings.provision_conflicts_per_window, settings.provision_conflict_window_s
        )
        app.state.alert_streams = StreamSlots(
            settings.alert_streams_per_key, settings.alert_streams_per_process
        )
        # The same key directory as the rules workers: whoever starts first creates it.
        signing_key = load_or_create_key(settings.key_dir())
        app.state.signing_key = signing_key
        app.state.config_public_key = public_key_b64(signing_key)
        publisher = ConfigPublisher(settings, engine)
        app.state.config_publisher = publisher
        feed = AlertFeed(database_url)
        app.state.alert_feed = feed
        # The device CA's revocation list, published again before it expires.
        renewal = asyncio.create_task(renew_periodically(settings, engine))
        try:
            yield
        finally:
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewal
            feed.close()
            publisher.close()
            await limits.close()
            await read_pool.close()
            engine.dispose()

    app = problems.App(
        title="Galvani API",
        version="1.0.0",
        description="Fleet backend for connected microcurrent personal-care devices.",
        lifespan=lifespan,
        dependencies=[Depends(refuse_unknown_query)],
    )
    problems.install(app)
    app.add_middleware(RequestMetrics)
    app.include_router(health_router)
    app.include_router(signing_router)
    app.include_router(rules_router)
    app.include_router(alert_stream_router)  # before /v1/alerts/{alert_id}
    app.include_router(alerts_router)
    app.include_router(devices_router)
    app.include_router(device_authorities_router)
    app.include_router(brands_router)
    app.include_router(fleet_router)
    app.include_router(users_router)
    app.include_router(telemetry_router)
    app.include_router(suspect_telemetry_router)
    app.include_router(conflicts_router)
    app.include_router(mode_tables_router)
    app.include_router(rollouts_router)
    app.include_router(notification_channels_router)
    dashboard.install(app)
    return app


def app_from_environment() -> FastAPI:
    """The app with settings from ``GALVANI_API_*``: the factory each server process runs."""
    settings = ApiSettings()
    configure_logging(settings.log_level)
    return create_app(settings)


def main() -> int:
    """Run the API: one server process, or ``workers`` of them sharing the port
    (``services/api/server.py``)."""
    settings = ApiSettings()
    configure_logging(settings.log_level)
    if settings.workers == 1:
        server.serve()
        return 0
    return server.supervise(settings.workers)


if __name__ == "__main__":
    sys.exit(main())
