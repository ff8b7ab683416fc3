"""Event time, property-based: the same messages give the same alerts in any arrival order.

Hypothesis generates the streams of a user's two devices (sessions, runs of unsafe samples
split over messages of varying size, reboots, faults, reports, rejected tables) and the
engine evaluates them twice against the real database, one message per transaction: once
in device order, once shuffled with some messages delivered two or three times (late,
out of order, duplicated, replayed). Both runs must count the same occurrences, open the same
alerts with the same counts and severities, and leave the same modes locked.
"""

import itertools
import random
from dataclasses import replace
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.signing import load_or_create_key
from services.rules.catalogue import BY_ID
from services.rules.engine import Received
from tests.rules import HOUR, MINUTE, SECOND, T0, Stream, run, setup_brand

_brands = itertools.count(1)

EPISODES: dict[str, dict[str, object]] = {
    "normal": {},
    "overcurrent": {"i_ua": 520.0},
    "spike": {"i_ua": 1200.0},
    "no_contact": {"z_ohm": 400_000.0},
    "dry": {"z_ohm": 60_000.0},
    "short": {"z_ohm": 250.0},
    "drift": {"i_ua": 200.0},
    "hot_electrode": {"t_elec_c": 41.5},
    "warm_electrode": {"t_elec_c": 39.5},
    "charging": {"charging": True},
    "low_battery": {"batt_pct": 10},
    "battery_heating": {"t_batt_c": 45.0},
}
# Output still on 1,231 s after the start: past the LIFT cap and its grace.
OVERRUN_AT_MS = 1_231_000

episode = st.tuples(
    st.sampled_from(sorted(EPISODES)),
    st.integers(min_value=0, max_value=100),  # gap after the previous episode, in samples
    st.integers(min_value=1, max_value=40),  # length in samples
    st.integers(min_value=1, max_value=10),  # samples per message
)
session = st.tuples(
    st.integers(min_value=0, max_value=1),  # device
    st.integers(min_value=0, max_value=9 * 24 * 60),  # start minute
    st.integers(min_value=200, max_value=1500),  # duration, s
    st.lists(episode, max_size=3),
    st.booleans(),  # end event sent
    st.sampled_from([None, "ann", "bob"]),  # the user the start event names
    st.booleans(),  # output still on past the cap
)
other = st.tuples(
    st.sampled_from(["reboot", "fault", "burn", "redness", "rejected"]),
    st.integers(min_value=0, max_value=1),
    st.integers(min_value=0, max_value=60),  # minute
)


def build(sessions: list[Any], others: list[Any]) -> list[Received]:
    """The two devices' messages in the order each device sent them."""
    streams = [Stream("d0"), Stream("d1")]
    free_at = [T0, T0]  # a device runs one session at a time: never two samples at one ts
    for n, (device, minute, duration_s, episodes, ended, user, overrun) in enumerate(sessions):
        start = max(T0 + minute * MINUTE, free_at[device])
        free_at[device] = start + max(duration_s * SECOND, OVERRUN_AT_MS) + MINUTE
        stream, name = streams[device], f"s{n}"
        stream.start(name, start, user=user)
        # Episodes follow one another: a device never sends two samples with one timestamp.
        position = 0
        for kind, gap, length, per_message in episodes:
            position += gap
            stream.samples(
                name,
                start + position * 100,
                length,
                per_message=per_message,
                **EPISODES[kind],  # type: ignore[arg-type]
            )
            position += length
        if overrun:
            stream.samples(name, start + OVERRUN_AT_MS, 3)
        if ended:
            stream.end(name, start + duration_s * SECOND, duration_s)
    for kind, device, minute in others:
        stream, at = streams[device], T0 - HOUR + minute * MINUTE
        if kind == "reboot":
            stream.event("reboot", at, reason="watchdog")
        elif kind == "fault":
            stream.event("fault", at, code="short_circuit")
        elif kind in ("burn", "redness"):
            stream.event("user_report", at, kind=kind)
        else:
            stream.state(
                at,
                {
                    "version": minute + 1,
                    "sha256": "ab" * 32,
                    "status": "rejected",
                    "reason": "stale_version",
                },
            )
    return streams[0].messages + streams[1].messages


