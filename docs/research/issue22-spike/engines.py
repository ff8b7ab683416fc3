"""Issue 22 engine spike: NATS 2.10.27 and RabbitMQ 3.10.8, three nodes each, one harness.

Throwaway research code (not run by any make target; see README.md here). One ``run`` starts
a fresh 3-node cluster of one engine on loopback (own ports, data dirs and, for RabbitMQ, own
epmd port and cookie), then:

1. a backend consumer process creates what a worker would (NATS: stream ``GALVANI_ENG``, R3,
   file storage, interest retention, over ``galvani.v1.d.*.telemetry``, and the durable pull
   consumer ``ingest``; RabbitMQ: quorum queue ``galvani-eng`` on all 3 nodes bound to
   ``amq.topic`` with ``galvani.v1.d.*.telemetry``) and acks every message after recording
   its (device, seq) in a ledger, the way a worker acks after its commit;
2. ``--clients`` MQTT 3.1.1 device connections in ``--procs`` load processes (raw asyncio
   protocol, the payloads of bench/mqtt_load.py: 10 samples a message, ~1 KB) spread over the
   3 nodes, QoS 1, each keeping ``--window`` publishes in flight and subscribing (QoS
   ``--sub-qos``) to its own ack topic as the device agent does;
3. ``--warmup`` s of load, then ``--seconds`` s measured: PUBACKs/s, consumed+acked/s, and the
   CPU seconds of the broker processes (/proc/<pid>/stat) per 1000 PUBACKed messages;
4. ``kill -9`` of the node that leads the stream (NATS) or the quorum queue (RabbitMQ) under
   load; the dropped devices reconnect to the next node at once (a device's failover list).
   For ``--after-kill`` s the harness records when each device reconnected and when its
   publishes were acknowledged again, and every device's longest PUBACK gap across the kill;
5. publishing stops, the last PUBACKs drain, the consumer gets up to ``DELIVERY_WAIT_S`` to
   receive the rest, and the ledgers are compared: a PUBACKed (device, seq) the consumer
   never received is lost; a (device, seq) received twice is a duplicate.

The load processes use a raw asyncio MQTT client rather than paho, because paho costs tens of
microseconds per publish (bench/mqtt_load.py's docstring), all of it taken from the two cores
the brokers run on; both engines get the same client.

The RabbitMQ consumer needs ``pika``, which the project does not depend on: it runs under
``--pika-python`` (a throwaway venv). This file therefore imports only the standard library at
module level; the project's payload code is imported inside the load processes.
"""

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

REPO: Final = Path(__file__).resolve().parents[3]
HOST: Final = "127.0.0.1"
DEVICE_USER, DEVICE_PASSWORD = "dev", "dev-pw"
SERVICE_USER, SERVICE_PASSWORD = "svc", "svc-pw"
STREAM: Final = "GALVANI_ENG"
# --nats-source mqtt-msgs: the consumer reads NATS's own MQTT stream, which holds every QoS 1
# publish before its PUBACK, instead of a user stream that captures the subjects afterwards.
MQTT_MSGS: Final = "$MQTT_msgs"
DURABLE: Final = "ingest"
QUEUE: Final = "galvani-eng"
SUBJECT_FILTER: Final = "galvani.v1.d.*.telemetry"
RMQ_HOME: Final = Path("/usr/lib/rabbitmq/lib/rabbitmq_server-3.10.8")
RMQ_USER: Final = "postgres"  # any unprivileged user: the harness runs as root
RMQ_EPMD_PORT: Final = 24570
# Below the ephemeral range (32768-60999): a port there can be taken by any outgoing
# connection on the machine between two runs.
NATS_PORTS: Final = {"client": 24500, "cluster": 24510, "http": 24520, "mqtt": 24530}
RMQ_PORTS: Final = {"amqp": 24540, "dist": 24550, "mqtt": 24560}

KEEPALIVE_S: Final = 600
CONNECT_TIMEOUT_S: Final = 10.0  # NATS: a first MQTT CONNECT creates the $MQTT streams (~4 s)
RECONNECT_PAUSE_S: Final = 0.05
CONNECT_CONCURRENCY: Final = 20
DRAIN_TIMEOUT_S: Final = 20.0
DELIVERY_WAIT_S: Final = (
    60.0  # > the NATS consumer's 30 s ack_wait, so a lost delivery is redelivered
)
DELIVERY_SETTLE_S: Final = 3.0
BIN_S: Final = 0.1
SEQ_RE: Final = re.compile(rb'"seq": (\d+), "session": "s-([a-z0-9-]+)"')
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


def log(text: str) -> None:
    """One progress line on stderr, with the wall-clock time."""
    print(time.strftime("%H:%M:%S"), text, file=sys.stderr, flush=True)


# --- /proc ------------------------------------------------------------------------------


def proc_children() -> dict[int, list[int]]:
    """Every process's children, from /proc/<pid>/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    return children


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    children = proc_children()
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def cpu_s(pids: Sequence[int]) -> float:
    """utime+stime of ``pids`` (children already reaped are not counted)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


# --- Clusters ---------------------------------------------------------------------------


@dataclass
class Node:
    name: str
    mqtt_port: int
    admin_port: int  # NATS client port / AMQP port
    data_dir: Path
    process: subprocess.Popen[bytes] | None = None


