"""``make run-cluster`` as a user meets it: one command, a three-node NATS cluster, the whole
backend spread over it, a simulated fleet spread over the nodes, and run.json naming every
node; the dashboard's API sees the fleet; a node killed -9 is started again by the runner
and its devices go on being stored."""

import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest

from deploy.stack.processes import http_get
from tests.test_run import alive, start_runner, wait_for_run_json

pytestmark = pytest.mark.slow

DEVICES = 6
STORED_TIMEOUT_S = 60.0


def fleet_status(info: dict) -> dict:
    try:
        return dict(json.loads(Path(info["sim_fleet_status"]).read_text()))
    except (OSError, ValueError):
        return {}


def telemetry_messages(info: dict) -> int:
    with psycopg.connect(info["database_url"], connect_timeout=5) as conn:
        row = conn.execute("SELECT count(*) FROM telemetry_messages").fetchone()
    return int(row[0]) if row else 0


def wait_for(check, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_run_cluster_starts_three_nodes_spreads_everything_and_restarts_a_killed_node(
    stack_root: Path,
) -> None:
    data_dir = stack_root / "run-cluster"
    data_dir.mkdir()
    os.chmod(data_dir, 0o755)
    process = start_runner(
        data_dir,
        "deploy.run_cluster",
        GALVANI_SIM_DEVICES=str(DEVICES),
        GALVANI_SIM_ACTIVITY="2000",
    )
    try:
        info = wait_for_run_json(process, data_dir)
        broker = info["broker"]
        assert broker["kind"] == "nats"
        nodes = broker["nodes"]
        assert [node["name"] for node in nodes] == ["n1", "n2", "n3"]
        assert len({node["mqtt"] for node in nodes}) == 3
        assert all(alive(node["pid"]) for node in nodes)
        # Ingest and rules workers are spread over the nodes by the order they start in, and
        # the auth-callout responders run beside them.
        pids = info["pids"]
        assert {"ingest-1", "ingest-2", "ingest-3", "rules-1", "rules-2"} <= set(pids)
        assert {"broker-access-1", "broker-access-2"} <= set(pids)
        # The fleet is spread over the three nodes.
        wait_for(
            lambda: (
                len(fleet_status(info).get("connected_by_node", {})) == 3
                and fleet_status(info).get("connected") == DEVICES
            ),
            30,
            "every device connected, on three nodes",
        )
        wait_for(lambda: telemetry_messages(info) > DEVICES, STORED_TIMEOUT_S, "telemetry")
        # What the dashboard shows comes from the API: the fleet's devices, online.
        request = urllib.request.Request(
            info["api_url"] + "/v1/devices?limit=50",
            headers={"Authorization": f"Bearer {info['demo_admin_key']}"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            listed = json.loads(response.read())
        assert len(listed["items"]) == DEVICES
        # Maintenance watches every node.
        metrics = http_get(info["metrics"]["maintenance"]) or b""
        assert metrics.count(b"galvani_broker_node_up{") == 3
        # kill -9 one node: the runner starts it again (run.json gets its new pid) and the
        # fleet's messages go on being stored.
        victim = nodes[0]
        os.kill(victim["pid"], signal.SIGKILL)
        before = telemetry_messages(info)

        def restarted() -> bool:
            current = json.loads((data_dir / "run.json").read_text())["broker"]["nodes"][0]
            return current["pid"] not in (None, victim["pid"]) and alive(current["pid"])

        wait_for(restarted, 60, "the killed node to be started again")
        wait_for(lambda: telemetry_messages(info) > before, STORED_TIMEOUT_S, "more telemetry")
    except BaseException:
        if process.poll() is not None:  # the runner itself ended: say why
            pytest.fail(f"make run-cluster exited {process.returncode}: {process.stderr.read()}")
        raise
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=90)
    assert process.returncode == 0, err
    assert not (data_dir / "run.json").exists()
    assert not any(alive(node["pid"]) for node in nodes[1:])
