"""Who may do what in Galvani's database: a role per service and its grants, in one map.

The migrations run as the role that owns every table (the cluster's superuser under
``make run``); the services do not. Each service connects as a login role that is a member of
its group role below and holds nothing else: no ownership (so no ALTER, DROP or TRUNCATE), no
REFERENCES or TRIGGER, no CREATE in the schema. What each group may do is :data:`TABLES`,
:data:`SEQUENCES` and :data:`FUNCTIONS`; :func:`apply` makes the database say exactly that,
after every upgrade (``migrations/env.py``), so a table a later migration adds is covered the
moment its entry is here, and a privilege removed here is revoked there. The suite checks that
every table, view, sequence and function in the schema has an entry
(``tests/test_db_roles.py``), so a new one cannot be forgotten.

TimescaleDB passes a hypertable's grants on to its chunks, existing and new (and a continuous
aggregate's to its materialization), and checks only the hypertable's when a statement goes
through it; a declarative partition is likewise reached through its parent. Creating a chunk
needs INSERT on the hypertable, which ingest has. Dropping chunks (``drop_chunks``) and
creating or dropping partitions need the table's owner: maintenance gets them through
SECURITY DEFINER functions owned by the migration role, with a fixed ``search_path``, whose
only inputs are a timestamp or two dates.

Group roles are NOLOGIN and have no password: the migrations never handle a secret. Login
roles (``<group>_login``) are made by whoever holds the passwords
(``services.common.db_roles.ensure_login``: ``make run``, the suite).
"""

from collections.abc import Collection
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from services.common.db import Conn


class ServiceRole(StrEnum):
    """A service's group role."""

    INGEST = "galvani_ingest"
    RULES = "galvani_rules"
    API = "galvani_api"
    MAINTENANCE = "galvani_maintenance"
    NOTIFY = "galvani_notify"
    BROKER_ACCESS = "galvani_broker_access"

    @property
    def service(self) -> str:
        """The service's name (``ingest``), as in ``services/<name>`` and run.json."""
        return self.value.removeprefix("galvani_")

    @property
    def login(self) -> str:
        """The login role the service connects as."""
        return f"{self.value}_login"


INGEST, RULES, API, MAINTENANCE, NOTIFY, BROKER_ACCESS = (
    ServiceRole.INGEST,
    ServiceRole.RULES,
    ServiceRole.API,
    ServiceRole.MAINTENANCE,
    ServiceRole.NOTIFY,
    ServiceRole.BROKER_ACCESS,
)

READ = "SELECT"
APPEND = "SELECT, INSERT"
UPSERT = "SELECT, INSERT, UPDATE"
EDIT = "SELECT, UPDATE"
OWN = "SELECT, INSERT, UPDATE, DELETE"


@dataclass(frozen=True)
class OnColumns:
    """Privileges on some columns of a table only (REVOKE ALL on the table revokes them too)."""

    select: tuple[str, ...] = ()
    update: tuple[str, ...] = ()

    def privileges(self, existing: Collection[str]) -> str:
        """The GRANT's privilege list over the columns that exist now ("" when none do): the
        grants are applied after every migration run, so also at a revision before the one
        that adds a column."""
        parts = []
        for privilege, columns in (("SELECT", self.select), ("UPDATE", self.update)):
            present = [column for column in columns if column in existing]
            if present:
                parts.append(f"{privilege} ({', '.join(present)})")
        return ", ".join(parts)


