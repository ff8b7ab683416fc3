"""Ingest: every device message into PostgreSQL/TimescaleDB once, acknowledged after commit."""
