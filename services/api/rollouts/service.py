"""Starting and steering rollouts. Every table goes through ``record_push`` (the rules engine's
signing path) in the request's transaction; publishing follows the commit."""

import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlmodel import Session, select

from services.api.mode_tables import repository as mode_tables
from services.api.models import ModeTableRow, RolloutRow
from services.api.problems import ProblemError
from services.api.rollouts.schemas import (
    CanaryHealth,
    GroupProgress,
    Progress,
    Rollout,
    RolloutCreate,
    RolloutStatus,
    RolloutTarget,
)
from services.common import rollouts
from services.common.config_push import Push, record_push
from services.common.db import Conn


def _invalid(detail: str) -> ProblemError:
    return ProblemError(422, "invalid-rollout", "Invalid rollout", detail)


def _conflict(detail: str) -> ProblemError:
    return ProblemError(409, "rollout-state", "Not possible in this state", detail)


def _targets(conn: Conn, brand_id: str, target: RolloutTarget) -> list[str]:
    """The brand's active devices the target names, in id order; a 422 for unknown ids."""
    rows = conn.execute(
        "SELECT id FROM devices WHERE brand_id = %(brand)s AND decommissioned_at IS NULL"
        " AND (%(ids)s::text[] IS NULL OR id = ANY(%(ids)s))"
        " AND (%(model)s::text IS NULL OR model = %(model)s) ORDER BY id",
        {"brand": brand_id, "ids": target.device_ids, "model": target.model},
    ).fetchall()
    found = [str(row[0]) for row in rows]
    if target.device_ids is not None:
        unknown = sorted(set(target.device_ids) - set(found))
        if unknown:
            shown = ", ".join(unknown[:10]) + (" …" if len(unknown) > 10 else "")
            raise _invalid(f"target.device_ids: no active device {shown}")
    if not found:
        raise _invalid("target: no active device of the brand matches")
    return found


def _push(
    conn: Conn,
    key: Ed25519PrivateKey,
    rollout: RolloutRow,
    table: ModeTableRow,
    device_ids: Sequence[str],
) -> list[Push]:
    """Record the table for ``device_ids`` and note each version in ``rollout_devices``."""
    locks = rollouts.rule_locks(conn, device_ids)
    now_ms = int(time.time() * 1000)
    expires_ms = int(rollout.expires_at.timestamp() * 1000) if rollout.expires_at else None
    pushes = _record(
        conn,
        key,
        rollout.id,
        [
            (
                device_id,
                rollouts.rollout_table(
                    table.body,
                    issued_at_ms=now_ms,
                    expires_at_ms=expires_ms,
                    reason=f"rollout {rollout.id}: {table.name}",
                    rule_lock=locks.get(device_id),
                ),
                str(table.id),
            )
            for device_id in device_ids
        ],
    )
    conn.execute(
        "UPDATE rollout_devices r SET version = v.version"
        " FROM unnest(%s::text[], %s::int[]) AS v(device_id, version)"
        " WHERE r.rollout_id = %s AND r.device_id = v.device_id",
        [[p.device_id for p in pushes], [p.version for p in pushes], rollout.id],
    )
    return pushes


def _record(
    conn: Conn,
    key: Ed25519PrivateKey,
    rollout_id: uuid.UUID,
    tables: Sequence[tuple[str, dict[str, Any], str | None]],
) -> list[Push]:
    """Sign and record each (device, unsigned table, mode table id) for the rollout."""
    return [
        record_push(
            conn,
            key,
            device_id=device_id,
            table=table,
            source="rollout",
            source_ref=str(rollout_id),
            mode_table_id=mode_table_id,
        )
        for device_id, table, mode_table_id in tables
    ]


