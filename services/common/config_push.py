"""Pushing a mode table to a device: the one signing path rules and rollouts share.

Two steps, so the database decides before the broker hears anything:

1. :func:`record_push`, in the caller's transaction: lock the device row, take the next
   version (above every version pushed or reported), check the envelope, sign, and record the
   signed payload in ``config_pushes``.
2. :func:`publish_push`, after that transaction commits: publish the payload retained at QoS 1
   on the device's ``config`` topic and mark it published.

A push recorded but not published (the broker was down, the process died between the two)
is found by :func:`unpublished_pushes` and published again; the device answers each version
once, so publishing twice is harmless. The device's answer on ``state`` closes the loop:
ingest writes it into the push's ``answer_*`` columns.
"""

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final, LiteralString

import paho.mqtt.client as paho
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion
from psycopg.abc import Params
from psycopg.rows import args_row, class_row
from psycopg.types.json import Jsonb

from services.common.db import Conn
from services.common.errors import GalvaniError
from services.common.mode_tables import EnvelopeProblem, envelope_problems
from services.common.protocol import CONFIG_CHANNEL, canonical_json, device_topic
from services.common.settings import ServiceSettings
from services.common.signing import sign_table

PUBLISH_TIMEOUT_S: Final = 10.0
# A node that stops answering (SIGSTOP, a partition) is left after one to two keepalives: paho
# pings after one without input and closes the connection one later without the answer. An
# attempt on a node whose kernel completes the TCP handshake and which then sends no CONNACK is
# given up after one. At 30 s a publisher on a stopped cluster node held tables back for 30-60
# s (docs/architecture.md, "The clustered broker"); a ping every 10 s on one connection per
# process costs nothing.
PUBLISHER_KEEPALIVE_S: Final = 10
SOURCES: Final = ("rule", "rollout", "api")


