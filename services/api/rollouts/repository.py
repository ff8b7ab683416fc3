"""Rollouts of a brand: the SQLModel rows they are steered through, their targets, and the view
the API answers with. Never commits: the request's unit of work owns the transaction."""

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

from psycopg.rows import class_row, dict_row
from sqlmodel import select

from services.api.models import ModeTableRow, RolloutRow
from services.api.repository import Repository
from services.api.rollouts.schemas import RolloutFields

# One statement for a page of rollouts (or one), each with its progress and canary health.
# ``progress``: targets per "canary.<state>" / "rest.<state>", where the state of a target is
# ``waiting`` (not pushed yet), the device's answer, ``decommissioned`` (left the fleet before
# it answered), ``superseded`` (a newer table was pushed first), ``pending`` or ``offline``.
# The health counts critical alerts first seen since the canary started, canary devices
# against the brand's other active ones (as services.common.rollouts.canary_health does for
# the rules' guard).
VIEW: Final = """
WITH page AS (
    SELECT * FROM rollouts
    WHERE brand_id = %(brand)s AND (%(id)s::uuid IS NULL OR id = %(id)s)
      AND (%(after_at)s::timestamptz IS NULL
           OR (created_at, id) < (%(after_at)s::timestamptz, %(after_id)s::uuid))
    ORDER BY created_at DESC, id DESC LIMIT %(limit)s
)
SELECT r.id, r.brand_id AS brand, r.mode_table_id, r.target, r.canary_share, r.status,
       r.paused_from, r.status_reason, r.expires_at, r.created_at, r.created_by, r.updated_at,
       r.canary_started_at, r.fleet_started_at,
       (SELECT coalesce(jsonb_object_agg(s.key, s.n), '{}') FROM (
            SELECT CASE WHEN rd.canary THEN 'canary.' ELSE 'rest.' END
                   || CASE WHEN p.answer_status IS NOT NULL THEN p.answer_status
                           WHEN d.decommissioned_at IS NOT NULL THEN 'decommissioned'
                           WHEN rd.version IS NULL THEN 'waiting'
                           WHEN d.config_desired_version > rd.version THEN 'superseded'
                           WHEN d.online THEN 'pending'
                           ELSE 'offline' END AS key,
                   count(*) AS n
            FROM rollout_devices rd
            JOIN devices d ON d.id = rd.device_id
            LEFT JOIN config_pushes p ON p.device_id = rd.device_id AND p.version = rd.version
            WHERE rd.rollout_id = r.id
            GROUP BY 1) s) AS progress,
       h.canary_devices, h.canary_alerts, h.rest_devices, h.rest_alerts
FROM page r
LEFT JOIN LATERAL (
    SELECT count(*) FILTER (WHERE c.device_id IS NOT NULL) AS canary_devices,
           coalesce(sum(a.n) FILTER (WHERE c.device_id IS NOT NULL), 0)::integer AS canary_alerts,
           count(*) FILTER (WHERE c.device_id IS NULL) AS rest_devices,
           coalesce(sum(a.n) FILTER (WHERE c.device_id IS NULL), 0)::integer AS rest_alerts
    FROM devices d
    LEFT JOIN rollout_devices c ON c.rollout_id = r.id AND c.device_id = d.id AND c.canary
    LEFT JOIN (SELECT device_id, count(*) AS n FROM alerts
               WHERE brand_id = r.brand_id AND severity = 'critical'
                 AND first_seen >= r.canary_started_at
               GROUP BY device_id) a ON a.device_id = d.id
    WHERE r.canary_started_at IS NOT NULL AND r.canary_share IS NOT NULL
      AND d.brand_id = r.brand_id AND d.decommissioned_at IS NULL
) h ON true
ORDER BY r.created_at DESC, r.id DESC
"""


class RolloutView(RolloutFields):
    """A rollout's row with its targets per ``<group>.<state>`` and its canary's counts."""

    progress: dict[str, int]
    canary_devices: int
    canary_alerts: int
    rest_devices: int
    rest_alerts: int


