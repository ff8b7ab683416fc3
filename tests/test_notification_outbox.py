"""The transactional outbox of alert notifications (migration 0014): the rows a transition
writes, in its own transaction, for each channel whose filter matches, and who may read them."""

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg import errors
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from services.common import pki, provisioning
from services.common.signing import load_or_create_key
from services.rules.sweeps import sweep
from tests.api import auth

RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
FIRST_SEEN = datetime(2026, 12, 1, 8, 30, 5, 250000, tzinfo=UTC)
LAST_SEEN = datetime(2026, 12, 1, 8, 31, tzinfo=UTC)
EXPLANATION = {
    "text": "electrode at 47 °C for 3 s",
    "threshold": {"t_elec_c": 45.0},
    "observed": {"t_elec_c": 47.0},
    "window": {"s": 3},
    "action": "alert",
}


@dataclass(frozen=True)
class Outbox:
    """The test's database as its owner, the rules' role and the API's role."""

    owner: str
    rules: str
    api: str

    def channel(
        self,
        brand: str = "acme",
        *,
        rules: Sequence[str] | None = None,
        min_severity: str = "info",
        models: Sequence[str] | None = None,
        transitions: Sequence[str] | None = None,
    ) -> int:
        """A webhook channel, made as the API's role (as its endpoint does)."""
        with psycopg.connect(self.api) as conn:
            row = conn.execute(
                "INSERT INTO notification_channels (brand_id, name, kind, url, secret_ciphertext,"
                " rules, min_severity, models, transitions)"
                " VALUES (%s, 'on-call', 'webhook', 'https://hooks.example.com/x', 'sealed',"
                " %s::text[], %s, %s::text[],"
                " coalesce(%s::text[], '{opened,count_raised,acknowledged,resolved}'))"
                " RETURNING id",
                [brand, _list(rules), min_severity, _list(models), _list(transitions)],
            ).fetchone()
        assert row is not None
        return int(row[0])

    def open_alert(
        self,
        device: str = "acme-dev-1",
        *,
        brand: str = "acme",
        rule: str = "electrode_overheat",
        severity: str = "critical",
    ) -> int:
        """An alert opened as the rules' role, committed."""
        with psycopg.connect(self.rules) as conn:
            return insert_alert(conn, brand, device, rule, severity)

    def update(self, alert_id: int, assignments: str, url: str | None = None) -> None:
        """``UPDATE alerts SET <assignments>`` on the alert, as the rules' role by default."""
        with psycopg.connect(url or self.rules) as conn:
            conn.execute(f"UPDATE alerts SET {assignments} WHERE id = %s", [alert_id])  # noqa: S608

    def rows(self, alert_id: int | None = None) -> list[dict[str, Any]]:
        """The outbox rows (of one alert, or all), oldest first."""
        with psycopg.connect(self.owner, row_factory=dict_row) as conn:
            return conn.execute(
                "SELECT * FROM notifications"
                " WHERE %(alert)s::bigint IS NULL OR alert_id = %(alert)s ORDER BY id",
                {"alert": alert_id},
            ).fetchall()

    def transitions(self, alert_id: int) -> list[tuple[int, str]]:
        """(channel, transition) of the alert's rows, oldest first."""
        return [(row["channel_id"], row["transition"]) for row in self.rows(alert_id)]


def _list(values: Sequence[str] | None) -> list[str] | None:
    return None if values is None else list(values)


