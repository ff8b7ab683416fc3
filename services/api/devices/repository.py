"""Devices of a brand: their state, sessions, events and mode-table pushes. Never commits: the
request's unit of work owns the transaction.

The reads dashboards poll run on the read-only unit (:class:`DeviceReadRepository`); the
endpoints that write, and the config view they answer with, on the read-write unit
(:class:`DeviceRepository`). Rows come back as the API's schemas (``class_row``).
"""

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from psycopg.rows import class_row

from services.api.devices.schemas import Device, DeviceCertificate, Event, PushRecord, Session
from services.api.repository import ReadRepository, Repository

SELECT: Final = """
SELECT d.id AS device_id, d.brand_id AS brand, d.model, d.user_id AS user, d.online,
       d.last_seen, d.fw, d.last_seq, d.seq_gaps, d.config_desired_version,
       d.config_reported_version,
       (SELECT count(*) FROM alerts a
         WHERE a.device_id = d.id AND a.state <> 'resolved')::integer AS open_alerts,
       d.provisioned_at, d.decommissioned_at, d.auth,
       (SELECT max(c.not_after) FROM device_certificates c
         WHERE c.device_id = d.id AND c.revoked_at IS NULL) AS not_after,
       d.seq_reused, d.seq_reused_at, d.seq_resets,
       d.seq_reset_at, d.suspect_samples_at
FROM devices d
"""
LIST: Final = """
WHERE d.brand_id = %(brand)s AND d.decommissioned_at IS NULL
  AND (%(online)s::boolean IS NULL OR d.online = %(online)s)
  AND (%(fw)s::text IS NULL OR d.fw = %(fw)s)
  AND (%(model)s::text IS NULL OR d.model = %(model)s)
  AND (%(after)s::text IS NULL OR d.id > %(after)s)
  AND (%(alerting)s::boolean IS NULL OR %(alerting)s = EXISTS (
        SELECT 1 FROM alerts a WHERE a.device_id = d.id AND a.state <> 'resolved'))
ORDER BY d.id LIMIT %(limit)s
"""
SESSIONS: Final = """
SELECT session, user_id AS user, mode, level, started_at, ended_at, duration_s, end_reason,
       output_s, samples,
       CASE WHEN out_samples > 0 THEN gel_ok_samples::real / out_samples END AS gel_ok_share
FROM sessions WHERE device_id = %(device)s
  AND (%(session)s::text IS NULL
       OR (coalesce(started_at, '-infinity'), session) < (coalesce(
             'epoch'::timestamptz + %(us)s::bigint * interval '1 microsecond', '-infinity'),
           %(session)s))
ORDER BY coalesce(started_at, '-infinity') DESC, session DESC LIMIT %(limit)s
"""
EVENTS: Final = """
SELECT seq, ts, type, session, body, received_at, ts_suspect FROM events
WHERE device_id = %(device)s AND (%(type)s::text IS NULL OR type = %(type)s)
  AND (%(before)s::bigint IS NULL OR seq < %(before)s)
ORDER BY seq DESC LIMIT %(limit)s
"""
CONFIG: Final = """
SELECT d.config_desired_version AS desired_version, p.payload AS desired,
       p.sha256 AS desired_sha256, d.config_reported_version AS reported_version,
       d.config_reported_status AS reported_status,
       d.config_reported_reason AS reported_reason,
       d.config_reported_sha256 AS reported_sha256
FROM devices d LEFT JOIN config_pushes p
  ON p.device_id = d.id AND p.version = d.config_desired_version
WHERE d.id = %s AND d.brand_id = %s
"""
HISTORY: Final = """
SELECT version, source, reason, sha256, issued_at, expires_at, published_at, superseded_at,
       answer_status, answer_reason, answered_at
FROM config_pushes WHERE device_id = %s ORDER BY version DESC LIMIT 100
"""
CERTIFICATES: Final = """
SELECT c.id, c.serial::text AS serial, c.fingerprint, c.not_before, c.not_after,
       c.issued_at, c.revoked_at, c.authority_id
FROM device_certificates c
WHERE c.device_id = %(device)s AND (%(before)s::bigint IS NULL OR c.id < %(before)s)
ORDER BY c.id DESC LIMIT %(limit)s
"""


