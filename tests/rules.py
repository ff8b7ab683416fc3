"""Rules test support: v1 streams of one device, evaluation against a real database, results.

Streams are built as payload bytes and decoded with the protocol's own decoder, so every
message a rules test feeds the engine is a valid protocol v1 message.
"""

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from psycopg.rows import args_row, class_row

from services.common.migrations.grants import ServiceRole
from services.common.protocol import decode
from services.common.protocol.enums import Channel
from services.common.provisioning import provision_device
from services.rules.engine import Received, evaluate
from tests.ingest import ServiceWorkers
from tests.roles import as_service

RECEIVED_AT = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
T0 = int(datetime(2026, 11, 2, 8, 0, tzinfo=UTC).timestamp() * 1000)
SECOND = 1000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
DAY = 24 * HOUR


def normal(**fields: object) -> dict[str, object]:
    """A LIFT sample with gel and output on, well inside every threshold."""
    base: dict[str, object] = {
        "mode": "LIFT",
        "level": 5,
        "out": True,
        "i_ua": 300.0,
        "i_set_ua": 300.0,
        "v_v": 2.4,
        "z_ohm": 8000.0,
        "t_elec_c": 33.0,
        "t_batt_c": 30.0,
        "batt_pct": 80,
        "charging": False,
    }
    base.update(fields)
    return base


@dataclass
class Stream:
    """Messages of one device, with its seq counter."""

    device_id: str
    seq: int = 0
    messages: list[Received] = field(default_factory=list)

    def _add(self, channel: Channel, body: dict[str, Any]) -> Received:
        message = Received(
            self.device_id, channel, decode(channel, json.dumps(body).encode()), RECEIVED_AT
        )
        self.messages.append(message)
        return message

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def start(
        self, session: str, at: int, mode: str = "LIFT", level: int = 5, user: str | None = None
    ) -> Received:
        body: dict[str, Any] = {
            "v": 1,
            "seq": self._next(),
            "ts": at,
            "type": "session_start",
            "session": session,
            "mode": mode,
            "level": level,
        }
        if user is not None:
            body["user"] = user
        return self._add(Channel.EVENTS, body)

    def end(self, session: str, at: int, duration_s: int, reason: str = "completed") -> Received:
        return self._add(
            Channel.EVENTS,
            {
                "v": 1,
                "seq": self._next(),
                "ts": at,
                "type": "session_end",
                "session": session,
                "duration_s": duration_s,
                "reason": reason,
            },
        )

    def session(
        self, session: str, at: int, duration_s: int, mode: str = "LIFT", user: str | None = None
    ) -> None:
        """A start and an end, no samples (usage windows only)."""
        self.start(session, at, mode=mode, user=user)
        self.end(session, at + duration_s * SECOND, duration_s)

    def samples(
        self,
        session: str | None,
        at: int,
        count: int,
        period_ms: int = 100,
        per_message: int = 10,
        **fields: object,
    ) -> list[Received]:
        """``count`` samples ``period_ms`` apart from ``at``, ``per_message`` to a message."""
        sent = []
        for first in range(0, count, per_message):
            n = min(per_message, count - first)
            body = {
                "v": 1,
                "seq": self._next(),
                "session": session,
                "samples": [
                    {"ts": at + (first + i) * period_ms, **normal(**fields)} for i in range(n)
                ],
            }
            sent.append(self._add(Channel.TELEMETRY, body))
        return sent

    def event(self, type_: str, at: int, **fields: object) -> Received:
        return self._add(
            Channel.EVENTS, {"v": 1, "seq": self._next(), "ts": at, "type": type_, **fields}
        )

    def state(self, at: int, config: dict[str, Any] | None = None) -> Received:
        body: dict[str, Any] = {"v": 1, "seq": self._next(), "ts": at, "fw": "1.0", "hw": "A"}
        if config is not None:
            body["config"] = config
        return self._add(Channel.STATE, body)

    def presence(self, online: bool, at: int) -> Received:
        return self._add(Channel.PRESENCE, {"v": 1, "online": online, "ts": at})


def setup_brand(
    url: str,
    devices: Iterable[tuple[str, str | None]],
    *,
    brand: str = "acme",
    users: dict[str, dict[str, Any]] | None = None,
) -> None:
    """A brand, its users (stage, contraindications) and devices (id, user)."""
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO brands (id, name) VALUES (%s, %s) ON CONFLICT DO NOTHING", [brand, brand]
        )
        for user_id, attrs in (users or {}).items():
            conn.execute(
                "INSERT INTO users (brand_id, id, stage, contraindications)"
                " VALUES (%s, %s, %s, %s)",
                [
                    brand,
                    user_id,
                    attrs.get("stage", "maintenance"),
                    attrs.get("contraindications", []),
                ],
            )
        for device_id, user_id in devices:
            provision_device(conn, device_id=device_id, brand_id=brand, model="m1", user_id=user_id)


def run(
    url: str,
    key: Ed25519PrivateKey,
    messages: Sequence[Received],
    *,
    one_by_one: bool = True,
    batch_sizes: Sequence[int] | None = None,
) -> None:
    """Evaluate ``messages`` in arrival order as the rules service's role, each in its own
    transaction (or all in one, or in consecutive batches of the given sizes, cycled)."""
    if batch_sizes:
        batches, start = [], 0
        sizes = list(batch_sizes)
        while start < len(messages):
            size = sizes[len(batches) % len(sizes)]
            batches.append(list(messages[start : start + size]))
            start += size
    else:
        batches = [[m] for m in messages] if one_by_one else [list(messages)]
    with psycopg.connect(as_service(url, ServiceRole.RULES)) as conn:
        for batch in batches:
            with conn.transaction():
                evaluate(conn, key, batch)


@dataclass(frozen=True)
class AlertRow:
    device_id: str
    rule: str
    severity: str
    count: int
    state: str
    explanation: dict[str, Any]


def alerts(url: str, rule: str | None = None) -> list[AlertRow]:
    """Every alert (of ``rule``), oldest first."""
    with psycopg.connect(url, row_factory=class_row(AlertRow)) as conn:
        return conn.execute(
            "SELECT device_id, rule, severity, count, state, explanation FROM alerts"
            " WHERE %s::text IS NULL OR rule = %s ORDER BY id",
            [rule, rule],
        ).fetchall()


def pushes(url: str, device_id: str) -> list[dict[str, Any]]:
    """Tables recorded for a device, oldest first."""
    with psycopg.connect(url, row_factory=args_row(_payload)) as conn:
        return conn.execute(
            "SELECT payload FROM config_pushes WHERE device_id = %s ORDER BY version", [device_id]
        ).fetchall()


def _payload(payload: dict[str, Any]) -> dict[str, Any]:
    return payload


@dataclass
class RulesWorkers(ServiceWorkers):
    """Rules worker processes of one test (the signing key's directory in ``env_overrides``)."""

    service: str = "rules"


def overcurrent_telemetry(seq: int, ts_ms: int, session: str = "s-1") -> bytes:
    """A telemetry payload of three LIFT samples at 1,250 uA against a 300 uA setpoint: the
    overcurrent rule's fault, which pushes a SAFE table to the device."""
    samples = [
        {
            "ts": ts_ms + 100 * i,
            "mode": "LIFT",
            "out": True,
            "i_ua": 1250.0,
            "i_set_ua": 300.0,
            "z_ohm": 8000.0,
        }
        for i in range(3)
    ]
    return json.dumps({"v": 1, "seq": seq, "session": session, "samples": samples}).encode()
