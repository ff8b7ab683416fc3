"""Rate limits every API process shares, and revocations the alert streams hear at once.

* ``rate_limit_buckets``: a token bucket per API key (``key:<id>``): ``tokens`` as of
  ``updated_at``, and how many the last lease took (``last_granted``); the API takes tokens
  from it in one UPSERT, a lease of several at a time, so the limit holds across API
  processes without a write per request.
* ``rate_limit_windows``: fixed windows of failures: failed authentications per source
  address (``addr:<ip>``) and per presented key prefix (``prefix:<gvk_ and 6 characters>``),
  provisioning conflicts per key (``conflict:<id>``). One UPSERT counts a failure and starts
  a new window when the last one has ended.

Both are UNLOGGED: no WAL per request, and after a crash PostgreSQL empties them, which only
resets the limits. Rows of ended windows and idle buckets are deleted by the API
(``services/api/rate_limit.py``).

* ``galvani_key_revoked``: when a key is revoked, ``pg_notify('galvani_alerts', {"key": id})``
  wakes the API's alert streams of that key, which check it again and close (delivered at
  commit, never for a rollback).
"""

from services.common.migrations.ddl import execute

revision = "0011"
down_revision = "0010"


def upgrade() -> None:
    execute("""
    CREATE UNLOGGED TABLE rate_limit_buckets (
        bucket text PRIMARY KEY,
        tokens double precision NOT NULL,
        updated_at timestamptz NOT NULL,
        last_granted integer NOT NULL
    )""")
    execute("""
    CREATE UNLOGGED TABLE rate_limit_windows (
        bucket text PRIMARY KEY,
        window_start timestamptz NOT NULL,
        failures integer NOT NULL CHECK (failures > 0)
    )""")
    execute("""
    CREATE FUNCTION galvani_key_revoked() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('galvani_alerts', json_build_object('key', NEW.id)::text);
        RETURN NULL;
    END $$""")
    execute("""
    CREATE TRIGGER api_keys_revoked AFTER UPDATE OF revoked_at ON api_keys
        FOR EACH ROW WHEN (OLD.revoked_at IS NULL AND NEW.revoked_at IS NOT NULL)
        EXECUTE FUNCTION galvani_key_revoked()""")


def downgrade() -> None:
    execute("DROP TRIGGER api_keys_revoked ON api_keys")
    execute("DROP FUNCTION galvani_key_revoked()")
    execute("DROP TABLE rate_limit_windows")
    execute("DROP TABLE rate_limit_buckets")