def outcome(url: str, brand: str) -> dict[str, Any]:
    """What the engine left for one brand, with the brand's device prefix taken off."""
    strip = len(brand) + 1
    with psycopg.connect(url) as conn:
        runs = conn.execute(
            "SELECT substr(t.device_id, %s), t.rule, t.variant, t.started_at, t.ended_at"
            " FROM alert_triggers t JOIN devices d ON d.id = t.device_id"
            " WHERE d.brand_id = %s AND t.key IS NULL",
            [strip + 1, brand],
        ).fetchall()
        keyed = conn.execute(
            "SELECT substr(t.device_id, %s), t.rule, t.variant, t.key"
            " FROM alert_triggers t JOIN devices d ON d.id = t.device_id"
            " WHERE d.brand_id = %s AND t.key IS NOT NULL",
            [strip + 1, brand],
        ).fetchall()
        alerts = conn.execute(
            "SELECT substr(device_id, %s), rule, severity, count, state FROM alerts"
            " WHERE brand_id = %s",
            [strip + 1, brand],
        ).fetchall()
        locks = conn.execute(
            "SELECT substr(d.id, %s), p.payload->'locked_modes' FROM devices d"
            " LEFT JOIN config_pushes p"
            " ON p.device_id = d.id AND p.version = d.config_desired_version"
            " WHERE d.brand_id = %s",
            [strip + 1, brand],
        ).fetchall()
    return {
        "runs": sorted(runs),
        "keyed": sorted(keyed),
        # Self-resolving rules group occurrences by when contact came back in arrival order;
        # their occurrences are compared above.
        "alerts": sorted(a for a in alerts if not BY_ID[str(a[1])].self_resolving),
        "locks": sorted((d, sorted(m or [])) for d, m in locks),
    }


def evaluate_as(
    url: str,
    key: Any,
    messages: list[Received],
    brand: str,
    batch_sizes: list[int] | None = None,
) -> dict[str, Any]:
    # d0 is ann's; d1 has no registered user. Starts may name ann or bob (in the intro stage,
    # with a contraindication), so windows span devices and users differ from the registered one.
    setup_brand(
        url,
        [(f"{brand}-d0", "ann"), (f"{brand}-d1", None)],
        brand=brand,
        users={
            "ann": {"stage": "maintenance"},
            "bob": {"stage": "intro", "contraindications": ["implant"]},
        },
    )
    renamed = [replace(m, device_id=f"{brand}-{m.device_id}") for m in messages]
    run(url, key, renamed, batch_sizes=batch_sizes)
    return outcome(url, brand)


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_or_create_key(tmp_path_factory.mktemp("rules-key"))


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    sessions=st.lists(session, min_size=1, max_size=8),
    others=st.lists(other, max_size=6),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_alerts_do_not_depend_on_arrival_order_duplicates_or_replays(
    database_url: str, key: Any, sessions: list[Any], others: list[Any], seed: int
) -> None:
    messages = build(sessions, others)
    shuffler = random.Random(seed)
    delivered = messages + shuffler.sample(messages, k=len(messages) // 4)
    shuffler.shuffle(delivered)
    n = next(_brands)
    in_order = evaluate_as(database_url, key, messages, f"in{n}")
    # The shuffled stream is evaluated in batches of varying size, as a worker takes them.
    sizes = [shuffler.randint(1, 6) for _ in range(8)]
    shuffled = evaluate_as(database_url, key, delivered, f"sh{n}", batch_sizes=sizes)
    assert shuffled == in_order


def test_the_property_holds_for_a_known_tricky_stream(database_url: str, key: Any) -> None:
    """A run whose pieces arrive last-first, and whose middle arrives twice, counts once."""
    sessions = [
        (0, 0, 300, [("overcurrent", 0, 30, 3), ("no_contact", 100, 40, 7)], True, None, False)
    ]
    messages = build(sessions, [("reboot", 0, 1), ("reboot", 0, 2), ("reboot", 0, 3)])
    delivered = list(reversed(messages)) + messages[3:6]
    in_order = evaluate_as(database_url, key, messages, "known-a")
    shuffled = evaluate_as(database_url, key, delivered, "known-b")
    assert shuffled == in_order
    assert ("0", "overcurrent", "critical", 1, "open") in [
        (d[-1], r, s, c, st_) for d, r, s, c, st_ in in_order["alerts"]
    ]
    assert ("0", "reboot_loop", "critical", 1, "open") in [
        (d[-1], r, s, c, st_) for d, r, s, c, st_ in in_order["alerts"]
    ]