def insert_alert(
    conn: psycopg.Connection[Any], brand: str, device: str, rule: str, severity: str
) -> int:
    """Insert an open alert on ``conn`` (not committed) and return its id."""
    row = conn.execute(
        "INSERT INTO alerts (brand_id, device_id, rule, rule_version, severity, first_seen,"
        " last_seen, explanation) VALUES (%s, %s, %s, 2, %s, %s, %s, %s) RETURNING id",
        [brand, device, rule, severity, FIRST_SEEN, LAST_SEEN, Jsonb(EXPLANATION)],
    ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def outbox(database_url: str, rules_database_url: str, api_database_url: str) -> Outbox:
    """Brands acme and other, acme's devices of two models and one of other's."""
    return brands_and_devices(database_url, rules_database_url, api_database_url)


def brands_and_devices(database_url: str, rules_database_url: str, api_database_url: str) -> Outbox:
    """Make brands acme and other, acme's devices of two models and one of other's."""
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO brands (id, name) VALUES ('acme', 'Acme'), ('other', 'Other')"
            " ON CONFLICT DO NOTHING"
        )
        conn.execute(
            "INSERT INTO devices (id, brand_id, model) VALUES ('acme-dev-1', 'acme', 'glow-2'),"
            " ('acme-dev-2', 'acme', 'glow-3'), ('other-dev-1', 'other', 'glow-2')"
        )
    return Outbox(database_url, rules_database_url, api_database_url)


def test_an_opened_alert_writes_one_row_per_channel_in_its_own_transaction(
    outbox: Outbox,
) -> None:
    first, second = outbox.channel(), outbox.channel()
    with psycopg.connect(outbox.rules) as conn:
        alert_id = insert_alert(conn, "acme", "acme-dev-1", "electrode_overheat", "critical")
        assert outbox.rows() == [], "visible before the transition committed"
    rows = outbox.rows(alert_id)
    assert [(row["channel_id"], row["transition"]) for row in rows] == [
        (first, "opened"),
        (second, "opened"),
    ]
    with psycopg.connect(outbox.owner) as conn:
        seq = conn.execute("SELECT change_seq FROM alerts WHERE id = %s", [alert_id]).fetchone()
    assert seq is not None
    change = int(seq[0])
    for row in rows:
        key = f"ntf_{row['channel_id']}_{alert_id}_opened_{change}"
        assert row["brand_id"] == "acme"
        assert row["alert_change"] == change
        assert row["idempotency_key"] == key
        assert row["status"] == "pending"
        assert row["attempts"] == 0
        payload = row["payload"]
        assert RFC3339_UTC.match(payload.pop("occurred_at"))
        assert payload == {
            "v": 1,
            "idempotency_key": key,
            "event": "alert.opened",
            "held_until": None,
            "brand": "acme",
            "alert": {
                "id": alert_id,
                "device_id": "acme-dev-1",
                "model": "glow-2",
                "rule": "electrode_overheat",
                "rule_version": 2,
                "severity": "critical",
                "state": "open",
                "count": 1,
                "first_seen": "2026-12-01T08:30:05.250000Z",
                "last_seen": "2026-12-01T08:31:00.000000Z",
                "explanation": EXPLANATION,
                "acknowledged_by": None,
                "resolved_by": None,
                "resolution": None,
            },
            "dashboard_url": None,
        }


def test_a_rolled_back_transition_leaves_no_notification(outbox: Outbox) -> None:
    outbox.channel()
    with psycopg.connect(outbox.rules) as conn:
        insert_alert(conn, "acme", "acme-dev-1", "electrode_overheat", "critical")
        conn.rollback()
    assert outbox.rows() == []


def test_timestamps_are_utc_whatever_the_session_time_zone(outbox: Outbox) -> None:
    outbox.channel()
    with psycopg.connect(outbox.rules) as conn:
        conn.execute("SET TIME ZONE 'America/Los_Angeles'")
        alert_id = insert_alert(conn, "acme", "acme-dev-1", "electrode_overheat", "critical")
    [row] = outbox.rows(alert_id)
    assert row["payload"]["alert"]["first_seen"] == "2026-12-01T08:30:05.250000Z"
    assert row["payload"]["occurred_at"].endswith("Z")


