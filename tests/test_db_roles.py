"""Least privilege in the database: each service's role may do what its work needs and no more
(``services/common/migrations/grants.py``), on TimescaleDB and on plain PostgreSQL."""

from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from deploy.stack.options import Secrets
from deploy.stack.runner import service_database_urls
from services.common.db_roles import service_url
from services.common.migrate import upgrade
from services.common.migrations import grants
from services.common.migrations.grants import ServiceRole
from services.maintenance.jobs import run_pass
from tests.roles import as_service, create_logins, refused

INGEST, RULES, API, MAINTENANCE = (
    ServiceRole.INGEST,
    ServiceRole.RULES,
    ServiceRole.API,
    ServiceRole.MAINTENANCE,
)

# What the schema holds that grants.py must list: tables, partitioned tables, views and
# materialized views that are not a partition, sequences no identity column owns, and
# functions no extension made.
UNLISTED_RELATIONS = """
SELECT c.relname, c.relkind::text FROM pg_class c
WHERE c.relnamespace = current_schema()::regnamespace
  AND c.relkind IN ('r', 'p', 'v', 'm', 'S') AND NOT c.relispartition
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                  AND d.objid = c.oid AND d.deptype IN ('i', 'e'))
"""
UNLISTED_FUNCTIONS = (
    "SELECT DISTINCT p.proname FROM pg_proc p"  # noqa: S608 - constant text
    " WHERE p.pronamespace = current_schema()::regnamespace AND " + grants.NOT_FROM_AN_EXTENSION
)


def schema_objects(url: str) -> tuple[set[str], set[str], set[str]]:
    """(tables and views, sequences, functions) of the schema at ``url``."""
    with psycopg.connect(url) as conn:
        relations = conn.execute(UNLISTED_RELATIONS).fetchall()
        functions = {str(name) for (name,) in conn.execute(UNLISTED_FUNCTIONS).fetchall()}
    tables = {str(name) for name, kind in relations if kind != "S"}
    sequences = {str(name) for name, kind in relations if kind == "S"}
    return tables, sequences, functions


@pytest.fixture
def plain_url(empty_database_url: str) -> str:
    """A database migrated for plain PostgreSQL (partitions, no TimescaleDB)."""
    upgrade(empty_database_url, storage="plain")
    return empty_database_url


def test_every_table_sequence_and_function_has_an_entry_in_the_grants_map(
    database_url: str, plain_url: str
) -> None:
    for url in (database_url, plain_url):
        tables, sequences, functions = schema_objects(url)
        assert tables - grants.TABLES.keys() == set(), "tables with no grants listed"
        assert sequences - grants.SEQUENCES.keys() == set(), "sequences with no grants listed"
        assert functions - grants.FUNCTIONS.keys() == set(), "functions with no grants listed"
    # Both storages together hold every table listed: no entry outlives its table.
    timescale, plain = schema_objects(database_url)[0], schema_objects(plain_url)[0]
    assert grants.TABLES.keys() - (timescale | plain) == set()


@pytest.mark.parametrize("role", list(ServiceRole))
@pytest.mark.parametrize(
    "statement",
    [
        "ALTER TABLE samples ADD COLUMN note text",
        "DROP TABLE devices",
        "TRUNCATE alerts",
        "CREATE TABLE stash (x text)",
        "ALTER TABLE api_keys DISABLE TRIGGER ALL",
        "CREATE INDEX ON dead_letters (topic)",
        "SELECT drop_chunks('samples', older_than => now())",
        "ALTER FUNCTION galvani_drop_old_samples(timestamptz) SECURITY INVOKER",
    ],
)
def test_no_service_role_may_change_drop_or_empty_the_schema(
    database_url: str, role: ServiceRole, statement: str
) -> None:
    assert refused(as_service(database_url, role), statement)


@pytest.mark.parametrize(
    ("role", "statement"),
    [
        (API, "DELETE FROM samples"),
        (API, "DELETE FROM dead_letters"),
        (
            API,
            "INSERT INTO telemetry_messages (device_id, seq, ts, samples, received_at)"
            " VALUES ('dev-1', 1, now(), 1, now())",
        ),
        (API, "INSERT INTO rule_samples SELECT * FROM rule_samples"),
        (API, "SELECT galvani_drop_old_samples(now())"),
        (API, "SELECT * FROM alert_triggers"),
        (RULES, "SELECT * FROM brands"),
        (INGEST, "SELECT key_hash FROM api_keys"),
        (INGEST, "UPDATE api_keys SET revoked_at = now()"),
        (INGEST, "SELECT payload FROM dead_letters"),
        (INGEST, "UPDATE alerts SET state = 'resolved', resolved_at = now()"),
        (INGEST, "DELETE FROM samples"),
        (RULES, "INSERT INTO samples SELECT * FROM samples"),
        (RULES, "SELECT key_hash FROM api_keys"),
        (RULES, "SELECT payload FROM dead_letters"),
        (MAINTENANCE, "SELECT key_hash FROM api_keys"),
        (MAINTENANCE, "SELECT payload FROM dead_letters"),
        (MAINTENANCE, "DELETE FROM devices"),
        (MAINTENANCE, "DELETE FROM samples"),
    ],
)
def test_each_service_role_is_refused_what_its_work_does_not_need(
    database_url: str, role: ServiceRole, statement: str
) -> None:
    assert refused(as_service(database_url, role), statement)


