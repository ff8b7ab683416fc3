"""`make run`'s runner as a user meets it: start-up contract, reuse, and set-up errors."""

import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from deploy.stack.errors import SetupError
from deploy.stack.pki import DevelopmentPKI
from deploy.stack.ports import choose_port, free_port
from services.common import mqtt5
from services.common import pki as certificates
from services.common.api_keys import key_is_active
from services.common.broker_auth import BrokerFiles, sync_device_credentials
from services.common.provisioning import provision_device
from services.common.settings import REPO_ROOT
from services.common.tls import client_context
from tests.ingest import (
    T0_MS,
    Device,
    connect_device,
    event,
    scalar,
    telemetry,
    topic,
    wait_until,
)
from tests.mqtt import MqttClient
from tests.roles import create_logins

READY_TIMEOUT_S = 90


def start_runner(data_dir: Path, module: str = "deploy.run", **env: str) -> subprocess.Popen:
    """``python -m <module>`` (``make run``; ``deploy.run_cluster`` for ``make run-cluster``)
    on ``data_dir`` with ``env`` and none of the caller's GALVANI_ settings."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GALVANI_")}
    environ.update(GALVANI_DATA_DIR=str(data_dir), **env)
    return subprocess.Popen(
        [sys.executable, "-m", module],
        cwd=REPO_ROOT,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_run_json(process: subprocess.Popen, data_dir: Path) -> dict:
    path = data_dir / "run.json"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"runner exited {process.returncode}: {process.stderr.read()}")
        assert time.monotonic() < deadline, "run.json not written in time"
        time.sleep(0.2)
    return json.loads(path.read_text())


def stop(process: subprocess.Popen) -> tuple[int, str]:
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    return process.returncode, err


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def run_until_error(data_dir: Path, **env: str) -> tuple[int, str]:
    process = start_runner(data_dir, **env)
    _, err = process.communicate(timeout=120)
    return process.returncode, err


@pytest.fixture
def data_dir(stack_root: Path, request) -> Path:
    path = stack_root / f"run-{request.node.name}"
    path.mkdir()
    os.chmod(path, 0o755)
    return path


@pytest.mark.slow
def test_run_starts_everything_stops_cleanly_and_starts_again_on_its_data_with_the_switches(
    data_dir,
):
    """The first run, with defaults, starts everything and stops cleanly. The second reuses
    its data and turns on the switches: GALVANI_MQTT_PLAINTEXT=1 adds mqtt_plain_port,
    GALVANI_API_TLS=1 serves the API over HTTPS with the PKI's server certificate (run.json's
    api_url says https), GALVANI_NOTIFY_DISPATCHERS=1 runs one dispatcher (two by default).
    One stack start serves both the reuse and the switches: each start costs ~15 s."""
    mqtt_port = free_port()
    smtp = {
        "GALVANI_NOTIFY_SMTP_HOST": "smtp.example.invalid",
        "GALVANI_NOTIFY_SMTP_FROM": "alerts@example.invalid",
    }
    process = start_runner(
        data_dir, GALVANI_MQTT_PORT=str(mqtt_port), GALVANI_SIM_DEVICES="3", **smtp
    )
    try:
        info = wait_for_run_json(process, data_dir)
        assert {"api_url", "mqtt_host", "mqtt_port", "database_url", "operator_key"} <= set(info)
        assert info["mqtt_port"] == mqtt_port
        assert (data_dir / "run.json").stat().st_mode & 0o077 == 0
        pki = assert_every_listener_is_tls(info, data_dir)
        with urllib.request.urlopen(info["api_url"] + "/readyz", timeout=5) as response:
            assert json.load(response) == {"status": "ready", "database": True, "broker": True}
        with psycopg.connect(info["database_url"]) as conn:
            assert key_is_active(conn, info["operator_key"])
            assert conn.execute(
                "SELECT value FROM galvani_meta WHERE key = 'storage'"
            ).fetchone() == ("timescaledb-apache",)
        assert {"ingest-1", "ingest-2", "rules-1", "fleet"} <= set(info["pids"])
        assert_notify_dispatchers_run(info, 2, smtp)
        assert_dashboard_signs_in_with_the_demo_key(info)
        assert_device_data_reaches_the_database(info, data_dir)
        assert_services_connect_as_their_own_roles(info)
        fleet = assert_simulated_fleet_reports(info, 3)
    finally:
        code, err = stop(process)
    assert code == 0, err
    assert not (data_dir / "run.json").exists()
    for pid in info["pids"].values():
        assert not alive(pid), f"pid {pid} still running after stop"

    # Running again reuses the data: same database contents, operator key and devices.
    process = start_runner(
        data_dir,
        GALVANI_SIM_DEVICES="3",
        GALVANI_MQTT_PLAINTEXT="1",
        GALVANI_API_TLS="1",
        GALVANI_NOTIFY_DISPATCHERS="1",
    )
    try:
        again = wait_for_run_json(process, data_dir)
        # The PKI is made once: the same CA (clients keep trusting it) and certificates.
        assert again["ca_file"] == info["ca_file"]
        assert {path: path.read_bytes() for path in pki} == pki
        assert again["operator_key"] == info["operator_key"]
        assert again["demo_admin_key"] == info["demo_admin_key"]
        assert again["config_public_key"] == info["config_public_key"]
        assert_https_api_and_plaintext_device_listener(again, data_dir)
        assert_notify_dispatchers_run(again, 1)
        assert assert_simulated_fleet_reports(again, 3, reboots=2) == fleet
    finally:
        code, err = stop(process)
    assert code == 0, err
    assert "plaintext" in err


@pytest.mark.slow
def test_run_restarts_a_killed_broker_admitting_devices_after_resubscribing_until_it_keeps_dying(
    data_dir,
):
    """A broker killed once is restarted and devices are admitted only once every worker has
    subscribed again; then, on the same stack (one start fewer), brokers killed as soon as they
    start end the run with one clear error."""
    process = start_runner(data_dir, GALVANI_SIM_DEVICES="4", GALVANI_SIM_ACTIVITY="2000")
    kills = 0
    try:
        info = wait_for_run_json(process, data_dir)
        pids = dict(info["pids"])
        url = info["database_url"]
        wait_until(lambda: stored(url) > 0, 60, "the fleet's first messages")
        killed = info["pids"]["mosquitto"]
        broker_log = data_dir / "mosquitto" / "mosquitto.log"
        log_before = len(broker_log.read_text(errors="replace").splitlines())
        killed_at = scalar(url, "SELECT now()")
        os.kill(killed, signal.SIGKILL)
        wait_until(
            functools.partial(broker_replaced, process, data_dir, killed, pids),
            30,
            "a new broker in run.json",
        )
        assert pids["mosquitto"] != killed
        assert alive(pids["mosquitto"])
        wait_until(
            lambda: len((data_dir / "mosquitto" / "devices.passwd").read_text().splitlines()) == 4,
            60,
            "the devices admitted again",
        )
        # Each device says it is online when it connects: every one of them reconnected to the
        # new broker and ingest stored what it sent. (The fleet's next telemetry may be a
        # heartbeat a minute away: what they send again from their outboxes is stored already.)
        wait_until(
            lambda: presences_since(url, killed_at) == 4,
            60,
            "every device's presence on the new broker stored",
        )
        wait_until(
            lambda: b"galvani_broker_watch_connected 1.0" in metrics(info, "maintenance"),
            30,
            "maintenance watching the new broker",
        )
        assert process.poll() is None, "the runner stopped"

        # Now each broker is killed as soon as run.json names it. The third in a row that dies
        # within 10 s of its start ends the run; the first has lived longer than that.
        while process.poll() is None and kills < 5:
            killed = pids["mosquitto"]
            os.kill(killed, signal.SIGKILL)
            kills += 1
            wait_until(
                functools.partial(broker_replaced, process, data_dir, killed, pids),
                30,
                "the runner to restart the broker or stop",
            )
    finally:
        # SIGINT reaches the runner only if it still runs; either way its output is read.
        code, err = stop(process)
    assert code == 1, err
    assert "Traceback" not in err
    assert "galvani: Mosquitto exited 3 times in a row within 10 s of starting" in err
    # The first kill's restart, then one for each quick death but the last, which ended the
    # run as the third within 10 s of its start in a row. (Whether the first kill's broker
    # and the restarted one lived 10 s decides how many kills that took.)
    restarts = re.findall(r"exited \(status -?\d+\) after ([\d.]+) s; restarting", err)
    lived = [float(seconds) for seconds in restarts]
    assert len(lived) == kills == err.count("restarting it with no device logins")
    assert 2 <= kills <= 4
    assert all(seconds < 10 for seconds in lived[-2:]), lived
    assert not (data_dir / "run.json").exists()
    for name, pid in pids.items():
        assert not alive(pid), f"{name} (pid {pid}) still running after the runner stopped"

    # The runner's own account of the first restart: the broker came back with no device
    # logins, and devices were admitted only once every ingest and rules worker had said it
    # was subscribed.
    restart = err[err.index("restarting it with no device logins") :]
    order = [restart.index(f"{name} is subscribed") for name in ("ingest-1", "ingest-2", "rules-1")]
    assert restart.index("Mosquitto restarted") < min(order)
    assert max(order) < restart.index("admitting 4 devices")
    # The broker's account agrees: on the new broker, every consumer connected before any device.
    lines = broker_log.read_text(errors="replace").splitlines()[log_before:]
    connects = [line for line in lines if "New client connected" in line]
    consumers = [
        next(i for i, line in enumerate(connects) if f" as {client_id} " in line)
        for client_id in ("galvani-ingest-1", "galvani-ingest-2", "galvani-rules-1")
    ]
    devices = [i for i, line in enumerate(connects) if " as sim-" in line]
    assert devices, "no device connected to the new broker"
    assert max(consumers) < min(devices)


def broker_replaced(process: subprocess.Popen, data_dir: Path, killed: int, pids: dict) -> bool:
    """Whether run.json names a broker other than ``killed`` (``pids`` takes its pids), or the
    runner has stopped."""
    try:
        current = json.loads((data_dir / "run.json").read_text())["pids"]
    except (OSError, ValueError):
        return process.poll() is not None
    pids.update(current)
    return current["mosquitto"] != killed


def presences_since(url: str, since: object) -> int:
    """Simulated devices whose last presence (by its own time) is later than ``since``."""
    query = "SELECT count(*) FROM devices WHERE brand_id = 'demo' AND presence_at > %s"
    return int(scalar(url, query, [since]))


def stored(url: str) -> int:
    """Telemetry messages in the database."""
    return int(scalar(url, "SELECT count(*) FROM telemetry_messages"))


def metrics(info: dict, name: str) -> bytes:
    """The metrics page of the process ``name`` (empty while it cannot be read)."""
    try:
        with urllib.request.urlopen(info["metrics"][name], timeout=2) as response:
            return response.read()
    except OSError:
        return b""


def assert_notify_dispatchers_run(
    info: dict, count: int, smtp: dict[str, str] | None = None
) -> None:
    """``count`` dispatchers (notify-1..), each serving its own metrics named in run.json, each
    given the dashboard's URL for its links and the caller's GALVANI_NOTIFY_SMTP_* settings."""
    names = [f"notify-{n}" for n in range(1, count + 1)]
    assert sorted(name for name in info["pids"] if name.startswith("notify")) == names
    assert sorted(name for name in info["metrics"] if name.startswith("notify")) == names
    assert len({info["metrics"][name] for name in names}) == count
    for name in names:
        wait_until(
            lambda name=name: b"galvani_notify_queue_depth" in metrics(info, name),
            30,
            f"{name}'s metrics",
        )
        environ = process_environment(info["pids"][name])
        assert environ["GALVANI_NOTIFY_DASHBOARD_URL"] == info["dashboard_url"]
        assert environ["GALVANI_NOTIFY_DASHBOARD_URL"] == info["api_url"] + "/dashboard/"
        passed = {key: value for key, value in environ.items() if "_NOTIFY_SMTP_" in key}
        assert passed == (smtp or {})
        assert alive(info["pids"][name]), f"{name} exited"


def process_environment(pid: int) -> dict[str, str]:
    """The environment ``pid`` was started with (Linux, from /proc)."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (entry.decode().partition("=") for entry in raw.split(b"\0") if entry)
    return {key: value for key, _, value in pairs}


