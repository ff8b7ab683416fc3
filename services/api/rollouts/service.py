"""Starting and steering rollouts. Every table goes through ``record_push`` (the rules engine's
signing path) in the request's transaction; publishing follows the commit."""

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.api.models import ModeTableRow, RolloutRow
from services.api.problems import ProblemError
from services.api.rollouts.repository import RolloutRepository, RolloutView
from services.api.rollouts.schemas import (
    CanaryHealth,
    GroupProgress,
    Progress,
    Rollout,
    RolloutCreate,
    RolloutFields,
    RolloutStatus,
    RolloutTarget,
)
from services.common import rollouts
from services.common.config_push import Push, record_push


def _unavailable_targets(detail: str) -> ProblemError:
    """The 409 for targets the brand's fleet does not hold now: the body is well formed (the
    schema cannot know which devices are active), the fleet is what refuses it."""
    return ProblemError(409, "rollout-targets", "No such targets", detail)


def _conflict(detail: str) -> ProblemError:
    return ProblemError(409, "rollout-state", "Not possible in this state", detail)


def not_found(rollout_id: uuid.UUID) -> ProblemError:
    """The 404 for a rollout the brand does not have."""
    return ProblemError(404, "not-found", "Not found", f"there is no rollout {rollout_id}")


@dataclass(frozen=True)
class Steering:
    """Who steers a rollout and with what: its repository, the signing key, the caller (as
    audit columns record it) and the caller's note."""

    rollouts: RolloutRepository
    signing_key: Ed25519PrivateKey
    actor: str
    note: str | None = None


def _targets(repo: RolloutRepository, brand_id: str, target: RolloutTarget) -> list[str]:
    """The brand's active devices the target names, in id order; a 422 for unknown ids."""
    found = repo.active_devices(brand_id, ids=target.device_ids, model=target.model)
    if target.device_ids is not None:
        unknown = sorted(set(target.device_ids) - set(found))
        if unknown:
            shown = ", ".join(unknown[:10]) + (" …" if len(unknown) > 10 else "")
            raise _unavailable_targets(f"target.device_ids: no active device {shown}")
    if not found:
        raise _unavailable_targets("target: no active device of the brand matches")
    return found


def _record(
    repo: RolloutRepository,
    key: Ed25519PrivateKey,
    rollout_id: uuid.UUID,
    tables: Sequence[tuple[str, dict[str, Any], str | None]],
) -> list[Push]:
    """Sign and record each (device, unsigned table, mode table id) for the rollout."""
    return [
        record_push(
            repo.conn,
            key,
            device_id=device_id,
            table=table,
            source="rollout",
            source_ref=str(rollout_id),
            mode_table_id=mode_table_id,
        )
        for device_id, table, mode_table_id in tables
    ]


def _push(
    repo: RolloutRepository,
    key: Ed25519PrivateKey,
    rollout: RolloutRow,
    table: ModeTableRow,
    device_ids: Sequence[str],
) -> list[Push]:
    """Record the table for ``device_ids`` and note each version in ``rollout_devices``."""
    locks = rollouts.rule_locks(repo.conn, device_ids)
    now_ms = int(time.time() * 1000)
    expires_ms = int(rollout.expires_at.timestamp() * 1000) if rollout.expires_at else None
    reason = f"rollout {rollout.id}: {table.name}"
    tables = [
        (
            device_id,
            rollouts.rollout_table(
                table.body,
                issued_at_ms=now_ms,
                expires_at_ms=expires_ms,
                reason=reason,
                rule_lock=locks.get(device_id),
            ),
            str(table.id),
        )
        for device_id in device_ids
    ]
    pushes = _record(repo, key, rollout.id, tables)
    repo.note_versions(rollout.id, {p.device_id: p.version for p in pushes})
    return pushes


def create(by: Steering, brand_id: str, body: RolloutCreate) -> tuple[RolloutRow, list[Push]]:
    """Fix the targets, choose the canary, and push to the canary (or to every target)."""
    repo = by.rollouts
    table = repo.mode_table(brand_id, body.mode_table_id)
    if table is None:
        raise ProblemError(
            404,
            "not-found",
            "Not found",
            f"mode_table_id: there is no mode table {body.mode_table_id}",
        )
    if body.expires_at is not None and body.expires_at <= datetime.now(UTC):
        # The clock, not the body, refuses it (no schema can say "after now"): a 409.
        raise ProblemError(
            409, "rollout-expired", "Already expired", "expires_at: must be in the future"
        )
    targets = _targets(repo, brand_id, body.target)
    if body.canary_share is not None and len(targets) < 2:
        raise _unavailable_targets("canary_share: a canary needs at least 2 target devices")
    now = datetime.now(UTC)
    canary = body.canary_share is not None
    rollout = RolloutRow(
        brand_id=brand_id,
        mode_table_id=table.id,
        target=body.target.model_dump(exclude_defaults=True),
        canary_share=body.canary_share,
        status=RolloutStatus.CANARY if canary else RolloutStatus.RUNNING,
        expires_at=body.expires_at,
        created_by=by.actor,
        canary_started_at=now if canary else None,
        fleet_started_at=None if canary else now,
    )
    # The canary is a stable pseudo-random sample: the same rollout always picks the same ids.
    size = rollouts.canary_size(len(targets), body.canary_share) if body.canary_share else 0
    ordered = sorted(targets, key=lambda device_id: uuid.uuid5(rollout.id, device_id).bytes)
    chosen = set(ordered[:size])
    repo.add(rollout, targets, chosen)
    first = [device_id for device_id in targets if device_id in chosen] if canary else targets
    return rollout, _push(repo, by.signing_key, rollout, table, first)


