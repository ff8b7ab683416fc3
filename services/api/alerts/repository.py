"""Alerts of a brand and their transitions. Never commits: the request's unit of work owns the
transaction."""

from dataclasses import dataclass
from typing import Any, Final

from psycopg.rows import class_row, dict_row

from services.api.alerts.schemas import Alert, AlertState, Transition
from services.api.repository import ReadRepository, Repository
from services.api.responses import jsonb_passed_through

COLUMNS: Final = (
    "id, device_id, rule, rule_version, severity, state, count, first_seen, last_seen,"
    " explanation, acknowledged_at, acknowledged_by, resolved_at, resolved_by, resolution"
)
MAX_CHANGES: Final = 500  # a page of the event stream's reads

LIST: Final = (
    f"SELECT {COLUMNS} FROM alerts"  # noqa: S608 - constant column list
    " WHERE brand_id = %(brand)s"
    " AND (%(device)s::text IS NULL OR device_id = %(device)s)"
    " AND (%(rule)s::text IS NULL OR rule = %(rule)s)"
    " AND (%(state)s::text IS NULL OR state = %(state)s)"
    " AND (%(severity)s::text IS NULL OR severity = %(severity)s)"
    " AND (%(before)s::bigint IS NULL OR id < %(before)s)"
    " ORDER BY id DESC LIMIT %(limit)s"
)
CHANGED: Final = (
    f"SELECT change_seq, {COLUMNS} FROM alerts"  # noqa: S608 - constant column list
    " WHERE brand_id = %(brand)s"
    " AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s))"
    " AND (%(after)s::bigint IS NULL OR change_seq > %(after)s)"
    " ORDER BY change_seq LIMIT %(limit)s"
)


class ChangedAlert(Alert):
    """An alert with its change number (the stream's event id)."""

    change_seq: int


@dataclass(frozen=True)
class _Newest:
    change_seq: int


class AlertRepository(Repository):
    """Alerts on the read-write unit."""

    def get(self, brand_id: str, alert_id: int, *, for_update: bool = False) -> Alert | None:
        """One alert of the brand, or None (another brand's alert is None too)."""
        lock = " FOR UPDATE" if for_update else ""
        query = f"SELECT {COLUMNS} FROM alerts WHERE id = %s AND brand_id = %s{lock}"  # noqa: S608
        return self.one(query, [alert_id, brand_id], class_row(Alert))

    def transitions(self, alert_id: int) -> list[Transition]:
        """The alert's transitions, oldest first."""
        return self.all(
            "SELECT from_state, to_state, actor, at, note FROM alert_transitions"
            " WHERE alert_id = %s ORDER BY at, id",
            [alert_id],
            class_row(Transition),
        )

    def acknowledge(self, alert_id: int, actor: str) -> None:
        """Mark the alert acknowledged by ``actor``."""
        self.conn.execute(
            "UPDATE alerts SET state = 'acknowledged', acknowledged_at = now(),"
            " acknowledged_by = %s, updated_at = now() WHERE id = %s",
            [actor, alert_id],
        )

    def resolve(self, alert_id: int, actor: str, resolution: str) -> None:
        """Mark the alert resolved by ``actor``."""
        self.conn.execute(
            "UPDATE alerts SET state = 'resolved', resolved_at = now(), resolved_by = %s,"
            " resolution = %s, updated_at = now() WHERE id = %s",
            [actor, resolution, alert_id],
        )

    def add_transition(
        self, alert_id: int, from_state: AlertState, to_state: AlertState, actor: str,
        note: str | None,
    ) -> None:  # fmt: skip
        """Record who moved the alert from one state to another."""
        self.conn.execute(
            "INSERT INTO alert_transitions (alert_id, from_state, to_state, actor, note)"
            " VALUES (%s, %s, %s, %s, %s)",
            [alert_id, from_state.value, to_state.value, actor, note],
        )


class AlertReadRepository(ReadRepository):
    """Alerts on the read-only unit: the polled list and the event stream's reads."""

    async def page(
        self,
        brand_id: str,
        *,
        device: str | None,
        rule: str | None,
        state: str | None,
        severity: str | None,
        before_id: int | None,
        limit: int,
    ) -> list[dict[str, Any]]:
        """Newest first (by id), at most ``limit``, ids below ``before_id``; each explanation
        as the JSON text stored (for :func:`rows_response`)."""
        params = {
            "brand": brand_id,
            "device": device,
            "rule": rule,
            "state": state,
            "severity": severity,
            "before": before_id,
            "limit": limit,
        }
        async with self.conn.cursor(row_factory=dict_row) as cursor:
            jsonb_passed_through(cursor)
            await cursor.execute(LIST, params)
            return await cursor.fetchall()

    async def changed(
        self, brand_id: str, *, ids: list[int] | None = None, after_seq: int | None = None
    ) -> list[ChangedAlert]:
        """The brand's alerts with ``ids``, or changed after ``after_seq``, in change order,
        at most :data:`MAX_CHANGES`."""
        params = {"brand": brand_id, "ids": ids, "after": after_seq, "limit": MAX_CHANGES}
        return await self.all(CHANGED, params, class_row(ChangedAlert))

    async def replay_from(self, brand_id: str, after_seq: int, max_changes: int) -> int | None:
        """Where a replay of at most ``max_changes`` after ``after_seq`` must start instead
        (the change before the newest ``max_changes``), or None when there are no more than
        that. It walks at most ``max_changes`` entries of the brand's change index."""
        start = await self.one(
            "SELECT change_seq FROM alerts WHERE brand_id = %s AND change_seq > %s"
            " ORDER BY change_seq DESC OFFSET %s LIMIT 1",
            [brand_id, after_seq, max_changes],
            class_row(_Newest),
        )
        return start.change_seq if start else None

    async def newest_change(self, brand_id: str) -> int:
        """The brand's highest change number (0 when it has no alerts)."""
        newest = await self.one(
            "SELECT coalesce(max(change_seq), 0) AS change_seq FROM alerts WHERE brand_id = %s",
            [brand_id],
            class_row(_Newest),
        )
        return newest.change_seq if newest else 0