@dataclass(frozen=True)
class DeviceAuthState:
    """How a device authenticates, and whether it is decommissioned."""

    auth: str
    decommissioned_at: datetime | None


@dataclass(frozen=True)
class ConfigState:
    """The table the backend wants a device to run and the one the device reports."""

    desired_version: int | None
    desired: Any  # the signed table (jsonb) as published, when there is one
    desired_sha256: str | None
    reported_version: int | None
    reported_status: str | None
    reported_reason: str | None
    reported_sha256: str | None


@dataclass(frozen=True)
class Decommissioning:
    """When a device was decommissioned (None: it is active)."""

    decommissioned_at: datetime | None


class DeviceRepository(Repository):
    """Devices on the read-write unit."""

    def lock(self, brand_id: str, device_id: str) -> Decommissioning | None:
        """Lock the brand's device against concurrent changes; None when it has no such device."""
        return self.one(
            "SELECT decommissioned_at FROM devices WHERE id = %s AND brand_id = %s FOR UPDATE",
            [device_id, brand_id],
            class_row(Decommissioning),
        )

    def auth_state(self, brand_id: str, device_id: str) -> DeviceAuthState | None:
        """How the brand's device authenticates, locked against concurrent changes; None when
        the brand has no such device."""
        return self.one(
            "SELECT auth, decommissioned_at FROM devices WHERE id = %s AND brand_id = %s"
            " FOR UPDATE",
            [device_id, brand_id],
            class_row(DeviceAuthState),
        )

    def config(self, brand_id: str, device_id: str) -> ConfigState | None:
        """The device's desired and reported tables; None when the brand has no such device."""
        return self.one(CONFIG, [device_id, brand_id], class_row(ConfigState))

    def pushes(self, device_id: str) -> list[PushRecord]:
        """The 100 latest tables pushed to the device, newest first, with its answers."""
        return self.all(HISTORY, [device_id], class_row(PushRecord))


class DeviceReadRepository(ReadRepository):
    """Devices on the read-only unit."""

    async def get(self, brand_id: str, device_id: str) -> Device | None:
        """The brand's device, or None (another brand's device is None too)."""
        query = SELECT + " WHERE d.id = %s AND d.brand_id = %s"
        return await self.one(query, [device_id, brand_id], class_row(Device))

    async def page(
        self,
        brand_id: str,
        *,
        online: bool | None,
        alerting: bool | None,
        fw: str | None,
        model: str | None,
        after_id: str | None,
        limit: int,
    ) -> list[Device]:
        """The brand's active devices in id order, after ``after_id``."""
        params = {
            "brand": brand_id,
            "online": online,
            "fw": fw,
            "model": model,
            "after": after_id,
            "alerting": alerting,
            "limit": limit,
        }
        return await self.all(SELECT + LIST, params, class_row(Device))

    async def sessions(
        self, device_id: str, *, before: tuple[int | None, str] | None, limit: int
    ) -> list[Session]:
        """A device's sessions, newest start first (keyset: started_at, session), before
        ``before`` (start in µs since the epoch, None for no start; session id)."""
        us, session = before if before else (None, None)
        params = {"device": device_id, "us": us, "session": session, "limit": limit}
        return await self.all(SESSIONS, params, class_row(Session))

    async def certificates(
        self, device_id: str, *, before_id: int | None, limit: int
    ) -> list[DeviceCertificate]:
        """The certificates issued to a device, newest first (serials in hexadecimal, as
        OpenSSL shows them; the column holds them in decimal)."""
        params = {"device": device_id, "before": before_id, "limit": limit}
        rows = await self.all(CERTIFICATES, params, class_row(DeviceCertificate))
        return [row.model_copy(update={"serial": f"{int(row.serial):x}"}) for row in rows]

    async def events(
        self, device_id: str, *, before_seq: int | None, type_: str | None, limit: int
    ) -> list[Event]:
        """A device's events, newest seq first."""
        params = {"device": device_id, "type": type_, "before": before_seq, "limit": limit}
        return await self.all(EVENTS, params, class_row(Event))