def _set(row: RolloutRow, status: RolloutStatus, reason: str | None) -> None:
    row.status = status.value
    row.status_reason = reason
    row.updated_at = datetime.now(UTC)


def _said(what: str, by: Steering) -> str:
    return f"{what} by {by.actor}" + (f": {by.note}" if by.note else "")


def promote(by: Steering, row: RolloutRow) -> list[Push]:
    """Push to the targets the canary held back."""
    if row.status != RolloutStatus.CANARY:
        hint = " (resume it first)" if row.status == RolloutStatus.PAUSED else ""
        raise _conflict(
            f"only a rollout in its canary stage can be promoted; it is {row.status}{hint}"
        )
    repo = by.rollouts
    table = repo.mode_table(row.brand_id, row.mode_table_id)
    assert table is not None  # the foreign key holds it, and a rollout uses its brand's tables
    waiting = repo.waiting(row.id)
    _set(row, RolloutStatus.RUNNING, f"promoted by {by.actor}")
    row.fleet_started_at = datetime.now(UTC)
    repo.save(row)
    return _push(repo, by.signing_key, row, table, waiting)


def pause(by: Steering, row: RolloutRow) -> list[Push]:
    """Hold a canary: nothing more is pushed until it is resumed (or promoted after that)."""
    if row.status != RolloutStatus.CANARY:
        if row.status == RolloutStatus.RUNNING:
            raise _conflict(
                "every target already has the table; abort to withdraw it where it is not applied"
            )
        raise _conflict(f"only a rollout in its canary stage can be paused; it is {row.status}")
    _set(row, RolloutStatus.PAUSED, _said("paused", by))
    row.paused_from = RolloutStatus.CANARY.value
    by.rollouts.save(row)
    return []


def resume(by: Steering, row: RolloutRow) -> list[Push]:
    """Back to the stage it was paused in (pushes nothing)."""
    if row.status != RolloutStatus.PAUSED or row.paused_from is None:
        raise _conflict(f"only a paused rollout can be resumed; it is {row.status}")
    _set(row, RolloutStatus(row.paused_from), _said("resumed", by))
    row.paused_from = None
    by.rollouts.save(row)
    return []


def abort(by: Steering, row: RolloutRow) -> list[Push]:
    """Stop, and withdraw the table from devices that have not applied it: each gets the table
    it last applied (or the factory table) again, as a newer version, so a device that was
    offline never picks the aborted one up. Devices that applied it keep it."""
    if row.status == RolloutStatus.ABORTED:
        raise _conflict("the rollout is already aborted")
    repo = by.rollouts
    device_ids = repo.unanswered(row.id)
    _set(row, RolloutStatus.ABORTED, _said("aborted", by))
    row.paused_from = None
    repo.save(row)
    previous = rollouts.last_applied(repo.conn, device_ids)
    locks = rollouts.rule_locks(repo.conn, device_ids)
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
    return _record(repo, by.signing_key, row.id, tables)


def _group(counts: dict[str, int], group: str | None) -> GroupProgress:
    """One group's progress (``None``: both groups together)."""
    prefixes = [f"{group}."] if group else ["canary.", "rest."]
    by_state = {
        state: sum(counts.get(prefix + state, 0) for prefix in prefixes)
        for state in rollouts.PROGRESS_STATES
    }
    return GroupProgress(targets=sum(by_state.values()), **by_state)


def to_schema(view: RolloutView) -> Rollout:
    """The rollout with its progress and, while it has a canary, the canary's health."""
    has_canary = view.canary_share is not None
    total = _group(view.progress, None)
    health = None
    if has_canary and view.canary_started_at is not None:
        counts = rollouts.CanaryHealth(
            view.canary_devices, view.canary_alerts, view.rest_devices, view.rest_alerts
        )
        health = CanaryHealth.model_validate(counts, from_attributes=True)  # rates: properties
    status = view.status
    if status == RolloutStatus.RUNNING and total.waiting + total.pending + total.offline == 0:
        status = RolloutStatus.COMPLETED
    progress = Progress(
        total=total,
        canary=_group(view.progress, "canary") if has_canary else None,
        rest=_group(view.progress, "rest") if has_canary else None,
    )
    fields = view.model_dump(include=set(RolloutFields.model_fields))
    return Rollout(**fields | {"status": status, "progress": progress, "canary_health": health})