def test_each_transition_writes_its_kind_in_change_order(outbox: Outbox) -> None:
    channel = outbox.channel()
    alert_id = outbox.open_alert()
    outbox.update(alert_id, "count = count + 1, updated_at = now()")
    outbox.update(
        alert_id, "state = 'acknowledged', acknowledged_at = now(), acknowledged_by = 'x'"
    )
    outbox.update(alert_id, "count = count + 1")  # raised again while acknowledged
    outbox.update(alert_id, "state = 'resolved', resolved_at = now(), resolved_by = 'rules'")
    rows = outbox.rows(alert_id)
    assert [(row["channel_id"], row["transition"]) for row in rows] == [
        (channel, "opened"),
        (channel, "count_raised"),
        (channel, "acknowledged"),
        (channel, "count_raised"),
        (channel, "resolved"),
    ]
    changes = [row["alert_change"] for row in rows]
    assert changes == sorted(set(changes))
    assert [row["payload"]["event"] for row in rows] == [
        "alert.opened",
        "alert.count_raised",
        "alert.acknowledged",
        "alert.count_raised",
        "alert.resolved",
    ]
    assert [row["payload"]["alert"]["count"] for row in rows] == [1, 2, 2, 3, 3]
    assert rows[2]["payload"]["alert"]["acknowledged_by"] == "x"
    assert rows[4]["payload"]["alert"]["state"] == "resolved"
    assert rows[4]["payload"]["alert"]["resolved_by"] == "rules"


@pytest.mark.parametrize(
    "assignments",
    [
        "last_seen = last_seen + interval '1 minute', updated_at = now()",
        'explanation = \'{"text": "other"}\', updated_at = now()',
        "severity = 'warning'",
        "count = count",
    ],
)
def test_a_change_that_is_no_transition_writes_nothing(outbox: Outbox, assignments: str) -> None:
    outbox.channel()
    alert_id = outbox.open_alert()
    outbox.update(alert_id, "count = 3")
    before = len(outbox.rows(alert_id))
    outbox.update(alert_id, assignments)
    assert len(outbox.rows(alert_id)) == before


def test_a_count_lowered_by_a_merge_writes_nothing(outbox: Outbox) -> None:
    outbox.channel()
    alert_id = outbox.open_alert()
    outbox.update(alert_id, "count = 3")
    outbox.update(alert_id, "count = 2, updated_at = now()")
    assert outbox.transitions(alert_id)[-1][1] == "count_raised"
    assert len(outbox.rows(alert_id)) == 2


def test_channels_filter_by_rule_severity_model_and_transition(outbox: Outbox) -> None:
    every = outbox.channel()
    overheat = outbox.channel(rules=["electrode_overheat", "battery_hot"])
    warning = outbox.channel(min_severity="warning")
    critical = outbox.channel(min_severity="critical")
    glow3 = outbox.channel(models=["glow-3"])
    resolved_only = outbox.channel(transitions=["resolved"])

    critical_overheat = outbox.open_alert("acme-dev-1", severity="critical")
    assert outbox.transitions(critical_overheat) == [
        (every, "opened"),
        (overheat, "opened"),
        (warning, "opened"),
        (critical, "opened"),
    ]
    info_on_glow3 = outbox.open_alert("acme-dev-2", rule="session_long", severity="info")
    assert outbox.transitions(info_on_glow3) == [(every, "opened"), (glow3, "opened")]
    warning_on_glow3 = outbox.open_alert("acme-dev-2", rule="battery_hot", severity="warning")
    assert outbox.transitions(warning_on_glow3) == [
        (every, "opened"),
        (overheat, "opened"),
        (warning, "opened"),
        (glow3, "opened"),
    ]
    outbox.update(info_on_glow3, "state = 'resolved', resolved_at = now()")
    assert outbox.transitions(info_on_glow3)[2:] == [
        (every, "resolved"),
        (glow3, "resolved"),
        (resolved_only, "resolved"),
    ]


def test_a_deleted_channel_gets_nothing(outbox: Outbox) -> None:
    live, deleted = outbox.channel(), outbox.channel()
    with psycopg.connect(outbox.api) as conn:
        conn.execute("UPDATE notification_channels SET deleted_at = now() WHERE id = %s", [deleted])
    alert_id = outbox.open_alert()
    assert outbox.transitions(alert_id) == [(live, "opened")]


def test_a_brand_never_gets_another_brands_alert(outbox: Outbox) -> None:
    acme = outbox.channel("acme")
    other = outbox.channel("other")
    acme_alert = outbox.open_alert("acme-dev-1")
    other_alert = outbox.open_alert("other-dev-1", brand="other")
    outbox.update(acme_alert, "state = 'resolved', resolved_at = now()")
    assert {row["channel_id"] for row in outbox.rows(acme_alert)} == {acme}
    assert {row["channel_id"] for row in outbox.rows(other_alert)} == {other}
    assert {row["brand_id"] for row in outbox.rows(other_alert)} == {"other"}


