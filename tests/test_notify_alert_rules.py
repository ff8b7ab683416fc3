"""The notification dispatchers' alert rules (deploy/prometheus/galvani-notify-alerts.yml):
valid, unit-tested with promtool, and on metrics services/notify really exports."""

import re

import psycopg
from prometheus_client import REGISTRY, generate_latest

import services.notify.metrics  # noqa: F401 (registers the dispatcher's metrics)
from services.notify.dispatcher import queue_stats
from tests.promtool import RULES_DIR, check_rules, run_rule_tests

RULES = "galvani-notify-alerts.yml"


def test_notify_alert_rules_pass_promtool_check() -> None:
    assert "SUCCESS: 2 rules found" in check_rules(RULES)


def test_notify_alert_rules_fire_as_their_unit_tests_expect() -> None:
    assert "SUCCESS" in run_rule_tests("galvani-notify-alerts.test.yml")


def test_notify_alert_rules_use_only_metrics_the_dispatcher_exports() -> None:
    exported = set(
        re.findall(r"^(galvani_notify_\w+?)(?:\{| )", generate_latest(REGISTRY).decode(), re.M)
    )
    used = set(re.findall(r"galvani_notify_\w+", (RULES_DIR / RULES).read_text()))
    assert used == {"galvani_notify_oldest_pending_age_seconds", "galvani_notify_deliveries_total"}
    assert used <= exported, f"not exported: {used - exported}"


def test_oldest_pending_age_leaves_out_rows_held_by_quiet_hours(database_url: str) -> None:
    """The backlog alert's gauge: a row held until the end of its quiet window is not late
    while it waits; once released, its age counts from the release, not from its creation."""
    with psycopg.connect(database_url) as conn:
        conn.execute("INSERT INTO brands (id, name) VALUES ('acme', 'Acme')")
        channel = conn.execute(
            "INSERT INTO notification_channels (brand_id, name, kind, url, secret_ciphertext)"
            " VALUES ('acme', 'hook', 'webhook', 'https://hooks.example.com/', '\\x00')"
            " RETURNING id"
        ).fetchone()
        assert channel is not None

        def queue(n: int, created_ago_s: int, held_until_in_s: int | None) -> None:
            conn.execute(
                "INSERT INTO notifications (channel_id, brand_id, transition, alert_change,"
                " idempotency_key, payload, created_at, held_until, next_attempt_at)"
                " SELECT %(channel)s, 'acme', 'test', %(n)s, 'ntf_test_' || %(n)s, '{}',"
                "  now() - make_interval(secs => %(ago)s), h, coalesce(h, now())"
                " FROM (SELECT now() + make_interval(secs => %(held)s) AS h) held",
                {"channel": channel[0], "n": n, "ago": created_ago_s, "held": held_until_in_s},
            )

        # Written 8 hours ago, held by quiet hours for another hour: not counted.
        queue(1, 8 * 3600, 3600)
        depth, oldest = queue_stats(conn)
        assert (depth, oldest) == (1, 0.0)
        # Written 8 hours ago, released 2 minutes ago: 120 s late, not 8 hours.
        queue(2, 8 * 3600, -120)
        depth, oldest = queue_stats(conn)
        assert depth == 2
        assert 119 < oldest < 180
        # Never held, written 20 minutes ago: the oldest.
        queue(3, 1200, None)
        assert 1199 < queue_stats(conn)[1] < 1260
