"""What the rules know about a device besides its stream: brand, user, mode table, thresholds.

The mode table a device runs is the last pushed table it reported ``applied`` (ingest records
the answer), or the factory defaults. Thresholds are the brand's overrides over the
catalogue's defaults.
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from psycopg.types.json import Jsonb

from services.common.db import Conn
from services.common.mode_tables import DEFAULT_MODES
from services.rules.catalogue import Thresholds, check_overrides


@dataclass(frozen=True)
class UserInfo:
    """A user's stage and contraindications (``intro`` and none when the user is unknown)."""

    stage: str = "intro"
    contraindications: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeviceContext:
    device_id: str
    brand_id: str
    user_id: str | None
    user: UserInfo
    # The table the device runs (None: factory defaults) and its modes.
    table: Mapping[str, Any] | None
    modes: Mapping[str, Mapping[str, Any]]
    # Modes locked by the newest table pushed to the device (answered or not).
    desired_locked: frozenset[str]
    desired_version: int | None
    thresholds: Thresholds = field(default_factory=Thresholds)
    # Whether a no_contact alert is open on the device (contact back must resolve it).
    open_no_contact: bool = False

    def user_key(self, event_user: str | None = None) -> str:
        """Whose usage windows a session counts in: its user, else the device's own."""
        user = event_user or self.user_id
        return f"user:{user}" if user else f"device:{self.device_id}"


def thresholds_of(per_rule: Mapping[str, Mapping[str, Any]]) -> Thresholds:
    """A brand's thresholds from its stored overrides (``{rule: {param: value}}``)."""
    return Thresholds(
        {
            str(rule): {str(k): float(v) for k, v in params.items()}
            for rule, params in per_rule.items()
        }
    )


def load_thresholds(conn: Conn, brand_ids: Iterable[str]) -> dict[str, Thresholds]:
    """Each brand's thresholds."""
    overrides: dict[str, dict[str, Mapping[str, Any]]] = {brand: {} for brand in brand_ids}
    rows = conn.execute(
        "SELECT brand_id, rule, params FROM brand_rule_thresholds WHERE brand_id = ANY(%s)",
        [list(overrides)],
    ).fetchall()
    for brand_id, rule, params in rows:
        assert isinstance(params, dict)
        overrides[str(brand_id)][str(rule)] = params
    return {brand: thresholds_of(per_rule) for brand, per_rule in overrides.items()}


def save_overrides(
    conn: Conn, brand_id: str, rule: str, params: Mapping[str, object], actor: str
) -> dict[str, float]:
    """Set a brand's overrides of one rule (replacing earlier ones), in the caller's
    transaction; raises ``ThresholdError`` for a loosening past the limit or an unknown name."""
    checked = check_overrides(rule, params)
    if not checked:
        conn.execute(
            "DELETE FROM brand_rule_thresholds WHERE brand_id = %s AND rule = %s", [brand_id, rule]
        )
        return checked
    conn.execute(
        "INSERT INTO brand_rule_thresholds (brand_id, rule, params, updated_by)"
        " VALUES (%s, %s, %s, %s) ON CONFLICT (brand_id, rule) DO UPDATE SET"
        " params = EXCLUDED.params, updated_by = EXCLUDED.updated_by, updated_at = now()",
        [brand_id, rule, Jsonb(checked), actor],
    )
    return checked


def load_contexts(conn: Conn, device_ids: Iterable[str]) -> dict[str, DeviceContext]:
    """Contexts of the known, active devices among ``device_ids`` (one query)."""
    rows = conn.execute(
        """
        SELECT d.id, d.brand_id, d.user_id, u.stage, u.contraindications,
               applied.payload, desired.payload, d.config_desired_version,
               (SELECT jsonb_object_agg(t.rule, t.params) FROM brand_rule_thresholds t
                 WHERE t.brand_id = d.brand_id),
               EXISTS (SELECT 1 FROM alerts a WHERE a.device_id = d.id
                        AND a.rule = 'no_contact' AND a.state <> 'resolved')
        FROM devices d
        LEFT JOIN users u ON u.brand_id = d.brand_id AND u.id = d.user_id
        LEFT JOIN config_pushes applied
               ON applied.device_id = d.id AND applied.version = d.config_reported_version
              AND d.config_reported_status = 'applied'
        LEFT JOIN config_pushes desired
               ON desired.device_id = d.id AND desired.version = d.config_desired_version
        WHERE d.id = ANY(%s) AND d.decommissioned_at IS NULL
        """,
        [list(set(device_ids))],
    ).fetchall()
    contexts = {}
    for row in rows:
        device_id, brand_id, user_id, stage, contra, applied, desired, desired_version = row[:8]
        overrides, open_no_contact = row[8], row[9]
        table = applied if isinstance(applied, dict) else None
        modes = table["modes"] if table is not None else DEFAULT_MODES
        locked = desired.get("locked_modes", []) if isinstance(desired, dict) else []
        per_rule = overrides if isinstance(overrides, dict) else {}
        contexts[str(device_id)] = DeviceContext(
            device_id=str(device_id),
            brand_id=str(brand_id),
            user_id=str(user_id) if user_id is not None else None,
            user=_user_info(stage, contra),
            table=table,
            modes=modes,
            desired_locked=frozenset(str(mode) for mode in locked),
            desired_version=desired_version if isinstance(desired_version, int) else None,
            thresholds=thresholds_of(per_rule),
            open_no_contact=bool(open_no_contact),
        )
    return contexts


def load_user(conn: Conn, brand_id: str, user_id: str) -> UserInfo:
    """A user named in an event (which may differ from the device's registered user)."""
    row = conn.execute(
        "SELECT stage, contraindications FROM users WHERE brand_id = %s AND id = %s",
        [brand_id, user_id],
    ).fetchone()
    if row is None:
        return UserInfo()
    return _user_info(*row)


def _user_info(stage: object, contraindications: object) -> UserInfo:
    """A user's row (``users.stage``, ``users.contraindications text[]``); a device without a
    known user reads as NULLs: the intro stage, no flags."""
    flags = contraindications if isinstance(contraindications, list) else []
    return UserInfo(
        stage=str(stage) if stage is not None else "intro",
        contraindications=tuple(str(flag) for flag in flags),
    )


def user_devices(conn: Conn, brand_id: str, user_key: str) -> list[str]:
    """The active devices whose sessions count for ``user_key``."""
    kind, _, name = user_key.partition(":")
    if kind == "device":
        return [name]
    rows = conn.execute(
        "SELECT id FROM devices WHERE brand_id = %s AND user_id = %s"
        " AND decommissioned_at IS NULL ORDER BY id",
        [brand_id, name],
    ).fetchall()
    return [str(row[0]) for row in rows]
