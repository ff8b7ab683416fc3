"""Apply the database migrations from code (the run command and tests use this).

``alembic upgrade head`` from the repository root does the same from a shell.
"""

import sys
from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def alembic_config(database_url: str, *, storage: str = "auto") -> Config:
    """An Alembic config for ``database_url``; ``storage="plain"`` skips TimescaleDB."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["database_url"] = database_url
    config.attributes["storage"] = storage
    return config


def upgrade(database_url: str, *, storage: str = "auto") -> None:
    """Bring the database to the newest schema (a no-op when it is already there)."""
    command.upgrade(alembic_config(database_url, storage=storage), "head")


def main() -> None:
    """``python -m services.common.migrate URL [auto|plain]``."""
    if len(sys.argv) not in (2, 3):
        raise SystemExit("usage: python -m services.common.migrate DATABASE_URL [auto|plain]")
    upgrade(sys.argv[1], storage=sys.argv[2] if len(sys.argv) == 3 else "auto")


if __name__ == "__main__":
    main()
