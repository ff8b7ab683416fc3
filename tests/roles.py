"""The services' database roles in the suite: login roles with passwords made for this run.

Services under test connect as their own role (``services/common/migrations/grants.py``), so
the whole suite runs them with least privilege; tests set up and inspect data as the
database's owner (conftest's ``database_url``).
"""

from typing import Final

import psycopg
from psycopg import errors

from deploy.stack.postgres import new_password
from services.common.db import connect
from services.common.db_roles import ensure_login, service_url
from services.common.migrations.grants import ServiceRole

# Generated per test process; the cluster is the run's own.
PASSWORDS: Final = {role: new_password() for role in ServiceRole}


def create_logins(admin_url: str) -> None:
    """Make every service's login role (roles are the cluster's, not one database's)."""
    with connect(admin_url) as conn:
        for role, password in PASSWORDS.items():
            ensure_login(conn, role, password)


def as_service(database_url: str, role: ServiceRole) -> str:
    """``database_url`` (the owner's) as ``role``'s login."""
    return service_url(database_url, role, PASSWORDS[role])


def refused(url: str, statement: str) -> bool:
    """Whether PostgreSQL refuses ``statement`` to the role of ``url`` for want of privilege."""
    with psycopg.connect(url) as conn:
        try:
            conn.execute(statement)
        except errors.InsufficientPrivilege:
            return True
        finally:
            conn.rollback()
    return False
