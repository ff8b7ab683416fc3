"""Bans in force, for a broker that asks the database at every CONNECT.

* ``device_bans``: one row per device kept off the NATS cluster until ``until``: ingest's
  throttle writes it (a later end wins) when a device floods, and deletes it when the ban
  has ended (services.common.broker.nats_access). The cluster's auth-callout responder
  (services/broker_access) refuses a device whose row ends in the future. On Mosquitto the
  ban lives in the broker directory's ban file instead (services.common.broker_auth), which the
  password-file rendering reads; ``device_throttles`` (migration 0012) keeps every ban's
  history for the brand on both engines.
* The role ``galvani_broker_access``: the responder's, reading devices and their bans and
  nothing else.
"""

from services.common.migrations.ddl import execute

revision = "0016"
down_revision = "0015"


def upgrade() -> None:
    execute("""
    CREATE TABLE device_bans (
        device_id text PRIMARY KEY REFERENCES devices (id) ON DELETE CASCADE,
        until timestamptz NOT NULL
    )""")
    execute("CREATE INDEX device_bans_until_idx ON device_bans (until)")


def downgrade() -> None:
    execute("DROP TABLE device_bans")