class Cluster:
    """Three nodes of one engine; subclasses know how to start, lead and kill them."""

    engine = ""

    def __init__(self, base: Path):
        self.base = base
        self.nodes: list[Node] = []

    def broker_pids(self) -> list[int]:
        """Every process of every node that is still running."""
        pids: list[int] = []
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                pids.extend(tree(node.process.pid))
        return pids

    def start(self) -> None:
        raise NotImplementedError

    def leader(self) -> int:
        raise NotImplementedError

    def leaders(self) -> dict[str, str]:
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        raise NotImplementedError

    def kill(self, index: int) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class NatsCluster(Cluster):
    engine = "nats"

    def __init__(self, base: Path, binary: str, source: str):
        super().__init__(base)
        self.binary = binary
        self.stream = STREAM if source == "stream" else MQTT_MSGS
        for i in range(1, 4):
            self.nodes.append(
                Node(
                    f"eng{i}",
                    NATS_PORTS["mqtt"] + i,
                    NATS_PORTS["client"] + i,
                    base / f"n{i}",
                )
            )

    def config(self, i: int) -> str:
        node = self.nodes[i - 1]
        routes = ", ".join(
            f"nats-route://{HOST}:{NATS_PORTS['cluster'] + j}" for j in range(1, 4) if j != i
        )
        return f"""server_name: {node.name}
listen: {HOST}:{node.admin_port}
http: {HOST}:{NATS_PORTS["http"] + i}
jetstream {{ store_dir: "{node.data_dir}/js", max_memory_store: 256MB, max_file_store: 8GB }}
cluster {{ name: galvani-eng, listen: {HOST}:{NATS_PORTS["cluster"] + i}, routes: [{routes}] }}
mqtt {{ listen: {HOST}:{node.mqtt_port}, stream_replicas: 3 }}
accounts {{
  GALVANI {{ jetstream: enabled, users: [
    {{user: {DEVICE_USER}, password: {DEVICE_PASSWORD}, permissions: {{
      publish: ["galvani.v1.d.>"], subscribe: ["galvani.v1.d.>", "$MQTT.sub.>"]}}}},
    {{user: {SERVICE_USER}, password: {SERVICE_PASSWORD}}} ] }}
  SYS {{ users: [{{user: sys, password: sys}}] }}
}}
system_account: SYS
"""

    def start(self) -> None:
        for i, node in enumerate(self.nodes, 1):
            node.data_dir.mkdir(parents=True)
            conf = node.data_dir / "nats.conf"
            conf.write_text(self.config(i))
            node.process = subprocess.Popen(
                ["nice", "-n", "10", self.binary, "-c", str(conf), "-l", str(node.data_dir / "log")]
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if all(
                    b'"ok"' in self._http(i, "/healthz?js-enabled-only=true") for i in range(1, 4)
                ) and json.loads(self._http(1, "/jsz")).get("meta_cluster", {}).get("leader"):
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError("NATS cluster did not become healthy in 60 s")

    def _http(self, i: int, path: str) -> bytes:
        with urllib.request.urlopen(
            f"http://{HOST}:{NATS_PORTS['http'] + i}{path}", timeout=3
        ) as r:
            return bytes(r.read())

    def leaders(self) -> dict[str, str]:
        """Which server leads the meta group, the stream and the MQTT streams."""
        found: dict[str, str] = {}
        for i in range(1, 4):
            with contextlib.suppress(OSError, ValueError):
                jsz = json.loads(self._http(i, "/jsz?accounts=1&streams=1"))
                found["meta"] = jsz.get("meta_cluster", {}).get("leader", "")
                for account in jsz.get("account_details", []):
                    for stream in account.get("stream_detail", []):
                        leader = stream.get("cluster", {}).get("leader")
                        if leader and stream["name"] in (STREAM, "$MQTT_msgs", "$MQTT_sess"):
                            found[stream["name"]] = leader
        return found

    def state(self) -> dict[str, Any]:
        """The stream's and the consumer's counters, from a running node."""
        for i, node in enumerate(self.nodes, 1):
            if node.process is None or node.process.poll() is not None:
                continue
            with contextlib.suppress(OSError, ValueError):
                jsz = json.loads(self._http(i, "/jsz?accounts=1&streams=1&consumers=1"))
                for account in jsz.get("account_details", []):
                    for stream in account.get("stream_detail", []):
                        if stream["name"] != self.stream:
                            continue
                        consumers = {
                            c["name"]: {
                                k: c.get(k)
                                for k in (
                                    "delivered",
                                    "ack_floor",
                                    "num_ack_pending",
                                    "num_redelivered",
                                    "num_pending",
                                )
                            }
                            for c in stream.get("consumer_detail", [])
                        }
                        return {"stream": stream.get("state"), "consumers": consumers}
        return {}

    def leader(self) -> int:
        name = self.leaders().get(self.stream, "eng1")
        return [n.name for n in self.nodes].index(name)

    def kill(self, index: int) -> None:
        process = self.nodes[index].process
        assert process is not None
        os.kill(process.pid, signal.SIGKILL)
        process.wait()

    def stop(self) -> None:
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.terminate()
        for node in self.nodes:
            if node.process is not None:
                try:
                    node.process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    node.process.kill()
                    node.process.wait()


class RabbitCluster(Cluster):
    engine = "rabbitmq"

    def __init__(self, base: Path):
        super().__init__(base)
        self.epmd: subprocess.Popen[bytes] | None = None
        for i in range(1, 4):
            self.nodes.append(
                Node(
                    f"geng{i}@localhost",
                    RMQ_PORTS["mqtt"] + i,
                    RMQ_PORTS["amqp"] + i,
                    base / f"n{i}",
                )
            )

    def env(self) -> list[str]:
        return [
            "env",
            "-i",
            "PATH=/usr/bin:/bin",
            f"HOME={self.base}",
            "LANG=C.UTF-8",
            f"ERL_EPMD_PORT={RMQ_EPMD_PORT}",
            f"ERL_EPMD_ADDRESS={HOST}",
        ]

    def ctl(self, *args: str, node: int = 0, timeout: float = 120) -> str:
        """rabbitmqctl against one node, as the nodes' user (the cookie is in its HOME)."""
        cmd = ["runuser", "-u", RMQ_USER, "--", *self.env(), str(RMQ_HOME / "sbin/rabbitmqctl")]
        result = subprocess.run(
            [*cmd, "-n", self.nodes[node].name, *args],
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode:
            raise RuntimeError(f"rabbitmqctl {args}: {result.stderr.decode()[-500:]}")
        return result.stdout.decode()

    def start(self) -> None:
        self.base.mkdir(parents=True)
        cookie = self.base / ".erlang.cookie"
        cookie.write_text("galvaniengcookie0123456789")
        cookie.chmod(0o400)
        for node in self.nodes:
            (node.data_dir / "mnesia").mkdir(parents=True)
            (node.data_dir / "log").mkdir()
            (node.data_dir / "rabbitmq.conf").write_text(
                f"""listeners.tcp.default = {HOST}:{node.admin_port}
mqtt.listeners.tcp.default = {HOST}:{node.mqtt_port}
mqtt.allow_anonymous = false
loopback_users = none
cluster_formation.peer_discovery_backend = classic_config
"""
                + "".join(
                    f"cluster_formation.classic_config.nodes.{j} = {n.name}\n"
                    for j, n in enumerate(self.nodes, 1)
                )
            )
            (node.data_dir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        subprocess.run(["chown", "-R", RMQ_USER, str(self.base)], check=True)
        # Our own epmd, in the foreground so that its pid is ours to stop.
        self.epmd = subprocess.Popen(
            ["runuser", "-u", RMQ_USER, "--", *self.env(), "epmd", "-address", HOST]
        )
        time.sleep(0.5)
        for i, node in enumerate(self.nodes, 1):
            d = node.data_dir
            node.process = subprocess.Popen(
                [
                    "nice",
                    "-n",
                    "10",
                    "runuser",
                    "-u",
                    RMQ_USER,
                    "--",
                    *self.env(),
                    f"RABBITMQ_NODENAME={node.name}",
                    f"RABBITMQ_DIST_PORT={RMQ_PORTS['dist'] + i}",
                    f"RABBITMQ_CONFIG_FILE={d}/rabbitmq.conf",
                    f"RABBITMQ_ENABLED_PLUGINS_FILE={d}/enabled_plugins",
                    f"RABBITMQ_MNESIA_BASE={d}/mnesia",
                    f"RABBITMQ_LOG_BASE={d}/log",
                    "RABBITMQ_CONF_ENV_FILE=/dev/null",
                    f"RABBITMQ_ADVANCED_CONFIG_FILE={d}/advanced.config",
                    f"RABBITMQ_PLUGINS_DIR={RMQ_HOME}/plugins",
                    "ERL_FLAGS=-kernel inet_dist_use_interface {127,0,0,1}",
                    str(RMQ_HOME / "sbin/rabbitmq-server"),
                ],
                stdout=(d / "stdout.log").open("wb"),
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 180
        for i in range(3):
            while True:  # await_startup fails until the node has registered with epmd
                try:
                    self.ctl("await_startup", node=i)
                    break
                except RuntimeError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1)
        status = json.loads(self.ctl("cluster_status", "--formatter", "json"))
        if len(status["running_nodes"]) != 3:
            raise RuntimeError(f"RabbitMQ cluster: {status['running_nodes']}")
        for user, password in ((DEVICE_USER, DEVICE_PASSWORD), (SERVICE_USER, SERVICE_PASSWORD)):
            self.ctl("add_user", user, password)
            self.ctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")

    def leaders(self) -> dict[str, str]:
        running = [
            i
            for i, n in enumerate(self.nodes)
            if n.process is not None and n.process.poll() is None
        ]
        rows = json.loads(
            self.ctl(
                "list_queues", "name", "leader", "members", "--formatter", "json", node=running[0]
            )
        )
        return {
            row["name"]: f"{row['leader']} members={row['members']}"
            for row in rows
            if row["name"] == QUEUE
        }

    def state(self) -> dict[str, Any]:
        """The queue's counters, from a running node."""
        for i, node in enumerate(self.nodes):
            if node.process is not None and node.process.poll() is None:
                rows = json.loads(
                    self.ctl(
                        "list_queues",
                        "name",
                        "messages",
                        "messages_ready",
                        "messages_unacknowledged",
                        "--formatter",
                        "json",
                        node=i,
                    )
                )
                return {"queues": [row for row in rows if row["name"] == QUEUE]}
        return {}

    def leader(self) -> int:
        name = self.leaders()[QUEUE].split()[0]
        return [n.name for n in self.nodes].index(name)

    def beam(self, index: int) -> int:
        process = self.nodes[index].process
        assert process is not None
        for pid in tree(process.pid):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "beam.smp":
                    return pid
        raise RuntimeError(f"no beam.smp under node {index}")

    def kill(self, index: int) -> None:
        os.kill(self.beam(index), signal.SIGKILL)
        process = self.nodes[index].process
        assert process is not None
        process.wait(timeout=10)

    def stop(self) -> None:
        for i, node in enumerate(self.nodes):
            if node.process is not None and node.process.poll() is None:
                with contextlib.suppress(RuntimeError, ProcessLookupError):
                    os.kill(self.beam(i), signal.SIGTERM)
        for node in self.nodes:
            if node.process is not None:
                try:
                    node.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    for pid in reversed(tree(node.process.pid)):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    node.process.wait()
        if self.epmd is not None:
            for pid in reversed(tree(self.epmd.pid)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            self.epmd.wait(timeout=10)


# --- Backend consumers (separate processes) ---------------------------------------------


class Ledger:
    """What the consumer received: (device, seq) counts, and a counter line every 0.5 s."""

    def __init__(self, out: Path):
        self.out = out
        self.seen: dict[str, set[int]] = {}
        self.received = 0
        self.duplicates = 0
        self.unparsed = 0
        self.stop = False
        self.last_report = 0.0
        signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, *_: object) -> None:
        self.stop = True

    def record(self, payload: bytes) -> None:
        match = SEQ_RE.search(payload, 0, 200)
        if match is None:
            self.unparsed += 1
            return
        self.received += 1
        seqs = self.seen.setdefault(match.group(2).decode(), set())
        seq = int(match.group(1))
        if seq in seqs:
            self.duplicates += 1
        else:
            seqs.add(seq)

    def report(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last_report >= 0.5:
            self.last_report = now
            print(f"count {now:.3f} {self.received} {self.received - self.duplicates}", flush=True)

    def dump(self) -> None:
        self.report(force=True)
        self.out.write_text(
            json.dumps(
                {
                    "received": self.received,
                    "duplicates": self.duplicates,
                    "unparsed": self.unparsed,
                    "seen": {k: sorted(v) for k, v in self.seen.items()},
                }
            )
        )
        print("done", flush=True)


class NatsConn:
    """A minimal blocking NATS protocol client: enough for JetStream API requests, pull
    fetches and acks (the project's own client is being written alongside)."""

    def __init__(self, port: int):
        self.sock = socket.create_connection((HOST, port), timeout=5)
        self.buf = b""
        self.read_line()  # INFO
        self.sock.sendall(
            b"CONNECT "
            + json.dumps(
                {
                    "verbose": False,
                    "pedantic": False,
                    "user": SERVICE_USER,
                    "pass": SERVICE_PASSWORD,
                    "headers": True,
                    "no_responders": True,
                    "protocol": 1,
                    "name": "engines-consumer",
                }
            ).encode()
            + b"\r\nPING\r\n"
        )
        while self.read_line() != b"PONG":
            pass
        self.sock.sendall(b"SUB _INBOX.eng.> 1\r\n")

    def _fill(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("NATS connection closed")
        self.buf += data

    def read_line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def read_bytes(self, n: int) -> bytes:
        while len(self.buf) < n + 2:
            with contextlib.suppress(TimeoutError):  # the MSG line is consumed: finish it
                self._fill()
        data, self.buf = self.buf[:n], self.buf[n + 2 :]
        return data

    def pub(self, subject: str, payload: bytes = b"", reply: str = "") -> bytes:
        return f"PUB {subject} {reply} {len(payload)}\r\n".encode() + payload + b"\r\n"

    def next_message(self) -> tuple[bytes, bytes, bytes, bytes] | None:
        """(subject, reply, headers, payload) of the next MSG/HMSG; None for other lines."""
        line = self.read_line()
        if line.startswith(b"MSG "):
            parts = line.split()
            reply = parts[3] if len(parts) == 5 else b""
            return parts[1], reply, b"", self.read_bytes(int(parts[-1]))
        if line.startswith(b"HMSG "):
            parts = line.split()
            reply = parts[3] if len(parts) == 6 else b""
            hdr_len, total = int(parts[-2]), int(parts[-1])
            data = self.read_bytes(total)
            return parts[1], reply, data[:hdr_len], data[hdr_len:]
        if line == b"PING":
            self.sock.sendall(b"PONG\r\n")
        elif line.startswith(b"-ERR"):
            raise ConnectionError(line.decode())
        return None

    def request(self, subject: str, body: dict[str, Any], timeout: float = 5) -> dict[str, Any]:
        inbox = f"_INBOX.eng.req{time.monotonic_ns()}"
        self.sock.sendall(self.pub(subject, json.dumps(body).encode(), inbox))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self.next_message()
            if msg is not None and msg[0] == inbox.encode():
                if msg[2].startswith(b"NATS/1.0 503"):
                    raise ConnectionError(f"no responders for {subject}")
                result: dict[str, Any] = json.loads(msg[3])
                return result
        raise TimeoutError(subject)


def _js_ok(answer: dict[str, Any]) -> None:
    """Raise ConnectionError for a JetStream API error (no leader yet, most often)."""
    if "error" in answer:
        raise ConnectionError(str(answer["error"]))


def nats_setup(port: int, source: str) -> str:
    """Create the stream and the durable pull consumer (idempotent, as a worker does);
    return the stream's name."""
    conn = NatsConn(port)
    stream = {
        "name": STREAM,
        "subjects": [SUBJECT_FILTER],
        "retention": "interest",
        "storage": "file",
        "num_replicas": 3,
        "discard": "new",
    }
    name = STREAM if source == "stream" else MQTT_MSGS
    consumer: dict[str, Any] = {
        "stream_name": name,
        "config": {
            "durable_name": DURABLE,
            "name": DURABLE,
            "ack_policy": "explicit",
            "ack_wait": 30_000_000_000,
            "max_deliver": -1,
            "max_ack_pending": 20_000,
            "deliver_policy": "all",
        },
    }
    if source != "stream":
        consumer["config"]["filter_subject"] = "$MQTT.msgs." + SUBJECT_FILTER
    for _ in range(30):
        try:
            if source == "stream":
                _js_ok(conn.request(f"$JS.API.STREAM.CREATE.{STREAM}", stream))
            _js_ok(conn.request(f"$JS.API.CONSUMER.CREATE.{name}.{DURABLE}", consumer))
            return name
        except (ConnectionError, TimeoutError) as exc:
            log(f"nats setup: {exc}; retrying")
            time.sleep(1)
    raise RuntimeError("could not create the stream and consumer")


def consume_nats(ports: list[int], out: Path, source: str) -> None:
    """Pull batches from the durable consumer, record each message, ack it."""
    ledger = Ledger(out)
    stream_name = nats_setup(ports[0], source)
    print("ready", flush=True)
    node = 0
    pull = json.dumps({"batch": 1000, "expires": 1_000_000_000}).encode()
    while not ledger.stop:
        try:
            conn = NatsConn(ports[node])
        except OSError:
            node = (node + 1) % len(ports)
            time.sleep(0.1)
            continue
        conn.sock.settimeout(0.2)
        next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream_name}.{DURABLE}"
        last_pull, since_pull = 0.0, 0
        try:
            while not ledger.stop:
                now = time.monotonic()
                if now - last_pull > 0.5 or since_pull >= 500:
                    conn.sock.sendall(conn.pub(next_subject, pull, "_INBOX.eng.pull"))
                    last_pull, since_pull = now, 0
                acks: list[bytes] = []
                try:
                    while True:
                        msg = conn.next_message()
                        if msg is not None and msg[1].startswith(b"$JS.ACK."):
                            ledger.record(msg[3])
                            acks.append(conn.pub(msg[1].decode()))
                            since_pull += 1
                        if not conn.buf or len(acks) >= 500:
                            break
                except TimeoutError:
                    pass
                if acks:
                    conn.sock.sendall(b"".join(acks))  # after the "commit" (recording)
                ledger.report()
        except (OSError, ConnectionError) as exc:
            log(f"consumer: {exc!r}; reconnecting")
            node = (node + 1) % len(ports)
    ledger.dump()


def consume_rabbitmq(ports: list[int], out: Path) -> None:
    """Declare the quorum queue and binding, consume, record, ack (runs under pika)."""
    import pika  # type: ignore[import-not-found]  # the throwaway venv's, not the project's

    ledger = Ledger(out)
    credentials = pika.PlainCredentials(SERVICE_USER, SERVICE_PASSWORD)
    setup = pika.BlockingConnection(pika.ConnectionParameters(HOST, ports[0], "/", credentials))
    channel = setup.channel()
    channel.queue_declare(
        QUEUE,
        durable=True,
        arguments={"x-queue-type": "quorum", "x-quorum-initial-group-size": 3},
    )
    channel.queue_bind(QUEUE, "amq.topic", SUBJECT_FILTER)
    setup.close()
    print("ready", flush=True)
    node = 0
    while not ledger.stop:
        try:
            conn = pika.BlockingConnection(
                pika.ConnectionParameters(HOST, ports[node], "/", credentials, heartbeat=10)
            )
            channel = conn.channel()
            channel.basic_qos(prefetch_count=1000)
            batch: list[Any] = []
            channel.basic_consume(
                QUEUE,
                lambda _c, method, _p, body, batch=batch: batch.append((method, body)),
            )
            while not ledger.stop:
                conn.process_data_events(time_limit=0.05)
                if batch:
                    for _method, body in batch:
                        ledger.record(body)
                    channel.basic_ack(batch[-1][0].delivery_tag, multiple=True)
                    batch.clear()
                ledger.report()
            conn.close()
        except (pika.exceptions.AMQPError, OSError) as exc:
            log(f"consumer: {exc!r}; reconnecting")
            node = (node + 1) % len(ports)
            time.sleep(0.2)
    ledger.dump()


class Consumer:
    """The consumer subprocess, seen from the harness: its counter lines on a thread."""

    def __init__(
        self, python: str, engine: str, ports: list[int], out: Path, log_path: Path, source: str
    ):
        self.out = out
        self.process = subprocess.Popen(
            [
                "nice",
                "-n",
                "10",
                python,
                __file__,
                f"consume-{engine}",
                "--ports",
                ",".join(map(str, ports)),
                "--out",
                str(out),
                "--source",
                source,
            ],
            stdout=subprocess.PIPE,
            stderr=log_path.open("ab"),
        )
        self.counts: list[tuple[float, int, int]] = []
        self.ready = threading.Event()
        self.done = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode().split()
            if line[0] == "count":
                self.counts.append((float(line[1]), int(line[2]), int(line[3])))
            elif line[0] == "ready":
                self.ready.set()
            elif line[0] == "done":
                self.done.set()

    def at(self, t: float) -> int:
        """Messages received by monotonic time ``t`` (the last counter line before it)."""
        best = 0
        for when, received, _unique in self.counts:
            if when <= t:
                best = received
        return best

    def timeline(self, t0: float) -> list[int]:
        """Messages received in each second from ``t0``."""
        out: list[int] = []
        second, previous = 1, self.at(t0)
        while t0 + second <= (self.counts[-1][0] if self.counts else t0):
            now = self.at(t0 + second)
            out.append(now - previous)
            previous, second = now, second + 1
        return out

    def unique(self) -> int:
        return self.counts[-1][2] if self.counts else 0

    def finish(self) -> dict[str, Any]:
        self.process.send_signal(signal.SIGTERM)
        self.done.wait(30)
        self.process.wait(timeout=30)
        result: dict[str, Any] = json.loads(self.out.read_text())
        return result


# --- Load generator ---------------------------------------------------------------------


@dataclass
class Schedule:
    t0: float  # publishing starts
    kill_at: float
    stop_at: float


@dataclass
class DeviceResult:
    device_id: str
    acked: list[int] = field(default_factory=list)
    sent: int = 0
    resent: int = 0
    drops: int = 0  # connections lost
    reconnect_s: float | None = None  # kill -> CONNACK on another node
    resume_s: float | None = None  # kill -> first PUBACK after that reconnect
    max_gap_s: float = 0.0  # longest time between PUBACKs across the kill


@dataclass
class ProcResult:
    devices: list[DeviceResult]
    bins: list[int]  # PUBACKs per BIN_S from t0
    cpu_s: float
    error: str | None = None


class Device(asyncio.Protocol):
    """One device: a connection at a time, ``window`` publishes in flight, failover to the
    next node when its connection drops, unacknowledged publishes sent again there."""

    def __init__(self, gen: "Generator", device_id: str, node: int):
        from bench.mqtt_load import payload_template, session_of
        from services.common.mqtt5 import string

        self.gen = gen
        self.node = node
        self.result = DeviceResult(device_id)
        # Client id = device id; every device logs in as the one shared device user (the
        # per-device auth of the design is not part of this measurement).
        self.login = self._connect(device_id)
        self.template = payload_template(session_of(device_id))
        self.topic = string(f"galvani/v1/d/{device_id}/telemetry")
        self.sub_topic = string(f"galvani/v1/d/{device_id}/ack")
        self.next_seq = 0
        self.next_pid = 0
        self.inflight: dict[int, int] = {}  # packet id -> seq
        self.resend: list[int] = []
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.connack: asyncio.Future[int] | None = None
        self.suback: asyncio.Future[int] | None = None
        self.closed: asyncio.Future[None] | None = None
        self.last_ack = 0.0
        self.lost_at: float | None = None
        self.ready = False

    def _connect(self, client_id: str) -> bytes:
        from services.common.mqtt5 import string, varint

        variable = string("MQTT") + bytes([4, 0x80 | 0x40 | 0x02]) + KEEPALIVE_S.to_bytes(2, "big")
        body = variable + string(client_id) + string(DEVICE_USER) + string(DEVICE_PASSWORD)
        return b"\x10" + varint(len(body)) + body

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.ready = False
        if self.closed is not None and not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        pos, size = 0, len(buf)
        while pos + 2 <= size:
            kind = buf[pos]
            length, shift, i = 0, 0, pos + 1
            while True:
                if i >= size:
                    self.buf = buf[pos:]
                    return
                byte = buf[i]
                length |= (byte & 0x7F) << shift
                shift += 7
                i += 1
                if not byte & 0x80:
                    break
            end = i + length
            if end > size:
                break
            if kind == 0x40:
                self._on_puback((buf[i] << 8) | buf[i + 1])
            elif kind == 0x20 and self.connack is not None and not self.connack.done():
                self.connack.set_result(buf[i + 1])
            elif kind == 0x90 and self.suback is not None and not self.suback.done():
                self.suback.set_result(buf[end - 1])
            pos = end
        self.buf = buf[pos:]
        if self.ready:
            self.fill()

    def _on_puback(self, pid: int) -> None:
        seq = self.inflight.pop(pid, None)
        if seq is None:
            return
        now = time.monotonic()
        self.result.acked.append(seq)
        gen = self.gen
        sched = gen.schedule
        b = int((now - sched.t0) / BIN_S)
        if 0 <= b < len(gen.bins):
            gen.bins[b] += 1
        if now >= sched.kill_at and self.last_ack < sched.stop_at:
            self.result.max_gap_s = max(
                self.result.max_gap_s, now - max(self.last_ack, sched.kill_at - 5)
            )
            if self.lost_at is not None and self.result.resume_s is None:
                self.result.resume_s = now - sched.kill_at
        self.last_ack = now

    def fill(self) -> None:
        if self.transport is None or not self.gen.publishing:
            return
        out = []
        ts0 = self.gen.first_ts_ms
        while len(self.inflight) < self.gen.window:
            if self.resend:
                seq = self.resend.pop(0)
                self.result.resent += 1
            else:
                seq = self.next_seq
                self.next_seq += 1
                self.result.sent += 1
            pid = self.next_pid % 65535 + 1
            self.next_pid += 1
            while pid in self.inflight:
                pid = self.next_pid % 65535 + 1
                self.next_pid += 1
            self.inflight[pid] = seq
            ts = ts0 + 1000 * seq
            payload = self.template % (seq, *(ts + 100 * k for k in range(10)))
            remaining = len(self.topic) + 2 + len(payload)
            out.append(b"\x32" + _varint(remaining) + self.topic + pid.to_bytes(2, "big") + payload)
        if out:
            self.transport.write(b"".join(out))

    async def _handshake(self) -> None:
        """CONNECT (and SUBSCRIBE to the ack topic) on a fresh connection."""
        assert self.transport is not None
        assert self.connack is not None
        self.transport.write(self.login)
        code = await asyncio.wait_for(self.connack, CONNECT_TIMEOUT_S)
        if code:
            raise ConnectionError(f"CONNACK {code}")
        if self.gen.sub_qos >= 0 and self.suback is not None:
            body = b"\x00\x01" + self.sub_topic + bytes([self.gen.sub_qos])
            self.transport.write(b"\x82" + _varint(len(body)) + body)
            if await asyncio.wait_for(self.suback, CONNECT_TIMEOUT_S) == 0x80:
                raise ConnectionError("SUBACK refused")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        gen = self.gen
        while not gen.stopping:
            port = gen.ports[self.node]
            self.connack, self.suback = loop.create_future(), loop.create_future()
            self.closed = loop.create_future()
            try:
                async with gen.connecting:
                    await asyncio.wait_for(
                        loop.create_connection(lambda: self, HOST, port), CONNECT_TIMEOUT_S
                    )
                    await self._handshake()
            except (OSError, ConnectionError, TimeoutError) as exc:
                if self.transport is not None:
                    self.transport.abort()
                reason = f"{type(exc).__name__}:{str(exc)[:40]}"
                gen.connect_errors[reason] = gen.connect_errors.get(reason, 0) + 1
                self.node = (self.node + 1) % len(gen.ports)
                await asyncio.sleep(RECONNECT_PAUSE_S)
                continue
            now = time.monotonic()
            if (
                self.lost_at is not None
                and self.result.reconnect_s is None
                and now >= gen.schedule.kill_at
            ):
                self.result.reconnect_s = now - gen.schedule.kill_at
            self.ready = True
            self.fill()
            gen.connected += 1
            await self.closed
            gen.connected -= 1
            if gen.stopping:
                return
            if time.monotonic() >= gen.schedule.kill_at > 0:
                self.lost_at = time.monotonic()
                self.result.drops += 1
            # Clean session: the broker forgets the in-flight ids; send those seqs again.
            self.resend = sorted(set(self.inflight.values()) | set(self.resend))
            self.inflight.clear()
            self.node = (self.node + 1) % len(gen.ports)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.write(b"\xe0\x00")
            self.transport.close()


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | 0x80 if value else byte)
        if not value:
            return bytes(out)


class Generator:
    def __init__(
        self,
        ports: list[int],
        devices: list[tuple[str, int]],
        window: int,
        sub_qos: int,
        shared: Any,
    ):
        self.ports = ports
        self.window = window
        self.sub_qos = sub_qos
        self.shared = shared
        self.devices_spec = devices
        self.publishing = False
        self.stopping = False
        self.connected = 0
        self.connect_errors: dict[str, int] = {}
        self.first_ts_ms = 1_780_000_000_000
        self.schedule = Schedule(0.0, 0.0, 0.0)
        self.bins: list[int] = []

    async def main(self, ready: Any) -> ProcResult:
        sys.path.insert(0, str(REPO))
        self.connecting = asyncio.Semaphore(CONNECT_CONCURRENCY)
        devices = [Device(self, d, n) for d, n in self.devices_spec]
        # Held so that the tasks are not collected while they run.
        self.tasks = [asyncio.create_task(d.run()) for d in devices]
        while self.connected < len(devices):  # noqa: ASYNC110 -- polling (shared memory, clock)
            await asyncio.sleep(0.05)
        ready.put(("connected", self.connect_errors))
        while self.shared[0] == 0.0:  # noqa: ASYNC110 -- polling (shared memory, clock)
            await asyncio.sleep(0.01)
        self.schedule = Schedule(self.shared[0], self.shared[1], self.shared[2])
        self.bins = [0] * int(
            (self.schedule.stop_at - self.schedule.t0) / BIN_S + 1 + DRAIN_TIMEOUT_S / BIN_S
        )
        while time.monotonic() < self.schedule.t0:  # noqa: ASYNC110 -- polling (shared memory, clock)
            await asyncio.sleep(0.002)
        cpu0 = time.process_time()
        self.publishing = True
        for d in devices:
            d.fill()
        while time.monotonic() < self.schedule.stop_at:  # noqa: ASYNC110 -- polling (shared memory, clock)
            await asyncio.sleep(0.05)
        self.publishing = False
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while any(d.inflight for d in devices) and time.monotonic() < deadline:  # noqa: ASYNC110 -- polling (shared memory, clock)
            await asyncio.sleep(0.05)
        self.stopping = True
        cpu = time.process_time() - cpu0
        # Keep the connections open until the harness has read the results.
        return ProcResult([d.result for d in devices], self.bins, cpu, None)

    def close(self, devices: Sequence[Device]) -> None:
        for d in devices:
            d.close()


def load_process(
    ports: list[int],
    devices: list[tuple[str, int]],
    window: int,
    sub_qos: int,
    shared: Any,
    ready: Any,
    results: Any,
) -> None:
    """One load-generator process (multiprocessing target)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.path.insert(0, str(REPO))
    import uvloop

    gen = Generator(ports, devices, window, sub_qos, shared)
    try:
        result = uvloop.run(gen.main(ready))
    except Exception as exc:  # noqa: BLE001 -- any failure goes to the harness, not a hang
        result = ProcResult([], [], 0.0, repr(exc))
    results.put(result)


# --- One run ----------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / "cluster"
    if base.exists():
        subprocess.run(["rm", "-rf", str(base)], check=True)
    cluster: Cluster = (
        NatsCluster(base, args.nats_server, args.nats_source)
        if args.engine == "nats"
        else RabbitCluster(base)
    )
    report: dict[str, Any] = {
        "engine": args.engine,
        "source": args.nats_source if args.engine == "nats" else "quorum-queue",
        "started": time.strftime("%H:%M:%S"),
        "params": {
            k: getattr(args, k)
            for k in ("clients", "procs", "window", "sub_qos", "warmup", "seconds", "after_kill")
        },
    }
    consumer: Consumer | None = None
    procs: list[Any] = []
    try:
        t = time.monotonic()
        cluster.start()
        report["cluster_start_s"] = round(time.monotonic() - t, 1)
        log(f"{args.engine}: cluster up in {report['cluster_start_s']} s")
        admin_ports = [n.admin_port for n in cluster.nodes]
        if args.engine == "nats" and args.nats_source != "stream":
            mqtt_probe(cluster.nodes[0].mqtt_port)  # NATS creates $MQTT_msgs on first use
        python = sys.executable if args.engine == "nats" else args.pika_python
        source = args.nats_source
        setup = Consumer(
            python, args.engine, admin_ports, out / "setup.json", out / "consumer.log", source
        )
        if not setup.ready.wait(120):
            raise RuntimeError("setup did not finish")
        setup.finish()
        time.sleep(2)
        victim = cluster.leader()
        report["leaders_before"] = cluster.leaders()
        report["killed"] = cluster.nodes[victim].name
        order = [(victim + k) % 3 for k in (1, 2, 0)]
        consumer = Consumer(
            python,
            args.engine,
            [admin_ports[i] for i in order],
            out / "ledger.json",
            out / "consumer.log",
            source,
        )
        if not consumer.ready.wait(120):
            raise RuntimeError("consumer did not get ready")
        log(f"consumer on {cluster.nodes[order[0]].name}; will kill {cluster.nodes[victim].name}")
        # Devices: dealt over the 3 nodes, then over the load processes.
        mqtt_ports = [n.mqtt_port for n in cluster.nodes]
        devices = [(f"eng-{i:04d}", i % 3) for i in range(args.clients)]
        ctx = multiprocessing.get_context("spawn")
        shared = ctx.RawArray("d", 3)
        ready, results = ctx.Queue(), ctx.Queue()
        for p in range(args.procs):
            proc = ctx.Process(
                target=load_process,
                args=(
                    mqtt_ports,
                    devices[p :: args.procs],
                    args.window,
                    args.sub_qos,
                    shared,
                    ready,
                    results,
                ),
            )
            proc.start()
            procs.append(proc)
        t = time.monotonic()
        for _ in procs:
            _, errors = ready.get(timeout=180)
            if errors:
                log(f"connect retries: {errors}")
        report["connect_all_s"] = round(time.monotonic() - t, 1)
        t0 = time.monotonic() + 1.0
        window_start = t0 + args.warmup
        window_end = window_start + args.seconds
        kill_at = window_end + 1.0
        stop_at = kill_at + args.after_kill
        shared[1], shared[2], shared[0] = kill_at, stop_at, t0
        load_pids = [p.pid for p in procs]
        own = [consumer.process.pid]
        time.sleep(max(0.0, window_start - time.monotonic()))
        b0, m0 = cpu_s(cluster.broker_pids()), machine_busy()
        c0, l0 = cpu_s(tree(own[0])), cpu_s(load_pids)
        load0 = Path("/proc/loadavg").read_text().split()[:3]
        time.sleep(max(0.0, window_end - time.monotonic()))
        b1, m1 = cpu_s(cluster.broker_pids()), machine_busy()
        c1, l1 = cpu_s(tree(own[0])), cpu_s(load_pids)
        load1 = Path("/proc/loadavg").read_text().split()[:3]
        report["leaders_at_kill"] = _safe(cluster.leaders)
        time.sleep(max(0.0, kill_at - time.monotonic()))
        cluster.kill(victim)
        killed_at = time.monotonic()
        log(f"killed {cluster.nodes[victim].name} (+{killed_at - kill_at:.3f} s)")
        collected = [results.get(timeout=args.after_kill + DRAIN_TIMEOUT_S + 120) for _ in procs]
        for r in collected:
            if r.error:
                raise RuntimeError(f"load process: {r.error}")
        acked_total = sum(len(d.acked) for r in collected for d in r.devices)
        deadline = time.monotonic() + DELIVERY_WAIT_S
        while time.monotonic() < deadline and consumer.unique() < acked_total:
            time.sleep(0.5)
        time.sleep(DELIVERY_SETTLE_S)
        waited = round(time.monotonic() - (deadline - DELIVERY_WAIT_S), 1)
        report["backend_state_end"] = _safe(cluster.state)
        ledger = consumer.finish()
        # Figures.
        bins = [sum(r.bins[i] for r in collected) for i in range(len(collected[0].bins))]
        lo, hi = int(args.warmup / BIN_S), int((args.warmup + args.seconds) / BIN_S)
        window_acks = sum(bins[lo:hi])
        window_consumed = consumer.at(window_end) - consumer.at(window_start)
        seen = {k: set(v) for k, v in ledger["seen"].items()}
        lost = [
            (d.device_id, s)
            for r in collected
            for d in r.devices
            for s in d.acked
            if s not in seen.get(d.device_id, set())
        ]
        devs = [d for r in collected for d in r.devices]
        dropped = [d for d in devs if d.drops]
        # The load processes time everything from the planned kill; the kill itself came
        # ``late`` s after it (the leader query before it takes a moment).
        late = killed_at - kill_at
        reconnects = [d.reconnect_s - late for d in dropped if d.reconnect_s is not None]
        resumes = [d.resume_s - late for d in dropped if d.resume_s is not None]
        report.update(
            {
                "loadavg_window_start": load0,
                "loadavg_window_end": load1,
                "machine_busy_pct": round(100 * (m1[0] - m0[0]) / max(1, m1[1] - m0[1]), 1),
                "puback_msgs_per_s": round(window_acks / args.seconds),
                "consumed_msgs_per_s": round(window_consumed / args.seconds),
                "samples_per_s": round(10 * window_acks / args.seconds),
                "broker_cpu_s": round(b1 - b0, 2),
                "broker_cpu_s_per_1000_msgs": round(1000 * (b1 - b0) / max(1, window_acks), 3),
                "consumer_cpu_s_per_1000_msgs": round(1000 * (c1 - c0) / max(1, window_acks), 3),
                "loadgen_cpu_s_per_1000_msgs": round(1000 * (l1 - l0) / max(1, window_acks), 3),
                "clients": len(devs),
                "clients_dropped_by_kill": len(dropped),
                "kill_late_s": round(late, 3),
                "reconnect_s_p50": pct(reconnects, 0.5),
                "reconnect_s_p99": pct(reconnects, 0.99),
                "resume_s_p50": pct(resumes, 0.5),
                "resume_s_p99": pct(resumes, 0.99),
                "dropped_never_resumed": sum(d.resume_s is None for d in dropped),
                "max_puback_gap_s_p50_all": pct([d.max_gap_s for d in devs], 0.5),
                "max_puback_gap_s_p99_all": pct([d.max_gap_s for d in devs], 0.99),
                "no_puback_after_kill": sum(d.max_gap_s == 0.0 for d in devs),
                "pubacked_total": acked_total,
                "published_new": sum(d.sent for d in devs),
                "resent_after_drop": sum(d.resent for d in devs),
                "consumer_received": ledger["received"],
                "consumer_duplicates": ledger["duplicates"],
                "lost_pubacked": len(lost),
                "lost_examples": lost[:10],
                "delivery_wait_s": waited,
                "leaders_after": _safe(cluster.leaders),
                "consumed_per_s_timeline": consumer.timeline(t0),
                "acks_per_s_timeline": [
                    round(sum(bins[i : i + 10]) / 1.0) for i in range(0, len(bins), 10)
                ],
            }
        )
        for key in (
            "reconnect_s_p50",
            "reconnect_s_p99",
            "resume_s_p50",
            "resume_s_p99",
            "max_puback_gap_s_p50_all",
            "max_puback_gap_s_p99_all",
        ):
            if report[key] is not None:
                report[key] = round(report[key], 2)
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        if consumer is not None and consumer.process.poll() is None:
            consumer.process.kill()
            consumer.process.wait()
        cluster.stop()
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def mqtt_probe(port: int) -> None:
    """One MQTT CONNECT/CONNACK/DISCONNECT as the device user."""
    body = (
        b"\x00\x04MQTT\x04\xc2"
        + KEEPALIVE_S.to_bytes(2, "big")
        + b"".join(
            len(x).to_bytes(2, "big") + x
            for x in (b"probe", DEVICE_USER.encode(), DEVICE_PASSWORD.encode())
        )
    )
    with socket.create_connection((HOST, port), timeout=30) as sock:
        sock.sendall(b"\x10" + _varint(len(body)) + body)
        if sock.recv(4)[:1] != b"\x20":
            raise RuntimeError("no CONNACK from the probe")
        sock.sendall(b"\xe0\x00")


def _safe(fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | str:
    try:
        return fn()
    except (OSError, RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
        return repr(exc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--engine", choices=["nats", "rabbitmq"], required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--clients", type=int, default=200)
    r.add_argument("--procs", type=int, default=4)
    r.add_argument("--window", type=int, default=8)
    r.add_argument("--sub-qos", type=int, default=1, choices=[-1, 0, 1])
    r.add_argument("--warmup", type=float, default=5)
    r.add_argument("--seconds", type=float, default=30)
    r.add_argument("--after-kill", type=float, default=25)
    r.add_argument("--nats-server", default="/root/.cache/galvani/nats/2.10.27/nats-server")
    r.add_argument("--pika-python", default="/tmp/sec/eng/pvenv/bin/python")  # noqa: S108
    r.add_argument("--nats-source", choices=["stream", "mqtt-msgs"], default="stream")
    for name in ("consume-nats", "consume-rabbitmq"):
        c = sub.add_parser(name)
        c.add_argument("--ports", required=True)
        c.add_argument("--out", required=True)
        c.add_argument("--source", default="stream")
    args = parser.parse_args()
    if args.cmd == "run":
        report = run(args)
        summary = {k: v for k, v in report.items() if "timeline" not in k}
        print(json.dumps(summary))
        return
    ports = [int(p) for p in args.ports.split(",")]
    if args.cmd == "consume-nats":
        consume_nats(ports, Path(args.out), args.source)
    else:
        consume_rabbitmq(ports, Path(args.out))


if __name__ == "__main__":
    main()