def test_the_same_transition_is_queued_once_per_channel(outbox: Outbox) -> None:
    channel = outbox.channel()
    alert_id = outbox.open_alert()
    [queued] = outbox.rows(alert_id)
    with psycopg.connect(outbox.owner) as conn:
        inserted = conn.execute(
            "INSERT INTO notifications (channel_id, brand_id, alert_id, transition, alert_change,"
            " idempotency_key, payload) VALUES (%s, 'acme', %s, 'opened', %s, %s, '{}')"
            " ON CONFLICT (idempotency_key) DO NOTHING",
            [channel, alert_id, queued["alert_change"], queued["idempotency_key"]],
        ).rowcount
    assert inserted == 0


def test_a_new_notification_wakes_a_listening_dispatcher_at_commit(
    outbox: Outbox, notify_database_url: str
) -> None:
    outbox.channel()
    with psycopg.connect(notify_database_url, autocommit=True) as listener:
        listener.execute("LISTEN galvani_notifications")
        with psycopg.connect(outbox.rules) as conn:
            insert_alert(conn, "acme", "acme-dev-1", "electrode_overheat", "critical")
            conn.rollback()
        assert list(listener.notifies(timeout=0.3)) == []
        outbox.open_alert()
        woken = list(listener.notifies(timeout=5, stop_after=1))
    assert [notify.channel for notify in woken] == ["galvani_notifications"]


def test_the_notify_role_reads_and_updates_notifications_and_nothing_else(
    outbox: Outbox, notify_database_url: str
) -> None:
    channel = outbox.channel()
    alert_id = outbox.open_alert()
    with psycopg.connect(notify_database_url) as conn:
        [(secret,)] = conn.execute(
            "SELECT secret_ciphertext FROM notification_channels WHERE id = %s", [channel]
        ).fetchall()
        assert secret == b"sealed"
        updated = conn.execute(
            "UPDATE notifications SET status = 'delivered', delivered_at = now(),"
            " attempts = attempts + 1, last_status_code = 204 WHERE alert_id = %s",
            [alert_id],
        ).rowcount
        assert updated == 1
    assert outbox.rows(alert_id)[0]["status"] == "delivered"
    for statement in (
        "SELECT * FROM alerts",
        "SELECT key_hash FROM api_keys",
        "SELECT * FROM devices",
        "DELETE FROM notifications",
        "UPDATE notification_channels SET deleted_at = now()",
        "INSERT INTO notifications (channel_id, brand_id, transition, alert_change,"
        " idempotency_key, payload) VALUES (1, 'acme', 'test', 0, 'k', '{}')",
    ):
        with (
            psycopg.connect(notify_database_url) as conn,
            pytest.raises(errors.InsufficientPrivilege),
        ):
            conn.execute(statement)


def test_the_alert_changing_roles_need_no_grant_on_the_outbox(outbox: Outbox) -> None:
    """The trigger writes as its owner; the rules' role itself may not touch the outbox."""
    with psycopg.connect(outbox.rules) as conn, pytest.raises(errors.InsufficientPrivilege):
        conn.execute("SELECT * FROM notifications")
    with psycopg.connect(outbox.api) as conn, pytest.raises(errors.InsufficientPrivilege):
        conn.execute("DELETE FROM notifications")