def create(
    session: Session,
    conn: Conn,
    key: Ed25519PrivateKey,
    brand_id: str,
    body: RolloutCreate,
    actor: str,
) -> tuple[RolloutRow, list[Push]]:
    """Fix the targets, choose the canary, and push to the canary (or to every target)."""
    table = mode_tables.get(session, brand_id, body.mode_table_id)
    if table is None:
        raise _invalid(f"mode_table_id: there is no mode table {body.mode_table_id}")
    if body.expires_at is not None and body.expires_at <= datetime.now(UTC):
        raise _invalid("expires_at: must be in the future")
    targets = _targets(conn, brand_id, body.target)
    if body.canary_share is not None and len(targets) < 2:
        raise _invalid("canary_share: a canary needs at least 2 target devices")
    now = datetime.now(UTC)
    canary = body.canary_share is not None
    rollout = RolloutRow(
        brand_id=brand_id,
        mode_table_id=table.id,
        target=body.target.model_dump(exclude_defaults=True),
        canary_share=body.canary_share,
        status=RolloutStatus.CANARY if canary else RolloutStatus.RUNNING,
        expires_at=body.expires_at,
        created_by=actor,
        canary_started_at=now if canary else None,
        fleet_started_at=None if canary else now,
    )
    session.add(rollout)
    session.flush()
    # The canary is a stable pseudo-random sample: the same rollout always picks the same ids.
    size = rollouts.canary_size(len(targets), body.canary_share) if body.canary_share else 0
    ordered = sorted(targets, key=lambda device_id: uuid.uuid5(rollout.id, device_id).bytes)
    chosen = set(ordered[:size])
    conn.execute(
        "INSERT INTO rollout_devices (rollout_id, device_id, canary)"
        " SELECT %s, unnest(%s::text[]), unnest(%s::bool[])",
        [rollout.id, targets, [device_id in chosen for device_id in targets]],
    )
    first = [device_id for device_id in targets if device_id in chosen] if canary else targets
    return rollout, _push(conn, key, rollout, table, first)


def get_for_update(session: Session, brand_id: str, rollout_id: uuid.UUID) -> RolloutRow:
    """The brand's rollout, locked for a state change; 404 when it is not the brand's."""
    row = session.exec(
        select(RolloutRow)
        .where(RolloutRow.id == rollout_id, RolloutRow.brand_id == brand_id)
        .with_for_update()
    ).first()
    if row is None:
        raise not_found(rollout_id)
    return row


def not_found(rollout_id: uuid.UUID) -> ProblemError:
    return ProblemError(404, "not-found", "Not found", f"there is no rollout {rollout_id}")


def _set(row: RolloutRow, status: RolloutStatus, reason: str | None) -> None:
    row.status = status.value
    row.status_reason = reason
    row.updated_at = datetime.now(UTC)


def promote(
    session: Session, conn: Conn, key: Ed25519PrivateKey, row: RolloutRow, actor: str
) -> list[Push]:
    """Push to the targets the canary held back."""
    if row.status != RolloutStatus.CANARY:
        hint = " (resume it first)" if row.status == RolloutStatus.PAUSED else ""
        raise _conflict(
            f"only a rollout in its canary stage can be promoted; it is {row.status}{hint}"
        )
    table = session.get(ModeTableRow, row.mode_table_id)
    assert table is not None  # the foreign key holds it
    waiting = [
        str(r[0])
        for r in conn.execute(
            "SELECT device_id FROM rollout_devices WHERE rollout_id = %s AND version IS NULL"
            " ORDER BY device_id",
            [row.id],
        ).fetchall()
    ]
    active = set(_active(conn, waiting))
    _set(row, RolloutStatus.RUNNING, f"promoted by {actor}")
    row.fleet_started_at = datetime.now(UTC)
    session.add(row)
    return _push(conn, key, row, table, [d for d in waiting if d in active])


def _active(conn: Conn, device_ids: Sequence[str]) -> list[str]:
    rows = conn.execute(
        "SELECT id FROM devices WHERE id = ANY(%s) AND decommissioned_at IS NULL",
        [list(device_ids)],
    ).fetchall()
    return [str(r[0]) for r in rows]


def pause(session: Session, row: RolloutRow, actor: str, note: str | None) -> list[Push]:
    """Hold a canary: nothing more is pushed until it is resumed (or promoted after that)."""
    if row.status != RolloutStatus.CANARY:
        if row.status == RolloutStatus.RUNNING:
            raise _conflict(
                "every target already has the table; abort to withdraw it where it is not applied"
            )
        raise _conflict(f"only a rollout in its canary stage can be paused; it is {row.status}")
    _set(row, RolloutStatus.PAUSED, f"paused by {actor}" + (f": {note}" if note else ""))
    row.paused_from = RolloutStatus.CANARY.value
    session.add(row)
    return []


def resume(session: Session, row: RolloutRow, actor: str, note: str | None) -> list[Push]:
    """Back to the stage it was paused in (pushes nothing)."""
    if row.status != RolloutStatus.PAUSED or row.paused_from is None:
        raise _conflict(f"only a paused rollout can be resumed; it is {row.status}")
    _set(row, RolloutStatus(row.paused_from), f"resumed by {actor}" + (f": {note}" if note else ""))
    row.paused_from = None
    session.add(row)
    return []


