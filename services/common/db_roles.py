"""The services' login roles: made by whoever holds their passwords, used through their URLs.

The migrations create one NOLOGIN group role per service and give it its grants
(``services/common/migrations/grants.py``). A service connects as ``<group>_login``, a member
of its group with a password and no rights of its own. ``make run`` generates the passwords
(``.galvani/secrets/db-<service>``, owner-only) and the suite its own; neither has a default.
"""

from urllib.parse import quote, urlsplit, urlunsplit

from psycopg import sql

from services.common.db import Conn
from services.common.migrations.grants import ServiceRole

# The SCRAM verifier is computed here and sent instead of the password, so the password is in
# no statement the server could log (libpq's PQencryptPasswordConn, as psql's \password).
PASSWORD_ALGORITHM = b"scram-sha-256"


def ensure_login(conn: Conn, role: ServiceRole, password: str) -> None:
    """Create (or update) ``role``'s login role with ``password``, a member of ``role`` only.

    Run as a role that may create roles (the migration role), after the migrations created
    the group; commits nothing itself.
    """
    login = role.login
    verifier = conn.pgconn.encrypt_password(
        password.encode(), login.encode(), PASSWORD_ALGORITHM
    ).decode()
    exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [login]).fetchone()
    verb = sql.SQL("ALTER ROLE" if exists else "CREATE ROLE")
    conn.execute(
        sql.SQL(
            "{} {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT"
            " PASSWORD {}"
        ).format(verb, sql.Identifier(login), sql.Literal(verifier))
    )
    conn.execute(
        sql.SQL("GRANT {} TO {}").format(sql.Identifier(role.value), sql.Identifier(login))
    )


def service_url(admin_url: str, role: ServiceRole, password: str) -> str:
    """``admin_url`` (a ``postgresql://`` URL) with ``role``'s login and password instead."""
    parts = urlsplit(admin_url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError("the database URL must be a postgresql:// URL")
    host = parts.netloc.rpartition("@")[2]
    credentials = f"{quote(role.login, safe='')}:{quote(password, safe='')}"
    return urlunsplit(parts._replace(netloc=f"{credentials}@{host}"))
