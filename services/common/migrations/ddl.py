"""How the migrations run SQL: each statement as written, on Alembic's connection.

A migration must mean the same thing whatever the code around it later becomes, so this module
only passes SQL through; whatever a migration's SQL depends on is written out in the migration.
"""

from alembic import op
from sqlalchemy import text


def execute(sql: str) -> None:
    """Run one statement (or one DO / CREATE FUNCTION block) in the migration's transaction."""
    op.execute(text(sql))


def scalar(sql: str) -> object:
    """The first column of a query's first row (None when it returns no row)."""
    return op.get_bind().execute(text(sql)).scalar()


def column(sql: str) -> list[str]:
    """The first column of every row a query returns, as text."""
    return [str(value) for value in op.get_bind().execute(text(sql)).scalars()]