def assert_dashboard_signs_in_with_the_demo_key(info: dict) -> None:
    """The dashboard page is served and run.json's demo key is an admin of the fleet's brand."""
    with urllib.request.urlopen(info["dashboard_url"], timeout=5) as response:
        assert b"Galvani support dashboard" in response.read()
    request = urllib.request.Request(
        info["api_url"] + "/v1/me", headers={"Authorization": f"Bearer {info['demo_admin_key']}"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        me = json.load(response)
    assert (me["brand"], me["role"]) == ("demo", "admin")


def assert_simulated_fleet_reports(info: dict, devices: int, reboots: int = 1) -> set[str]:
    """Every simulated device booted (``reboots`` times so far), is online and sends samples."""
    url = info["database_url"]

    def booted() -> bool:
        with psycopg.connect(url) as conn:
            rows = conn.execute(
                "SELECT d.id, d.online, count(e.*) FILTER (WHERE e.type = 'reboot'),"
                " (SELECT count(*) FROM samples s WHERE s.device_id = d.id)"
                " FROM devices d LEFT JOIN events e ON e.device_id = d.id"
                " WHERE d.brand_id = 'demo' GROUP BY d.id, d.online"
            ).fetchall()
        return len(rows) == devices and all(
            online and boots == reboots and samples >= reboots for _, online, boots, samples in rows
        )

    wait_until(booted, what=f"{devices} simulated devices online with their boot and samples")
    with psycopg.connect(url) as conn:
        return {row[0] for row in conn.execute("SELECT id FROM devices WHERE brand_id = 'demo'")}


def assert_services_connect_as_their_own_roles(info: dict) -> None:
    """Every service's connection is its own login role; none is the owner's (database_url)."""
    assert set(info["database_urls"]) == {
        "ingest",
        "rules",
        "api",
        "maintenance",
        "notify",
        "broker_access",
    }
    with psycopg.connect(info["database_url"]) as conn:
        users = {
            row[0]
            for row in conn.execute(
                "SELECT usename FROM pg_stat_activity WHERE backend_type = 'client backend'"
                " AND datname = current_database() AND pid <> pg_backend_pid()"
            )
        }
    logins = {f"galvani_{service}_login" for service in info["database_urls"]}
    assert (
        {
            "galvani_ingest_login",
            "galvani_rules_login",
            "galvani_api_login",
            "galvani_notify_login",
        }
        <= users
        <= logins
    )


def assert_device_data_reaches_the_database(info: dict, data_dir: Path) -> None:
    """A device provisioned in the running stack publishes; its telemetry is stored."""
    url = info["database_url"]
    with psycopg.connect(url) as conn:
        conn.execute("INSERT INTO brands (id, name) VALUES ('run-test', 'Run test')")
        device = provision_device(conn, device_id="run-dev-1", brand_id="run-test", model="m1")
        conn.commit()
        sync_device_credentials(conn, BrokerFiles(data_dir / "mosquitto"))
    client = connect_device(
        info["mqtt_port"],
        Device(device.device_id, device.password),
        host=info["mqtt_host"],
        tls=client_context(info["ca_file"]),
    )
    try:
        assert client.publish(topic("run-dev-1", "telemetry"), telemetry(1, T0_MS)) in (0, 16)
        client.subscribe(topic("run-dev-1", "config"))
        burn = event(2, T0_MS + 5000, "user_report", kind="burn")
        assert client.publish(topic("run-dev-1", "events"), burn) in (0, 16)
        locked = client.wait_for(topic("run-dev-1", "config"), 30)
    finally:
        client.close()
    wait_until(
        lambda: scalar(url, "SELECT count(*) FROM samples WHERE device_id = 'run-dev-1'") == 10,
        what="the device's samples in the database",
    )
    # The rules worker raised the alert and locked the device with a table signed by the
    # stack's key.
    assert locked is not None
    assert json.loads(locked.payload)["locked_modes"] == ["LIFT", "TIGHTEN", "INFUSE", "SAFE"]
    assert scalar(url, "SELECT severity FROM alerts WHERE device_id = 'run-dev-1'") == "critical"


def assert_every_listener_is_tls(info: dict, data_dir: Path) -> dict[Path, bytes]:
    """run.json names the CA and the three TLS listeners (no plaintext one unless asked): a
    client trusting ca_file completes a handshake with each, a plaintext CONNECT gets no
    CONNACK, and a certificate from the device CA logs in on mqtt_cert_port. Returns the PKI's
    files and their contents."""
    pki = DevelopmentPKI.at(data_dir / "pki")
    assert Path(info["ca_file"]) == pki.ca_file
    assert "mqtt_plain_port" not in info
    ports = [info["mqtt_port"], info["mqtt_service_port"], info["mqtt_cert_port"]]
    assert len(set(ports)) == 3
    context = client_context(info["ca_file"])
    for port in ports:
        with (
            socket.create_connection((info["mqtt_host"], port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=info["mqtt_host"]) as tls,
        ):
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
        assert plaintext_connack(info["mqtt_host"], port) == b""
    for key in pki.key_files():
        assert key.stat().st_mode & 0o077 == 0
    device_key = certificates.new_device_key()
    certificate = pki.device_authority().issue_client("run-cert-1", device_key.public_key())
    cert_file, key_file = data_dir / "run-cert-1.pem", data_dir / "run-cert-1.key"
    certificates.write_file(cert_file, certificates.pem(certificate), mode=0o644)
    certificates.write_file(key_file, certificates.private_pem(device_key), mode=0o600)
    device = MqttClient(
        info["mqtt_host"],
        info["mqtt_cert_port"],
        None,
        None,
        tls=client_context(info["ca_file"], cert_file=cert_file, key_file=key_file),
    ).connect()
    try:
        assert device.publish(topic("run-cert-1", "telemetry"), telemetry(1, T0_MS)) in (0, 16)
    finally:
        device.close()
    files = [pki.ca_file, pki.server_cert, pki.server_key, pki.device_ca_cert, pki.device_ca_key]
    return {path: path.read_bytes() for path in files}


def plaintext_connack(host: str, port: int) -> bytes:
    """What a plaintext MQTT CONNECT to ``port`` gets back first (b"": the connection closed)."""
    packet = mqtt5.connect(
        "probe",
        "probe",
        "probe",
        keepalive_s=30,
        session_expiry_s=0,
        receive_maximum=1,
        maximum_packet_size=65536,
    )
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(packet)
        try:
            return sock.recv(16)
        except ConnectionResetError:
            return b""


def assert_https_api_and_plaintext_device_listener(info: dict, data_dir: Path) -> None:
    """The API answers over HTTPS, verified against ca_file, and not over http; a device logs
    in on mqtt_plain_port without TLS and publishes; the TLS device listener still refuses
    plaintext."""
    assert info["api_url"].startswith("https://127.0.0.1:")
    verified = client_context(info["ca_file"])
    with urllib.request.urlopen(
        info["api_url"] + "/readyz", timeout=5, context=verified
    ) as response:
        assert json.load(response)["status"] == "ready"
    with pytest.raises(OSError):
        urllib.request.urlopen(info["api_url"].replace("https", "http") + "/readyz", timeout=5)
    assert info["dashboard_url"] == info["api_url"] + "/dashboard/"
    port = info["mqtt_plain_port"]
    assert port not in (info["mqtt_port"], info["mqtt_service_port"], info["mqtt_cert_port"])
    with psycopg.connect(info["database_url"]) as conn:
        conn.execute("INSERT INTO brands (id, name) VALUES ('plain', 'Plain')")
        device = provision_device(conn, device_id="plain-dev-1", brand_id="plain", model="m1")
        conn.commit()
        sync_device_credentials(conn, BrokerFiles(data_dir / "mosquitto"))
    client = connect_device(
        port, Device(device.device_id, device.password), host=info["mqtt_host"], tls=None
    )
    try:
        assert client.publish(topic("plain-dev-1", "telemetry"), telemetry(1, T0_MS)) == 0
    finally:
        client.close()
    assert plaintext_connack(info["mqtt_host"], info["mqtt_port"]) == b""


def test_the_plaintext_switch_is_refused_in_production(data_dir):
    code, err = run_until_error(
        data_dir, GALVANI_MQTT_PLAINTEXT="1", GALVANI_ENVIRONMENT="production"
    )
    assert code == 2
    assert "Traceback" not in err
    [line] = err.strip().splitlines()
    assert line.startswith("galvani: GALVANI_MQTT_PLAINTEXT=1 opens an unencrypted device")
    assert "GALVANI_ENVIRONMENT=production" in line
    assert not (data_dir / "pki").exists()


def test_requested_port_that_is_taken_is_a_clear_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SetupError, match=f"API port {port} .*GALVANI_API_PORT"):
            choose_port(8000, required=port, what="API", env_var="GALVANI_API_PORT")
        assert choose_port(port, required=None, what="API", env_var="GALVANI_API_PORT") != port


def test_unreachable_database_url_gives_one_line_not_a_traceback(data_dir):
    url = f"postgresql://someone:pw@127.0.0.1:{free_port()}/nowhere"
    code, err = run_until_error(data_dir, GALVANI_DATABASE_URL=url)
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert "GALVANI_DATABASE_URL" in lines[0]
    assert "unreachable" in lines[0]
    assert ":pw@" not in lines[0], "the password must not be printed"


@pytest.fixture
def suite_database_url(database_url: str) -> Iterator[str]:
    """The suite's database, given to ``make run``: its logins are the cluster's (roles are not
    a database's), and ``make run`` sets their passwords to its own, so the suite's are set
    again afterwards for the tests that follow."""
    try:
        yield database_url
    finally:
        create_logins(database_url)


def test_missing_mosquitto_binary_gives_one_line(data_dir, suite_database_url):
    code, err = run_until_error(
        data_dir,
        GALVANI_DATABASE_URL=suite_database_url,
        GALVANI_MOSQUITTO_BIN="/nonexistent/mosquitto",
    )
    assert code == 2
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "galvani: GALVANI_MOSQUITTO_BIN=/nonexistent/mosquitto is not an executable: "
        "point it at mosquitto or unset it"
    )


def test_taken_mqtt_port_gives_one_line(data_dir, suite_database_url):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, err = run_until_error(
            data_dir, GALVANI_DATABASE_URL=suite_database_url, GALVANI_MQTT_PORT=str(port)
        )
    assert code == 2
    assert "Traceback" not in err
    assert f"MQTT port {port} (from GALVANI_MQTT_PORT) is already in use" in err


def test_malformed_environment_values_are_refused(data_dir):
    code, err = run_until_error(data_dir, GALVANI_SIM_DEVICES="many")
    assert code == 2
    assert err.strip() == "galvani: GALVANI_SIM_DEVICES='many' is not a whole number"