# Table (or view) -> what each group may do with it; a group not named may do nothing.
TABLES: Final[dict[str, dict[ServiceRole, str | OnColumns]]] = {
    # Alembic's own: the migration role's alone.
    "alembic_version": {},
    "galvani_meta": {INGEST: READ, RULES: READ, API: READ, MAINTENANCE: EDIT},
    # Tenancy and keys: the API's; rules read users (stage, contraindications) for their rules.
    "brands": {API: APPEND},
    "api_keys": {API: UPSERT},
    "users": {RULES: READ, API: UPSERT},
    # Devices: provisioned by the API; ingest keeps their counters and reported state, rules
    # the table version they should have; the NATS cluster's auth callout checks logins.
    # Maintenance marks a silent device offline and back online (migration 0017): the columns
    # it judges by, and the two it sets, nothing else.
    "devices": {
        INGEST: EDIT,
        RULES: EDIT,
        API: UPSERT,
        BROKER_ACCESS: READ,
        MAINTENANCE: OnColumns(
            select=("id", "online", "last_received_at", "silent_since"),
            update=("online", "silent_since"),
        ),
    },
    # Device data: ingest writes it, the API reads it, maintenance rolls it up and trims it.
    "samples": {INGEST: APPEND, API: READ, MAINTENANCE: READ},
    "samples_1m": {API: READ, MAINTENANCE: "SELECT, INSERT, DELETE"},
    "samples_1h": {API: READ, MAINTENANCE: "SELECT, INSERT, DELETE"},
    "rollup_dirty": {INGEST: APPEND, MAINTENANCE: "SELECT, DELETE"},
    # Samples whose device clock is off, kept by receipt time (migration 0010).
    "suspect_samples": {INGEST: APPEND, API: READ, MAINTENANCE: "SELECT, DELETE"},
    "telemetry_messages": {INGEST: APPEND, MAINTENANCE: "SELECT, DELETE"},
    "events": {INGEST: APPEND, API: READ},
    "state_reports": {INGEST: APPEND},
    # Maintenance logs the offline and online it reports for silent devices (migration 0017).
    "presence_log": {INGEST: APPEND, RULES: READ, MAINTENANCE: "INSERT"},
    "sessions": {INGEST: UPSERT, API: READ},
    "message_conflicts": {INGEST: APPEND, API: READ, MAINTENANCE: "SELECT, DELETE"},
    # Dead letters: ingest only adds them (COPY), the API shows them to their brand.
    "dead_letters": {INGEST: "INSERT", API: READ},
    # Alerts: rules raise them, the API acknowledges and resolves them.
    "alerts": {RULES: UPSERT, API: EDIT},
    "alert_transitions": {RULES: APPEND, API: APPEND},
    "alert_triggers": {RULES: OWN},
    # The rules engine's own state.
    "rule_samples": {RULES: OWN},
    "rule_sessions": {RULES: OWN},
    "rule_reboots": {RULES: OWN},
    "brand_rule_thresholds": {RULES: READ, API: OWN},
    # Mode tables, their pushes and rollouts: ingest records a device's answer to a push.
    "mode_tables": {RULES: READ, API: APPEND},
    "config_pushes": {INGEST: EDIT, RULES: UPSERT, API: UPSERT},
    "rollouts": {RULES: EDIT, API: UPSERT},
    "rollout_devices": {RULES: READ, API: UPSERT},
    # The API's shared rate limits (migration 0011).
    "rate_limit_buckets": {API: OWN},
    "rate_limit_windows": {API: OWN},
    # Bans of flooding devices (migration 0012): ingest records them, the rules raise them as
    # alerts to the device's brand (which the API shows: it reads alerts, not this table),
    # maintenance trims them with the retention period.
    "device_throttles": {INGEST: "INSERT", RULES: READ, MAINTENANCE: "SELECT, DELETE"},
    # Bans in force on the NATS cluster (migration 0016): ingest sets and lifts them, the
    # auth callout refuses the devices they name.
    "device_bans": {INGEST: OWN, BROKER_ACCESS: READ},
    # Device certificates (migration 0013): the API issues and revokes them and keeps the
    # brands' factory CAs; the rules' sweep raises certificate_expiring from their expiry.
    "device_certificates": {RULES: READ, API: UPSERT},
    "brand_device_authorities": {API: UPSERT},
    # Alert notifications (migration 0014): the API keeps a brand's channels and queues their
    # test notifications; the dispatcher reads the channels and records each delivery. The
    # outbox rows of alert transitions are written by a definer trigger (below), so neither
    # the rules nor the API's acknowledge and resolve need a grant for them.
    "notification_channels": {API: UPSERT, NOTIFY: READ},
    "notifications": {API: APPEND, NOTIFY: EDIT},
}

# Sequences a statement calls nextval() on. Identity columns' sequences need no grant
# (PostgreSQL draws from them without a permission check), so they are not listed.
SEQUENCES: Final[dict[str, dict[ServiceRole, str]]] = {
    # nextval() in the trigger on every insert and update of alerts.
    "alert_changes": {RULES: "USAGE", API: "USAGE"},
}


@dataclass(frozen=True)
class FunctionGrant:
    """Who may call a function of Galvani's, and whether it runs as its owner."""

    execute: tuple[ServiceRole, ...] = ()
    # Everyone may call it (a pure helper).
    public: bool = False
    # Runs with the owner's rights (SECURITY DEFINER): for what only the owner may do.
    definer: bool = False


FUNCTIONS: Final[dict[str, FunctionGrant]] = {
    # Maintenance's jobs. Dropping chunks or partitions, and attaching partitions, needs the
    # owner of samples; the rollup refresh and the ledger trim need only the grants above.
    "galvani_drop_old_samples": FunctionGrant((MAINTENANCE,), definer=True),
    "galvani_ensure_partitions": FunctionGrant((MAINTENANCE,), definer=True),
    "galvani_refresh_rollups": FunctionGrant((MAINTENANCE,)),
    "galvani_drop_old_messages": FunctionGrant((MAINTENANCE,)),
    # The plain storage's own time_bucket (TimescaleDB's is the extension's): every service
    # may bucket times.
    "time_bucket": FunctionGrant(public=True),
    # Trigger functions: PostgreSQL checks EXECUTE when a trigger is created, not when it
    # fires, so nobody needs to call them.
    "galvani_alert_changed": FunctionGrant(),
    "galvani_alert_notify": FunctionGrant(),
    "galvani_key_revoked": FunctionGrant(),
    "galvani_notification_queued": FunctionGrant(),
    # Writes the outbox rows of an alert's transition as its owner, whoever changed the alert.
    "galvani_alert_outbox": FunctionGrant(definer=True),
}


