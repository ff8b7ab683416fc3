"""The maintenance service as deployed, started by tests: ``python -m services.maintenance.main``
with ``GALVANI_MAINTENANCE_*`` settings, stopped by its pid (``Child.stop``)."""

import sys
from pathlib import Path

from deploy.stack.processes import Child, service_env, spawn
from services.common.settings import REPO_ROOT


def spawn_maintenance(database_url: str, log_path: Path, **settings: str | int) -> Child:
    """Start maintenance on ``database_url`` (its role's URL) with ``settings``, logging to
    ``log_path``."""
    return spawn(
        "maintenance",
        [sys.executable, "-m", "services.maintenance.main"],
        log_path,
        env=service_env("MAINTENANCE", database_url=database_url, **settings),
        cwd=REPO_ROOT,
    )
