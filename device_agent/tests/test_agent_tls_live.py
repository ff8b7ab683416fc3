"""The agent over TLS against a real Mosquitto started here: publishing with a password on a
TLS listener and with the device's own certificate on a certificate listener (mutual TLS),
and the handshakes the broker or the agent refuses, logged with the reason and tried again.

The broker's configuration is the smallest that has both kinds of listener, with
certificates from Galvani's PKI module (services.common.pki), as ``make run``'s broker has.
"""

import asyncio
import base64
import datetime as dt
import json
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from device_agent.cli import main as agent_main
from device_agent.fleet import Fleet, parse_args
from device_agent.tls import client_context
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from services.common import pki

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
WATCHER = "watcher"
# The accounts of the password listener, written before the broker starts.
FLEET_DEVICES = tuple(f"tls-fleet-{i:04d}" for i in range(3))
PASSWORD_DEVICES = ("tls-pw-0001", "tls-wrong-ca-0001", *FLEET_DEVICES)
START_TIMEOUT_S = 10.0


@dataclass
class TlsBroker:
    """A running Mosquitto with a TLS password listener and a certificate listener."""

    directory: Path
    password_port: int
    cert_port: int
    ca_file: Path  # the server CA: what clients trust
    device_ca: pki.Authority
    trust: pki.TrustDirectory
    passwords: dict[str, str]

    def device_certificate(
        self, device_id: str, *, not_before: dt.datetime | None = None, days: int = 365
    ) -> tuple[Path, Path, int]:
        """A certificate (CN ``device_id``) from the device CA and its key: (cert, key, serial)."""
        key = pki.new_device_key()
        certificate = self.device_ca.issue_client(
            device_id, key.public_key(), not_before=not_before, days=days
        )
        cert_path = self.directory / f"{device_id}.pem"
        key_path = self.directory / f"{device_id}.key"
        pki.write_file(cert_path, pki.pem(certificate), mode=0o644)
        pki.write_file(key_path, pki.private_pem(key), mode=0o600)
        return cert_path, key_path, certificate.serial_number


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _config(directory: Path, password_port: int, cert_port: int) -> str:
    user = "root" if os.geteuid() == 0 else os.environ.get("USER", "nobody")
    return f"""\
user {user}
log_dest stderr
log_type error
log_type warning
log_type notice
connection_messages true
per_listener_settings true

listener {password_port} 127.0.0.1
certfile {directory / "server.pem"}
keyfile {directory / "server.key"}
allow_anonymous false
password_file {directory / "passwd"}

listener {cert_port} 127.0.0.1
certfile {directory / "server.pem"}
keyfile {directory / "server.key"}
capath {directory / "trust"}
crlfile {directory / "initial.crl"}
require_certificate true
use_identity_as_username true
use_username_as_clientid true
allow_anonymous false
"""


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    directory = tmp_path_factory.mktemp("tls-broker")
    server_ca = pki.Authority.create("Test server CA")
    server_ca.save(directory / "ca.pem", directory / "ca.key")
    certificate, key = server_ca.issue_server()
    pki.write_file(directory / "server.pem", pki.pem(certificate), mode=0o644)
    pki.write_file(directory / "server.key", pki.private_pem(key), mode=0o600)
    device_ca = pki.Authority.create("Test device CA")
    trust = pki.TrustDirectory(directory / "trust")
    trust.trust(device_ca.certificate)
    # The broker's crlfile turns the revocation check on; the same (empty) list is the trust
    # directory's first, so that the next one it publishes is dated after it.
    first = trust.publish_revocations(device_ca, [])
    shutil.copy(first, directory / "initial.crl")
    passwords = {
        name: base64.urlsafe_b64encode(os.urandom(18)).decode()
        for name in (WATCHER, *PASSWORD_DEVICES)
    }
    (directory / "passwd").touch(mode=0o600)
    for name, password in passwords.items():
        subprocess.run(
            [MOSQUITTO_PASSWD, "-b", str(directory / "passwd"), name, password], check=True
        )
    password_port, cert_port = _free_ports(2)
    (directory / "mosquitto.conf").write_text(_config(directory, password_port, cert_port))
    log = open(directory / "mosquitto.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [MOSQUITTO, "-c", str(directory / "mosquitto.conf")], stdout=log, stderr=log
    )
    broker = TlsBroker(
        directory,
        password_port,
        cert_port,
        directory / "ca.pem",
        device_ca,
        trust,
        passwords,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        for port in (password_port, cert_port):
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(
                            f"mosquitto did not start: {(directory / 'mosquitto.log').read_text()}"
                        ) from None
                    time.sleep(0.05)
        yield broker
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


class Watcher:
    """A TLS subscriber on the password listener collecting what devices publish."""

    def __init__(self, broker: TlsBroker, device_id: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.subscribed = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"watcher-{device_id}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.username_pw_set(WATCHER, broker.passwords[WATCHER])
        self.client.tls_set_context(client_context(str(broker.ca_file)))
        topic = f"galvani/v1/d/{device_id}/#"
        self.client.on_connect = lambda client, *_: client.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = lambda _c, _u, m: self.messages.append((m.topic, bytes(m.payload)))
        self.client.connect("127.0.0.1", broker.password_port)
        self.client.loop_start()
        assert self.subscribed.wait(10), "the watcher could not subscribe over TLS"

    def channels(self) -> set[str]:
        return {topic.rsplit("/", 1)[1] for topic, _ in self.messages}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _agent_args(tmp_path: Path, device_id: str, port: int, *extra: str) -> list[str]:
    key = tmp_path / "config-key"
    key.write_text(base64.b64encode(bytes(32)).decode())
    return [
        "run",
        "--simulate",
        f"--device-id={device_id}",
        f"--port={port}",
        f"--public-key={key}",
        f"--store={tmp_path / 'agent.sqlite3'}",
        "--session=LIFT:5:60",
        "--delete-on=puback",  # no backend behind this broker sends stored-acks
        *extra,
    ]


def test_the_agent_publishes_over_tls_with_its_password(
    tls_broker: TlsBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    device_id = "tls-pw-0001"
    monkeypatch.setenv("GALVANI_AGENT_PASSWORD", tls_broker.passwords[device_id])
    watcher = Watcher(tls_broker, device_id)
    try:
        code = agent_main(
            _agent_args(
                tmp_path,
                device_id,
                tls_broker.password_port,
                f"--ca-file={tls_broker.ca_file}",
                "--duration=3",
            )
        )
    finally:
        watcher.close()
    assert code == 0
    assert {"presence", "telemetry", "events"} <= watcher.channels()
    presence = [json.loads(p) for t, p in watcher.messages if t.endswith("/presence")]
    assert presence[0]["online"] is True


def test_the_agent_publishes_over_mutual_tls_named_by_its_certificate(
    tls_broker: TlsBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    device_id = "tls-cert-0001"
    monkeypatch.delenv("GALVANI_AGENT_PASSWORD", raising=False)  # no password at all
    cert, key, _ = tls_broker.device_certificate(device_id)
    watcher = Watcher(tls_broker, device_id)
    try:
        code = agent_main(
            _agent_args(
                tmp_path,
                device_id,
                tls_broker.cert_port,
                f"--ca-file={tls_broker.ca_file}",
                f"--cert-file={cert}",
                f"--key-file={key}",
                "--duration=3",
            )
        )
    finally:
        watcher.close()
    assert code == 0
    assert {"presence", "telemetry", "events"} <= watcher.channels()
    log = (tls_broker.directory / "mosquitto.log").read_text()
    # Mosquitto's connection line: "New client connected from ... as <client id> (... u'<user>')".
    assert f"as {device_id} (" in log
    assert f"u'{device_id}'" in log


def _refusals(caplog: pytest.LogCaptureFixture, device_id: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.getMessage().startswith(f"{device_id}: ")
    ]


def test_a_revoked_certificate_is_refused_logged_with_the_reason_and_tried_again(
    tls_broker: TlsBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    device_id = "tls-revoked-0001"
    cert, key, serial = tls_broker.device_certificate(device_id)
    tls_broker.trust.publish_revocations(tls_broker.device_ca, [(serial, dt.datetime.now(dt.UTC))])
    watcher = Watcher(tls_broker, device_id)
    try:
        with caplog.at_level(logging.WARNING, logger="galvani.agent.link"):
            agent_main(
                _agent_args(
                    tmp_path,
                    device_id,
                    tls_broker.cert_port,
                    f"--ca-file={tls_broker.ca_file}",
                    f"--cert-file={cert}",
                    f"--key-file={key}",
                    "--backoff-max=0.1",
                    "--duration=2",
                )
            )
    finally:
        watcher.close()
    refusals = _refusals(caplog, device_id)
    assert len(refusals) >= 2, refusals  # refused, and tried again
    # Mosquitto sends the alert and closes; the CONNECT the agent wrote behind its handshake
    # can make the kernel reset the connection before the alert is read (then TLS says EOF).
    assert any("alert certificate revoked" in message for message in refusals), refusals
    assert "telemetry" not in watcher.channels()


def test_an_expired_certificate_is_refused_and_logged_as_expired(
    tls_broker: TlsBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    device_id = "tls-expired-0001"
    cert, key, _ = tls_broker.device_certificate(
        device_id, not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=10), days=5
    )
    with caplog.at_level(logging.WARNING, logger="galvani.agent.link"):
        agent_main(
            _agent_args(
                tmp_path,
                device_id,
                tls_broker.cert_port,
                f"--ca-file={tls_broker.ca_file}",
                f"--cert-file={cert}",
                f"--key-file={key}",
                "--backoff-max=0.1",
                "--duration=1.5",
            )
        )
    refusals = _refusals(caplog, device_id)
    assert len(refusals) >= 2, refusals
    # Mosquitto sends the alert and closes; the CONNECT the agent wrote behind its handshake
    # can make the kernel reset the connection before the alert is read (then TLS says EOF).
    assert any("alert certificate expired" in message for message in refusals), refusals


def test_a_broker_certificate_from_another_ca_is_refused_by_the_agent(
    tls_broker: TlsBroker,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    device_id = "tls-wrong-ca-0001"
    monkeypatch.setenv("GALVANI_AGENT_PASSWORD", tls_broker.passwords[device_id])
    other = tmp_path / "other-ca.pem"
    pki.write_file(other, pki.pem(pki.Authority.create("Someone else").certificate), mode=0o644)
    with caplog.at_level(logging.WARNING, logger="galvani.agent.link"):
        agent_main(
            _agent_args(
                tmp_path,
                device_id,
                tls_broker.password_port,
                f"--ca-file={other}",
                "--backoff-max=0.1",
                "--duration=1.5",
            )
        )
    refusals = _refusals(caplog, device_id)
    assert len(refusals) >= 2, refusals
    assert all(
        "TLS handshake failed: the broker's certificate: unable to get local issuer certificate"
        in message
        for message in refusals
    ), refusals


def test_a_fleet_connects_and_publishes_over_tls_with_one_context(
    tls_broker: TlsBroker, tmp_path: Path
) -> None:
    credentials = tmp_path / "credentials.json"
    credentials.write_text(json.dumps({d: tls_broker.passwords[d] for d in FLEET_DEVICES}))
    key = tmp_path / "config-key"
    key.write_text(base64.b64encode(bytes(32)).decode())
    fleet = Fleet(
        parse_args(
            [
                f"--devices={len(FLEET_DEVICES)}",
                f"--credentials={credentials}",
                f"--port={tls_broker.password_port}",
                f"--ca-file={tls_broker.ca_file}",
                f"--public-key={key}",
                f"--store={tmp_path / 'fleet.sqlite3'}",
                "--delete-on=puback",
                "--status-interval=0.2",
                "--duration=60",  # the bound; it stops once every device has delivered
            ]
        )
    )
    statuses: list[dict[str, object]] = []
    stop = asyncio.Event()

    def report() -> None:
        statuses.append(fleet.status())
        if all(device.link.stats.delivered > 0 for device in fleet.devices):
            stop.set()

    fleet.report = report  # type: ignore[method-assign]
    asyncio.run(fleet.run(stop))
    assert len(FLEET_DEVICES) in [status["connected"] for status in statuses]
    assert all(device.link.stats.connects == 1 for device in fleet.devices)
    assert all(device.link.stats.delivered > 0 for device in fleet.devices)
    assert len({id(device.link._connection._tls) for device in fleet.devices}) == 1
