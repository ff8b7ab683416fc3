"""Alembic environment: plain SQL migrations over psycopg 3, online only; after them, the
service roles' grants (``grants.py``)."""

import os

import psycopg
from alembic import context
from sqlalchemy import create_engine, pool

from services.common.migrations import grants

config = context.config


def _database_url() -> str:
    url = config.attributes.get("database_url") or os.environ.get("GALVANI_DATABASE_URL")
    if not url:
        raise SystemExit("GALVANI_DATABASE_URL is not set: point it at the database to migrate")
    # SQLAlchemy needs the dialect+driver spelled out to pick psycopg 3.
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return str(url)


def run_migrations_online() -> None:
    """Run every pending migration in one transaction per migration."""
    engine = create_engine(_database_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, transaction_per_migration=True)
        with context.begin_transaction():
            context.run_migrations()
        if connection.in_transaction():
            connection.commit()  # what Alembic read when there was nothing to run
        # Every service role's grants as grants.py says, whatever revision this ended at.
        with connection.begin():
            driver = connection.connection.driver_connection
            assert isinstance(driver, psycopg.Connection)
            grants.apply(driver)
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported: they depend on the server")
run_migrations_online()
