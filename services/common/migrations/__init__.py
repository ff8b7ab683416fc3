"""The database schema's Alembic migrations (``versions/``) and what they share (``ddl``)."""
