"""Keeping devices off the NATS cluster: bans in the database, sessions ended by takeover.

On Mosquitto a ban is a line in the broker directory's ban file and a password file rendered
without the device, reloaded with SIGHUP (services.common.broker_auth). On the cluster every
login is decided by the auth-callout responder (services/broker_access) from the database, so
a ban is a ``device_bans`` row (migration 0016) that it reads at the device's next CONNECT,
and the device's live connection is ended by MQTT 3.1.1 session takeover through any node's
MQTT port as a backend account (the gateway's client-id registry spans the cluster, so one
node ends a session held on another). Nothing is rendered and nothing is reloaded: a
provisioning or decommission takes effect at the device's next CONNECT.

Ingest's throttle keeps its bans through :class:`DatabaseBans` and ends sessions itself, after
the ban's transaction has committed (services/ingest/throttle.py), so the reconnect a takeover
provokes meets the ban. :meth:`NatsDeviceAccess.ban` ends the sessions before its caller's
transaction commits: a device that reconnects in between (the device agent waits a second or
more) is admitted once more; callers that can should use :meth:`NatsDeviceAccess.record_bans`,
commit, then :meth:`NatsDeviceAccess.end_session`.
"""

import logging
import ssl
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from services.common import mqtt311
from services.common.broker_certificates import TAKEOVER_TIMEOUT_S, end_device_session
from services.common.db import Conn
from services.common.settings import ServiceSettings

log = logging.getLogger(__name__)


class NatsDeviceAccess:
    """Bans and session ends on a NATS cluster, as one backend account over MQTT 3.1.1."""

    def __init__(
        self,
        mqtt_nodes: Sequence[tuple[str, int]],
        username: str,
        password: str,
        tls: ssl.SSLContext | None,
        *,
        timeout_s: float = TAKEOVER_TIMEOUT_S,
    ) -> None:
        if not mqtt_nodes:
            raise ValueError("no MQTT nodes to end sessions through")
        self.mqtt_nodes = list(mqtt_nodes)
        self.username = username
        self.password = password
        self.tls = tls
        self.timeout_s = timeout_s
        self._next = 0  # the node tried first by the next takeover

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> "NatsDeviceAccess":
        """The service's own account on the nodes of ``mqtt_nodes``."""
        return cls(
            settings.mqtt_addresses(),
            settings.mqtt_username,
            settings.mqtt_password.get_secret_value(),
            settings.mqtt_tls_context(),
        )

    def sync_credentials(self, conn: Conn) -> int:
        """How many devices may log in; nothing to render or reload (the callout reads the
        database at each CONNECT)."""
        row = conn.execute(
            "SELECT count(*) FROM devices"
            " WHERE credential_hash IS NOT NULL AND decommissioned_at IS NULL"
        ).fetchone()
        return int(str(row[0])) if row else 0

    def record_bans(self, conn: Conn, bans: dict[str, float]) -> None:
        """Write each ban (device id to its end, Unix seconds) in the caller's transaction."""
        record_bans(conn, bans)

    def ban(self, conn: Conn, bans: dict[str, float]) -> bool:
        """Record ``bans`` and end each device's session; whether every takeover was
        accepted (a device not connected counts as ended)."""
        record_bans(conn, bans)
        ended = [self.end_session(device_id) for device_id in bans]  # every one, not the first
        return all(ended)

    def bans(self, conn: Conn) -> dict[str, float]:
        """The bans in force: device id to the end of its ban (Unix seconds)."""
        now = time.time()
        return {d: until for d, until in every_ban(conn).items() if until > now}

    def lift_expired_bans(self, conn: Conn, now: float | None = None) -> list[str]:
        """Delete the bans that ended by ``now`` (default: the current time); return their
        devices."""
        return lift_expired_bans(conn, now)

    def end_session(self, device_id: str) -> bool:
        """End ``device_id``'s connection to the cluster, if it has one, by session takeover
        through the first node that answers; whether one accepted it."""
        count = len(self.mqtt_nodes)
        for step in range(count):
            host, port = self.mqtt_nodes[(self._next + step) % count]
            if end_device_session(
                host,
                port,
                self.username,
                self.password,
                self.tls,
                device_id,
                self.timeout_s,
                protocol=mqtt311.PROTOCOL_LEVEL,
            ):
                self._next = (self._next + step + 1) % count
                return True
        log.error("could not end %s's session through any of %d nodes", device_id, count)
        return False


def record_bans(conn: Conn, bans: dict[str, float]) -> None:
    """Write each ban (device id to its end, Unix seconds) in the caller's transaction; a later
    end wins over an earlier one. Unknown devices are skipped."""
    if not bans:
        return
    conn.execute(
        "INSERT INTO device_bans (device_id, until)"
        " SELECT d.id, b.until FROM devices d"
        " JOIN unnest(%s::text[], %s::timestamptz[]) AS b(device_id, until)"
        " ON b.device_id = d.id"
        " ON CONFLICT (device_id) DO UPDATE"
        " SET until = GREATEST(device_bans.until, EXCLUDED.until)",
        [list(bans), [datetime.fromtimestamp(u, UTC) for u in bans.values()]],
    )


def every_ban(conn: Conn) -> dict[str, float]:
    """Every ``device_bans`` row, ended or not: device id to the end of its ban (Unix
    seconds)."""
    rows = conn.execute("SELECT device_id, extract(epoch FROM until) FROM device_bans").fetchall()
    return {str(device_id): float(str(until)) for device_id, until in rows}


def lift_expired_bans(conn: Conn, now: float | None = None) -> list[str]:
    """Delete the bans that ended by ``now`` (default: the current time); return their devices.
    The responder already admits a device once its ``until`` has passed: this keeps the table
    to the bans in force."""
    moment = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    rows = conn.execute(
        "DELETE FROM device_bans WHERE until <= %s RETURNING device_id", [moment]
    ).fetchall()
    return sorted(str(row[0]) for row in rows)


class DatabaseBans:
    """Ingest's throttle's ban store on NATS (services/ingest/throttle.py BanStore): rows the
    auth-callout responder reads. It refuses only new logins, so every banned device's live
    session is ended by takeover, after the ban's transaction has committed."""

    takeover_all = True

    def ban(self, conn: Conn, bans: dict[str, float]) -> bool:
        """Record ``bans`` in the caller's transaction; always applied once it commits."""
        record_bans(conn, bans)
        return True

    def current(self, transaction: Callable[[Callable[[Conn], None]], None]) -> dict[str, float]:
        """Every ban, ended or not (read in a transaction of the worker's database)."""
        found: dict[str, float] = {}

        def read(conn: Conn) -> None:
            found.clear()
            found.update(every_ban(conn))

        transaction(read)
        return found

    def lift_expired(self, conn: Conn, now: float) -> list[str]:
        """Delete the bans that ended by ``now``; their devices."""
        return lift_expired_bans(conn, now)