# Objects an extension made (TimescaleDB's functions in the schema) are the extension's.
NOT_FROM_AN_EXTENSION: Final = (
    "NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass"
    " AND d.objid = p.oid AND d.deptype = 'e')"
)


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def apply(conn: Conn) -> None:
    """Create the group roles if missing and make every listed object's grants exactly the
    map's, in the caller's transaction (run as the objects' owner)."""
    existing_roles = {
        str(row[0]) for row in conn.execute("SELECT rolname FROM pg_roles").fetchall()
    }
    missing = [role for role in ServiceRole if role.value not in existing_roles]
    if missing and not _may_create_roles(conn):
        raise RuntimeError(
            f"the services' database roles ({', '.join(missing)}) do not exist and the role "
            "running the migrations may not create them: run them once as a role with "
            "CREATEROLE (or a superuser), or create these NOLOGIN roles first"
        )
    for role in missing:
        conn.execute(f"CREATE ROLE {_quoted(role)} NOLOGIN")
    roles = ", ".join(_quoted(role) for role in ServiceRole)
    [(schema,)] = conn.execute("SELECT current_schema()").fetchall()
    schema_name = _quoted(str(schema))
    # PostgreSQL before 15 lets everyone create tables in public; nobody but the owner may.
    conn.execute(f"REVOKE CREATE ON SCHEMA {schema_name} FROM PUBLIC")
    conn.execute(f"GRANT USAGE ON SCHEMA {schema_name} TO {roles}")
    relations = {
        str(name)
        for (name,) in conn.execute(
            "SELECT relname FROM pg_class WHERE relnamespace = current_schema()::regnamespace"
            " AND relkind IN ('r', 'p', 'v', 'm', 'S')"
        ).fetchall()
    }
    for kind, objects in (("TABLE", TABLES), ("SEQUENCE", SEQUENCES)):
        for name, privileges in objects.items():
            if name not in relations:
                continue  # not in this storage flavour, or not yet at this revision
            target = f"{kind} {schema_name}.{_quoted(name)}"
            conn.execute(f"REVOKE ALL ON {target} FROM PUBLIC, {roles}")
            for role, granted in privileges.items():
                if isinstance(granted, OnColumns):
                    granted = granted.privileges(_columns(conn, name))
                    if not granted:
                        continue
                conn.execute(f"GRANT {granted} ON {target} TO {_quoted(role)}")
    _apply_functions(conn, schema_name, roles)


def _columns(conn: Conn, table: str) -> set[str]:
    rows = conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass"
        " AND attnum > 0 AND NOT attisdropped",
        [_quoted(table)],
    ).fetchall()
    return {str(name) for (name,) in rows}


def _may_create_roles(conn: Conn) -> bool:
    row = conn.execute(
        "SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    return bool(row and row[0])


def _apply_functions(conn: Conn, schema_name: str, roles: str) -> None:
    # A definer function resolves names only where the migrations put them (the schemas on
    # this session's search path, TimescaleDB's included), never in a caller's temp schema.
    [(path,)] = conn.execute(
        "SELECT coalesce(string_agg(quote_ident(s), ', '), quote_ident(current_schema()))"
        " FROM unnest(current_schemas(false)) s"
    ).fetchall()
    for name, grant in FUNCTIONS.items():
        signatures = [
            str(signature)
            for (signature,) in conn.execute(
                "SELECT p.oid::regprocedure::text FROM pg_proc p"
                " WHERE p.pronamespace = current_schema()::regnamespace"
                f" AND p.proname = '{name}' AND {NOT_FROM_AN_EXTENSION}"
            ).fetchall()
        ]
        for signature in signatures:
            target = f"FUNCTION {signature}"
            conn.execute(f"REVOKE ALL ON {target} FROM PUBLIC, {roles}")
            grantees = ["PUBLIC"] if grant.public else [_quoted(role) for role in grant.execute]
            for grantee in grantees:
                conn.execute(f"GRANT EXECUTE ON {target} TO {grantee}")
            if grant.definer:
                conn.execute(f"ALTER {target} SECURITY DEFINER SET search_path = {path}, pg_temp")
            else:
                conn.execute(f"ALTER {target} SECURITY INVOKER")