class RolloutRepository(Repository):
    """Rollouts on the read-write unit."""

    def page(
        self, brand_id: str, *, after: tuple[datetime, uuid.UUID] | None, limit: int
    ) -> list[RolloutView]:
        """The brand's rollouts, newest first, after ``after`` (created_at, id)."""
        after_at, after_id = after if after else (None, None)
        params = {"brand": brand_id, "id": None, "after_at": after_at, "after_id": after_id}
        return self.all(VIEW, {**params, "limit": limit}, class_row(RolloutView))

    def view(self, brand_id: str, rollout_id: uuid.UUID) -> RolloutView | None:
        """One rollout of the brand as the API shows it (after the session's changes)."""
        self.session.flush()
        params = {"brand": brand_id, "id": rollout_id, "after_at": None, "after_id": None}
        return self.one(VIEW, {**params, "limit": 1}, class_row(RolloutView))

    def get_for_update(self, brand_id: str, rollout_id: uuid.UUID) -> RolloutRow | None:
        """The brand's rollout, locked for a state change; None when it is not the brand's."""
        return self.session.exec(
            select(RolloutRow)
            .where(RolloutRow.id == rollout_id, RolloutRow.brand_id == brand_id)
            .with_for_update()
        ).first()

    def mode_table(self, brand_id: str, table_id: uuid.UUID) -> ModeTableRow | None:
        """The brand's mode table, or None (another brand's table is None too)."""
        table = self.session.get(ModeTableRow, table_id)
        return table if table is not None and table.brand_id == brand_id else None

    def add(self, rollout: RolloutRow, targets: list[str], canary: set[str]) -> None:
        """Insert ``rollout`` and its targets, ``canary`` among them."""
        self.session.add(rollout)
        self.session.flush()
        self.conn.execute(
            "INSERT INTO rollout_devices (rollout_id, device_id, canary)"
            " SELECT %s, unnest(%s::text[]), unnest(%s::bool[])",
            [rollout.id, targets, [device_id in canary for device_id in targets]],
        )

    def save(self, rollout: RolloutRow) -> None:
        """Write the rollout's changed state."""
        self.session.add(rollout)
        self.session.flush()

    def active_devices(
        self, brand_id: str, *, ids: Sequence[str] | None = None, model: str | None = None
    ) -> list[str]:
        """The brand's active devices, of ``ids`` and of ``model`` when given, in id order."""
        return self._ids(
            "SELECT id FROM devices WHERE brand_id = %(brand)s AND decommissioned_at IS NULL"
            " AND (%(ids)s::text[] IS NULL OR id = ANY(%(ids)s))"
            " AND (%(model)s::text IS NULL OR model = %(model)s) ORDER BY id",
            {"brand": brand_id, "ids": list(ids) if ids is not None else None, "model": model},
        )

    def waiting(self, rollout_id: uuid.UUID) -> list[str]:
        """Active targets not pushed to yet (the canary held them back), in id order."""
        return self._ids(
            "SELECT rd.device_id AS id FROM rollout_devices rd"
            " JOIN devices d ON d.id = rd.device_id AND d.decommissioned_at IS NULL"
            " WHERE rd.rollout_id = %s AND rd.version IS NULL ORDER BY rd.device_id",
            [rollout_id],
        )

    def unanswered(self, rollout_id: uuid.UUID) -> list[str]:
        """Active targets whose table from the rollout is still their desired one and not
        answered yet, in id order."""
        return self._ids(
            "SELECT rd.device_id AS id FROM rollout_devices rd"
            " JOIN devices d ON d.id = rd.device_id AND d.decommissioned_at IS NULL"
            " JOIN config_pushes p ON p.device_id = rd.device_id AND p.version = rd.version"
            " WHERE rd.rollout_id = %s AND p.answer_status IS NULL"
            " AND d.config_desired_version = rd.version ORDER BY rd.device_id",
            [rollout_id],
        )

    def note_versions(self, rollout_id: uuid.UUID, versions: dict[str, int]) -> None:
        """Note the version each device got from the rollout."""
        self.conn.execute(
            "UPDATE rollout_devices r SET version = v.version"
            " FROM unnest(%s::text[], %s::int[]) AS v(device_id, version)"
            " WHERE r.rollout_id = %s AND r.device_id = v.device_id",
            [list(versions), list(versions.values()), rollout_id],
        )

    def _ids(self, query: str, params: Any) -> list[str]:
        return [row["id"] for row in self.all(query, params, dict_row)]
