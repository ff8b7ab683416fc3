"""The fault suite on a three-node NATS cluster (tests/cluster_faults.py): one node killed -9,
an ingest worker killed -9, one node paused (SIGSTOP) for 30 s, each under a simulated fleet's
load, in that order on one stack.

After each fault the ledger must show, for every message a device deleted from its outbox,
exactly one stored row (0 lost, 0 duplicated); every device of the struck node, and the rules'
config publisher if it was there, must be connected to a survivor within its bound, and the
rules must keep raising alerts. Each test prints its figure lines; docs/architecture.md ("The
clustered broker") quotes them. ``make bench-cluster`` runs the same faults on a larger fleet.
"""

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.config_push import PUBLISHER_KEEPALIVE_S
from tests.cluster_faults import KEEPALIVE_S, ClusterFaultStack
from tests.faults import read_outboxes, stored_seqs
from tests.ingest import wait_until
from tests.test_faults import assert_nothing_lost

pytestmark = pytest.mark.slow

DEVICES = 30
ACTIVITY = 2000.0
SETTLE_S = 4.0
NODE_DOWN_S = 5.0
SERVICE_DOWN_S = 2.0
PAUSE_S = 30.0  # issue 22: "stop it with SIGSTOP for 30 s"
# What docs/architecture.md promises: a device whose node is killed is on a survivor within
# 20 s (measured: see the module's figure lines), one whose node stops answering within
# 2 keepalives plus that; the same for the rules' config publisher, with its own keepalive.
RECONNECT_BOUND_S = 20.0
ALERTS_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def stack(stack_root: Path) -> Iterator[ClusterFaultStack]:
    stack = ClusterFaultStack(
        root=stack_root / "cluster-faults", devices=DEVICES, activity=ACTIVITY
    )
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def assert_reconnected_within(
    stack: ClusterFaultStack, bound_s: float, backend_bound_s: float
) -> None:
    """The struck node's devices, and the backend's clients it held (the rules' config
    publisher), each on a survivor within its bound."""
    result = stack.reconnects[-1]
    assert result.clients > 0, f"no device was on node {result.node} when it was struck"
    assert result.missing == 0, result.line()
    slowest = result.slowest()
    assert slowest is not None
    assert result.arrivals[slowest] <= bound_s, "\n".join(
        [result.line(), f"{slowest}'s log:", *stack.fleet_log_of(slowest)]
    )
    backend = stack.backend_reconnects[-1]
    assert backend.missing == 0, backend.line()
    assert max(backend.seconds, default=0.0) <= backend_bound_s, backend.line()


def assert_alerts_keep_flowing(stack: ClusterFaultStack, since: float) -> None:
    wait_until(
        lambda: stack.alerts_raised_since(since) > 0,
        ALERTS_TIMEOUT_S,
        "an alert opened or raised after the fault",
    )


def test_a_node_killed_9_loses_and_duplicates_nothing_and_its_devices_move(
    stack: ClusterFaultStack,
) -> None:
    node = stack.busiest_node()
    struck = time.time()
    stack.run_fault("node_kill9", lambda: stack.kill_node(node, NODE_DOWN_S), SETTLE_S)
    assert_nothing_lost(stack, "node_kill9")
    assert_reconnected_within(stack, RECONNECT_BOUND_S, RECONNECT_BOUND_S)
    assert_alerts_keep_flowing(stack, struck)


def test_an_ingest_worker_killed_9_on_the_cluster_loses_and_duplicates_nothing(
    stack: ClusterFaultStack,
) -> None:
    stack.run_fault("ingest_kill9", lambda: stack.kill_ingest(SERVICE_DOWN_S), SETTLE_S)
    assert_nothing_lost(stack, "ingest_kill9")


def test_a_node_paused_30_s_loses_and_duplicates_nothing_and_its_devices_move(
    stack: ClusterFaultStack,
) -> None:
    node = stack.busiest_node()
    struck = time.time()
    stack.run_fault("node_pause30", lambda: stack.pause_node(node, PAUSE_S), SETTLE_S)
    assert_nothing_lost(stack, "node_pause30")
    assert_reconnected_within(
        stack, 2 * KEEPALIVE_S + RECONNECT_BOUND_S, 2 * PUBLISHER_KEEPALIVE_S + RECONNECT_BOUND_S
    )
    assert_alerts_keep_flowing(stack, struck)


def test_every_message_waiting_in_an_outbox_at_a_cluster_fault_is_stored_in_the_end(
    stack: ClusterFaultStack,
) -> None:
    held = stack.held
    assert held, "no message was waiting in an outbox at any fault"
    wait_until(
        lambda: not (held & read_outboxes(stack.store)[2]),
        DRAIN_TIMEOUT_S,
        f"the {len(held)} messages held at the faults to leave their outboxes",
    )
    assert stored_seqs(stack.database_url, held) == held