def test_a_chunk_ingest_creates_carries_the_hypertables_grants(database_url: str) -> None:
    """TimescaleDB gives new chunks the hypertable's grants: reached directly, a chunk refuses
    what the hypertable refuses."""
    long_ago = datetime(2001, 1, 1, tzinfo=UTC)
    with psycopg.connect(as_service(database_url, INGEST)) as ingest:
        ingest.execute(
            "INSERT INTO samples (device_id, ts, seq, received_at) VALUES ('dev-1', %s, 1, now())",
            [long_ago],
        )
    with psycopg.connect(database_url) as owner:
        chunks = owner.execute(
            "SELECT format('%%I.%%I', chunk_schema, chunk_name) FROM timescaledb_information.chunks"
            " WHERE hypertable_name = 'samples' AND range_start <= %s AND range_end > %s",
            [long_ago, long_ago],
        ).fetchall()
    if not chunks:
        pytest.skip("samples is not a hypertable here (plain PostgreSQL)")
    [(chunk,)] = chunks
    api = as_service(database_url, API)
    with psycopg.connect(api) as conn:
        assert conn.execute(f"SELECT count(*) FROM {chunk}").fetchone() == (1,)  # noqa: S608
    assert refused(api, f"DELETE FROM {chunk}")  # noqa: S608
    assert refused(as_service(database_url, INGEST), f"DELETE FROM {chunk}")  # noqa: S608


@pytest.mark.parametrize("storage", ["timescale", "plain"])
def test_maintenance_does_its_pass_as_its_own_role(
    database_url: str, plain_url: str, storage: str
) -> None:
    """Rollups, retention (dropping chunks or partitions: the owner's right, lent through
    SECURITY DEFINER functions) and new partitions, all as the maintenance role."""
    url = database_url if storage == "timescale" else plain_url
    now = datetime.now(UTC)
    old = now - timedelta(days=120)
    with psycopg.connect(url) as owner:
        if storage == "plain":  # a partition of its own, for retention to drop
            owner.execute("SELECT galvani_ensure_partitions(%s::date, %s::date)", [old, old])
        owner.execute(
            "INSERT INTO samples (device_id, ts, seq, i_ua, received_at)"
            " VALUES ('dev-1', %s, 1, 300, now()), ('dev-1', %s, 2, 300, now())",
            [old, now - timedelta(minutes=5)],
        )
    with psycopg.connect(as_service(url, MAINTENANCE), autocommit=True) as conn:
        result = run_pass(conn, now, timedelta(hours=2))
        if storage == "plain":
            ahead = (now + timedelta(days=30)).date()
            created = conn.execute(
                "SELECT galvani_ensure_partitions(%s, %s)", [ahead, ahead]
            ).fetchone()
            assert created == (1,)
    with psycopg.connect(url) as owner:
        kept = owner.execute("SELECT count(*) FROM samples").fetchone()
        rolled = owner.execute("SELECT sum(n) FROM samples_1m").fetchone()
    assert kept == (1,)
    assert rolled == (1,)
    assert result.dropped == 1


def test_grants_are_applied_again_by_every_upgrade(database_url: str) -> None:
    """A grant changed by hand is put back as the map says on the next ``upgrade``."""
    with psycopg.connect(database_url) as owner:
        owner.execute("GRANT DELETE ON samples TO galvani_api")
    api = as_service(database_url, API)
    assert not refused(api, "DELETE FROM samples WHERE false")
    upgrade(database_url)
    assert refused(api, "DELETE FROM samples WHERE false")


def test_a_service_url_carries_the_login_and_an_escaped_password() -> None:
    admin = "postgresql://galvani:s3cret@127.0.0.1:5432/galvani?sslmode=disable"
    url = service_url(admin, ServiceRole.INGEST, "p@ss:/word")
    assert url == (
        "postgresql://galvani_ingest_login:p%40ss%3A%2Fword@127.0.0.1:5432/galvani?sslmode=disable"
    )
    assert psycopg.conninfo.conninfo_to_dict(url)["password"] == "p@ss:/word"


def test_make_run_gives_each_service_a_login_of_its_own_with_a_kept_password(
    database_url: str, tmp_path: Path
) -> None:
    secrets = Secrets(tmp_path / "secrets")
    try:
        urls = service_database_urls(database_url, secrets)
        assert service_database_urls(database_url, secrets) == urls  # reused, not regenerated
        assert set(urls) == set(ServiceRole)
        for role, url in urls.items():
            assert (tmp_path / "secrets" / f"db-{role.service}").stat().st_mode & 0o077 == 0
            with psycopg.connect(url) as conn:
                row = conn.execute(
                    "SELECT current_user, rolsuper, rolcreaterole, pg_has_role(%s, 'MEMBER')"
                    " FROM pg_roles WHERE rolname = current_user",
                    [role.value],
                ).fetchone()
            assert row == (role.login, False, False, True)
    finally:
        create_logins(database_url)  # the suite's own passwords again


def test_only_a_role_that_may_create_roles_passes_for_one_that_can_make_the_groups(
    database_url: str,
) -> None:
    with psycopg.connect(database_url) as owner:
        assert grants._may_create_roles(owner)
    with psycopg.connect(as_service(database_url, API)) as api:
        assert not grants._may_create_roles(api)


def test_a_column_grant_names_only_the_columns_of_this_revision() -> None:
    """The grants are applied after every migration run, also at a revision before the one
    adding a column (test_reserved_client_ids upgrades to 0006 first)."""
    grant = grants.OnColumns(select=("id", "silent_since"), update=("silent_since",))
    assert grant.privileges({"id", "silent_since", "online"}) == (
        "SELECT (id, silent_since), UPDATE (silent_since)"
    )
    assert grant.privileges({"id", "online"}) == "SELECT (id)"
    assert grant.privileges(set()) == ""