def abort(
    session: Session,
    conn: Conn,
    key: Ed25519PrivateKey,
    row: RolloutRow,
    actor: str,
    note: str | None,
) -> list[Push]:
    """Stop, and withdraw the table from devices that have not applied it: each gets the table
    it last applied (or the factory table) again, as a newer version, so a device that was
    offline never picks the aborted one up. Devices that applied it keep it."""
    if row.status == RolloutStatus.ABORTED:
        raise _conflict("the rollout is already aborted")
    unanswered = conn.execute(
        "SELECT rd.device_id FROM rollout_devices rd"
        " JOIN devices d ON d.id = rd.device_id AND d.decommissioned_at IS NULL"
        " JOIN config_pushes p ON p.device_id = rd.device_id AND p.version = rd.version"
        " WHERE rd.rollout_id = %s AND p.answer_status IS NULL"
        " AND d.config_desired_version = rd.version ORDER BY rd.device_id",
        [row.id],
    ).fetchall()
    device_ids = [str(r[0]) for r in unanswered]
    _set(row, RolloutStatus.ABORTED, f"aborted by {actor}" + (f": {note}" if note else ""))
    row.paused_from = None
    session.add(row)
    session.flush()
    previous = rollouts.last_applied(conn, device_ids)
    locks = rollouts.rule_locks(conn, device_ids)
    now_ms = int(time.time() * 1000)
    tables = []
    for device_id in device_ids:
        before = previous.get(device_id, rollouts.Restorable(None, rollouts.FACTORY))
        back_to = "the table last applied" if before.mode_table_id else "the factory table"
        table = rollouts.rollout_table(
            before.body,
            issued_at_ms=now_ms,
            expires_at_ms=None,
            reason=f"rollout {row.id} aborted: back to {back_to}",
            rule_lock=locks.get(device_id),
        )
        tables.append((device_id, table, before.mode_table_id))
    return _record(conn, key, row.id, tables)


def get(session: Session, brand_id: str, rollout_id: uuid.UUID) -> RolloutRow:
    """The brand's rollout; 404 when it is not the brand's."""
    row = session.exec(
        select(RolloutRow).where(RolloutRow.id == rollout_id, RolloutRow.brand_id == brand_id)
    ).first()
    if row is None:
        raise not_found(rollout_id)
    return row


def to_schema(conn: Conn, row: RolloutRow) -> Rollout:
    """The rollout with its progress and, while it has a canary, the canary's health."""
    groups = rollouts.progress(conn, row.id)

    def group(progress: rollouts.GroupProgress) -> GroupProgress:
        return GroupProgress(targets=progress.targets, **progress.counts)

    total_counts = {
        state: groups[True].counts[state] + groups[False].counts[state]
        for state in rollouts.PROGRESS_STATES
    }
    total = GroupProgress(targets=groups[True].targets + groups[False].targets, **total_counts)
    health = None
    if row.canary_share is not None and row.canary_started_at is not None:
        h = rollouts.canary_health(conn, row.id, row.brand_id, row.canary_started_at)
        health = CanaryHealth(
            canary_devices=h.canary_devices,
            canary_alerts=h.canary_alerts,
            canary_rate=h.canary_rate,
            rest_devices=h.rest_devices,
            rest_alerts=h.rest_alerts,
            rest_rate=h.rest_rate,
        )
    status = RolloutStatus(row.status)
    if status == RolloutStatus.RUNNING and total.waiting + total.pending + total.offline == 0:
        status = RolloutStatus.COMPLETED
    return Rollout(
        id=row.id,
        brand=row.brand_id,
        mode_table_id=row.mode_table_id,
        target=RolloutTarget.model_validate(row.target),
        canary_share=row.canary_share,
        status=status,
        paused_from=RolloutStatus(row.paused_from) if row.paused_from else None,
        status_reason=row.status_reason,
        expires_at=row.expires_at,
        created_at=row.created_at,
        created_by=row.created_by,
        updated_at=row.updated_at,
        canary_started_at=row.canary_started_at,
        fleet_started_at=row.fleet_started_at,
        progress=Progress(
            total=total,
            canary=group(groups[True]) if row.canary_share is not None else None,
            rest=group(groups[False]) if row.canary_share is not None else None,
        ),
        canary_health=health,
    )