class PushError(GalvaniError):
    """A table that cannot be pushed; ``problems`` lists envelope violations, if any."""

    def __init__(self, message: str, problems: list[EnvelopeProblem] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []


@dataclass(frozen=True)
class Push:
    """A signed table recorded for one device."""

    device_id: str
    version: int
    payload: dict[str, Any]
    sha256: str

    @property
    def topic(self) -> str:
        """The device's config topic."""
        return device_topic(self.device_id, CONFIG_CHANNEL)


def table_sha256(payload: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the signed bytes: what a device reports in ``state.config.sha256``."""
    unsigned = {name: value for name, value in payload.items() if name != "sig"}
    return hashlib.sha256(canonical_json(unsigned)).hexdigest()


@dataclass(frozen=True)
class _Target:
    """The device a table is for: its next table version and its brand."""

    newest: int
    brand_id: str

    @property
    def version(self) -> int:
        return self.newest + 1


def record_push(
    conn: Conn,
    key: Ed25519PrivateKey,
    *,
    device_id: str,
    table: Mapping[str, Any],
    source: str,
    source_ref: str | None = None,
    mode_table_id: str | None = None,
) -> Push:
    """Version, check, sign and record ``table`` for ``device_id`` in the caller's transaction.

    ``table`` is unsigned; its ``version`` is replaced by the device's next one, and the
    signed object names the device, its brand and the signing key's ``kid``.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}")
    problems = envelope_problems(table["modes"])
    if problems:
        listed = "; ".join(f"{p.path}: {p.message}" for p in problems)
        raise PushError(f"the table leaves the safety envelope: {listed}", problems)
    # FOR UPDATE: two pushers of one device take versions one after the other.
    with conn.cursor(row_factory=args_row(_Target)) as cur:
        target = cur.execute(
            "SELECT greatest(coalesce(d.config_reported_version, 0),"
            "                coalesce(d.config_desired_version, 0),"
            "                coalesce((SELECT max(version) FROM config_pushes p"
            "                          WHERE p.device_id = d.id), 0)),"
            "       d.brand_id"
            " FROM devices d WHERE d.id = %s AND d.decommissioned_at IS NULL FOR UPDATE",
            [device_id],
        ).fetchone()
    if target is None:
        raise PushError(f"device {device_id} does not exist or is decommissioned")
    version = target.version
    # Bound to the device (and its brand) inside the signed bytes: a device refuses a table
    # signed for another (wrong_device), so this one cannot be republished to unlock it.
    signed = sign_table({**table, "version": version}, key, device=device_id, brand=target.brand_id)
    sha256 = table_sha256(signed)
    issued_at = signed.get("issued_at")
    expires_at = signed.get("expires_at")
    conn.execute(
        "INSERT INTO config_pushes (device_id, version, mode_table_id, payload, sha256, reason,"
        " source, source_ref, issued_at, expires_at)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        [
            device_id,
            version,
            mode_table_id,
            Jsonb(signed),
            sha256,
            str(signed.get("reason") or source),
            source,
            source_ref,
            _from_ms(issued_at),
            _from_ms(expires_at) if expires_at is not None else None,
        ],
    )
    conn.execute(
        "UPDATE devices SET config_desired_version = %s WHERE id = %s", [version, device_id]
    )
    return Push(device_id, version, dict(signed), sha256)


class Published(StrEnum):
    """What :func:`publish_push` did."""

    PUBLISHED = "published"
    SUPERSEDED = "superseded"  # a newer table was recorded for the device: not published
    BUSY = "busy"  # another process is publishing to the device: try again later


def connect_publisher(settings: ServiceSettings, client_id: str) -> paho.Client:
    """A broker client for :func:`publish_push`, connecting (and reconnecting) on a network
    thread of its own: a publisher waits for PUBACKs while its caller's loop does not run.
    TLS with verification on unless the settings turn it off (development only).

    MQTT 5 to Mosquitto, 3.1.1 to NATS's MQTT gateway (which refuses 5); each reconnection
    goes to the next of ``settings.mqtt_addresses()`` (a cluster's nodes)."""
    protocol = paho.MQTTv311 if settings.mqtt_protocol() == 4 else paho.MQTTv5
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
    client.username_pw_set(settings.mqtt_username, settings.mqtt_password.get_secret_value())
    context = settings.mqtt_tls_context()
    if context is not None:
        # A failed verification ends that attempt; paho's loop tries again with backoff.
        client.tls_set_context(context)
    client.reconnect_delay_set(1, 30)
    addresses = settings.mqtt_addresses()
    if len(addresses) > 1:
        client.on_pre_connect = _next_address(addresses)
    host, port = addresses[0]
    client.connect_async(host, port, keepalive=PUBLISHER_KEEPALIVE_S)
    client.loop_start()
    return client


def _next_address(addresses: list[tuple[str, int]]) -> Callable[[paho.Client, object], None]:
    """paho's pre-connect callback that moves every reconnection to the next node. paho calls
    it with the old socket closed and the new one not yet made; its ``host`` and ``port``
    setters refuse while the state says "connecting", so the attributes behind them are set."""
    attempts = 0

    def before_connect(client: paho.Client, userdata: object) -> None:
        nonlocal attempts
        client._host, client._port = addresses[attempts % len(addresses)]
        attempts += 1

    return before_connect


def publish_push(conn: Conn, client: paho.Client, push: Push) -> Published:
    """Publish ``push`` retained at QoS 1, wait for the PUBACK, and mark it published.

    Call after the transaction that recorded it has committed; ``conn`` is then used in a
    transaction of its own (the caller's, committed by the caller). Only the device's newest
    recorded table is published: an older one is marked superseded, since publishing it
    retained would roll the device's table back. A transaction-scoped advisory lock per device
    orders publishers, so the newest table is also the last published; it is only tried, never
    waited for. A caller whose publish fails must drop its client before its transaction ends:
    paho keeps an unacknowledged message queued and would send it, stale, on reconnect.
    """
    locked = conn.execute(
        "SELECT pg_try_advisory_xact_lock(hashtextextended('galvani-config:' || %s, 0))",
        [push.device_id],
    ).fetchone()
    if locked is None or not locked[0]:
        return Published.BUSY
    row = conn.execute(
        "SELECT config_desired_version FROM devices WHERE id = %s", [push.device_id]
    ).fetchone()
    if row is None or row[0] != push.version:
        conn.execute(
            "UPDATE config_pushes SET superseded_at = now()"
            " WHERE device_id = %s AND version = %s AND published_at IS NULL",
            [push.device_id, push.version],
        )
        return Published.SUPERSEDED
    info = client.publish(push.topic, canonical_json(push.payload), qos=1, retain=True)
    info.wait_for_publish(PUBLISH_TIMEOUT_S)
    if not info.is_published():
        raise PushError(f"the broker did not acknowledge table {push.version} for {push.device_id}")
    # The first publication stays in published_at (config_unacked measures from it); a later
    # one, by unanswered_pushes, goes to republished_at. Both right-hand sides read the row
    # as it was before this UPDATE.
    conn.execute(
        "UPDATE config_pushes SET published_at = coalesce(published_at, now()),"
        " republished_at = CASE WHEN published_at IS NULL THEN NULL ELSE now() END"
        " WHERE device_id = %s AND version = %s",
        [push.device_id, push.version],
    )
    return Published.PUBLISHED


def unpublished_pushes(conn: Conn, limit: int = 100) -> list[Push]:
    """Pushes recorded but neither acknowledged by the broker nor superseded, oldest first."""
    return _pushes(
        conn,
        "SELECT device_id, version, payload, sha256 FROM config_pushes"
        " WHERE published_at IS NULL AND superseded_at IS NULL ORDER BY id LIMIT %s",
        [limit],
    )


def unanswered_pushes(conn: Conn, grace_s: float, limit: int = 100) -> list[Push]:
    """Published tables a device has been back online for ``grace_s`` without answering.

    Mosquitto writes retained messages to disk every ``autosave_interval``: a broker killed
    -9 (or losing power) after acknowledging a table forgets it, and a device that was
    offline then never receives it. So each device's newest table, while unanswered, is
    published again once the device has reconnected after it was last published and has
    had ``grace_s`` to answer. Publishing sets ``republished_at``, so this happens once per
    reconnect; the device ignores a table it has already seen (same bytes, same fingerprint).
    ``published_at`` keeps the first publication, from which ``config_unacked`` measures.
    """
    return _pushes(
        conn,
        """
        SELECT p.device_id, p.version, p.payload, p.sha256 FROM config_pushes p
        JOIN devices d ON d.id = p.device_id
        WHERE p.published_at IS NOT NULL AND p.answer_status IS NULL
          AND p.superseded_at IS NULL AND d.decommissioned_at IS NULL
          AND d.config_desired_version = p.version
          AND (d.config_reported_version IS NULL OR d.config_reported_version < p.version)
          AND EXISTS (SELECT 1 FROM presence_log l
                      WHERE l.device_id = p.device_id AND l.online
                        AND l.received_at > coalesce(p.republished_at, p.published_at)
                        AND l.received_at < now() - make_interval(secs => %s))
        ORDER BY coalesce(p.republished_at, p.published_at) LIMIT %s
        """,
        [grace_s, limit],
    )


def _pushes(conn: Conn, query: LiteralString, params: Params) -> list[Push]:
    """The pushes ``query`` selects as ``device_id, version, payload, sha256``."""
    # A recorded payload is a signed table: a jsonb object, read as a dict.
    with conn.cursor(row_factory=class_row(Push)) as cur:
        return cur.execute(query, params).fetchall()


def _from_ms(value: object) -> datetime:
    if type(value) is not int:
        raise PushError(f"issued_at/expires_at must be epoch milliseconds, not {value!r}")
    return datetime.fromtimestamp(value / 1000, tz=UTC)