def test_the_apis_acknowledge_and_resolve_write_their_notifications(
    keys: dict[str, str], outbox: Outbox, client: TestClient
) -> None:
    # keys (which makes the brands) before outbox, which adds the devices to them.
    channel = outbox.channel()
    alert_id = outbox.open_alert()
    acked = client.post(f"/v1/alerts/{alert_id}/ack", headers=auth(keys["support"]))
    assert acked.status_code == 200, acked.text
    resolved = client.post(
        f"/v1/alerts/{alert_id}/resolve", headers=auth(keys["admin"]), json={"note": "replaced"}
    )
    assert resolved.status_code == 200, resolved.text
    rows = outbox.rows(alert_id)
    assert [(row["channel_id"], row["transition"]) for row in rows] == [
        (channel, "opened"),
        (channel, "acknowledged"),
        (channel, "resolved"),
    ]
    assert rows[1]["payload"]["alert"]["state"] == "acknowledged"
    assert rows[1]["payload"]["alert"]["acknowledged_by"]
    assert rows[2]["payload"]["alert"]["resolved_by"]


def test_the_rules_workers_own_transitions_write_their_notifications(
    outbox: Outbox, tmp_path: Path
) -> None:
    """The rules' sweep (its real code, as its role) opens certificate_expiring for a device
    and resolves it when a newer certificate is issued: each in the sweep's transaction."""
    channel = outbox.channel(rules=["certificate_expiring"], models=["glow-cert"])
    authority, key = pki.Authority.create("Test device CA"), load_or_create_key(tmp_path / "k")
    with psycopg.connect(outbox.owner) as conn:
        not_after = provisioning.provision_certificate_device(
            conn,
            authority,
            provisioning.CertificateRequest(csr=pki.device_csr(pki.new_device_key(), "cert-0001")),
            device_id="cert-0001",
            brand_id="acme",
            model="glow-cert",
        ).not_after
    now = not_after - timedelta(days=29)
    with psycopg.connect(outbox.rules) as conn, conn.transaction():
        sweep(conn, key, now)
    with psycopg.connect(outbox.owner) as conn:
        provisioning.renew_certificate(
            conn,
            authority,
            provisioning.CertificateRequest(csr=pki.device_csr(pki.new_device_key(), "cert-0001")),
            device_id="cert-0001",
            brand_id="acme",
            days=400,
        )
    with psycopg.connect(outbox.rules) as conn, conn.transaction():
        sweep(conn, key, now + timedelta(hours=1))
    rows = outbox.rows()
    assert [(row["channel_id"], row["transition"]) for row in rows] == [
        (channel, "opened"),
        (channel, "resolved"),
    ]
    opened = rows[0]["payload"]["alert"]
    assert (opened["rule"], opened["device_id"], opened["model"]) == (
        "certificate_expiring",
        "cert-0001",
        "glow-cert",
    )
    assert rows[1]["payload"]["alert"]["resolved_by"]


def test_channels_of_every_kind_made_through_the_api_get_their_alerts(
    keys: dict[str, str], outbox: Outbox, client: TestClient
) -> None:
    """The trigger queues for a Slack, PagerDuty or e-mail channel exactly as for a webhook:
    the same rows, the same payload (the dispatcher renders it for the kind)."""
    bodies = [
        {"kind": "webhook", "url": "https://93.184.215.14/hook"},
        {"kind": "slack", "url": "https://93.184.215.14/services/T0/B0/t0ken"},
        {"kind": "pagerduty", "routing_key": "0123456789abcdef0123456789ABCDEF"},
        {"kind": "email", "recipients": ["oncall@example.com"]},
    ]
    channels = []
    for body in bodies:
        made = client.post(
            "/v1/notification-channels",
            json={"name": body["kind"], "min_severity": "warning", **body},
            headers=auth(keys["admin"]),
        )
        assert made.status_code == 201, made.text
        channels.append(made.json()["id"])
    quiet = outbox.open_alert(rule="session_long", severity="info")  # below every minimum
    alert_id = outbox.open_alert(severity="warning")
    outbox.update(alert_id, "state = 'resolved', resolved_at = now()")
    assert outbox.rows(quiet) == []
    rows = outbox.rows(alert_id)
    assert [(row["channel_id"], row["transition"]) for row in rows] == [
        *((channel, "opened") for channel in channels),
        *((channel, "resolved") for channel in channels),
    ]
    for transition in ("opened", "resolved"):
        payloads = [
            {**row["payload"], "idempotency_key": None}
            for row in rows
            if row["transition"] == transition
        ]
        assert all(payload == payloads[0] for payload in payloads), payloads
