"""The broker under ``make run``: started with no device logins, devices admitted once every
ingest and rules worker has subscribed, and the same procedure again when it dies.

Mosquitto 2.0 restores plain subscriptions from its persistence file but not shared ones, so
a device publishing between a broker (re)start and the workers' resubscription would have its
messages acknowledged and dropped (docs/architecture.md, "Broker restarts").
"""

import logging
import threading
import time
from dataclasses import dataclass

from deploy.stack.mosquitto import BrokerConfig, MosquittoBroker, find_mosquitto
from deploy.stack.options import Secrets
from deploy.stack.pki import DevelopmentPKI
from deploy.stack.ports import choose_port, free_port
from deploy.stack.processes import ChildExited, service_user
from deploy.stack.state import Stack
from deploy.stack.supervision import (
    RESTART_DELAY_S,
    SERVICE_READY_TIMEOUT_S,
    restart_exited_services,
    worker_connected,
)
from services.common.broker_auth import ServiceAccount, sync_device_credentials
from services.common.db import connect

log = logging.getLogger("galvani.run")

# Every listener is TLS; 8883 is MQTT over TLS's registered port. The plaintext device
# listener (GALVANI_MQTT_PLAINTEXT=1, development only) prefers MQTT's 1883.
PREFERRED_MQTT_PORT = 8883
PREFERRED_CERT_MQTT_PORT = 8884  # the API's default device_cert_mqtt_port
PREFERRED_SERVICE_MQTT_PORT = 8885
PREFERRED_PLAIN_MQTT_PORT = 1883
# A broker that exits within MIN_UPTIME_S of its start failed to start; after
# MAX_QUICK_FAILURES of those in a row the stack stops instead of restarting it forever (as the
# API's server supervisor does).
MIN_UPTIME_S = 10.0
MAX_QUICK_FAILURES = 3
# After the broker dies, each worker's connected gauge must read 0 before the broker starts
# again; otherwise a gauge the worker has not yet updated would pass for a new subscription.
DISCONNECT_SEEN_TIMEOUT_S = 10.0
SUBSCRIBED_POLL_S = 0.1


def start_broker(stack: Stack, secrets: Secrets, pki: DevelopmentPKI) -> BrokerConfig:
    """Start Mosquitto with no device logins yet; return where it listens."""
    find_mosquitto()
    taken: list[int] = []

    def port(preferred: int, what: str, required: int | None = None, env_var: str = "") -> int:
        chosen = choose_port(preferred, required=required, what=what, env_var=env_var)
        while chosen in taken:
            chosen = free_port()
        taken.append(chosen)
        return chosen

    device_port = port(PREFERRED_MQTT_PORT, "MQTT", stack.options.mqtt_port, "GALVANI_MQTT_PORT")
    config = BrokerConfig(
        directory=stack.options.data_dir / "mosquitto",
        device_port=device_port,
        service_port=port(PREFERRED_SERVICE_MQTT_PORT, "MQTT (services)"),
        cert_port=port(PREFERRED_CERT_MQTT_PORT, "MQTT (device certificates)"),
        pki=pki,
        run_as=service_user(),
        plain_device_port=(
            port(PREFERRED_PLAIN_MQTT_PORT, "MQTT (plaintext)")
            if stack.options.mqtt_plaintext
            else None
        ),
    )
    passwords = {account: secrets.get(f"mqtt-{account}") for account in ServiceAccount}
    broker = MosquittoBroker(config, passwords)
    stack.broker = broker
    log.info(
        "starting Mosquitto on ports %d (devices, TLS), %d (devices with certificates), %d"
        " (services, TLS)%s",
        config.device_port,
        config.cert_port,
        config.service_port,
        ""
        if config.plain_device_port is None
        else f" and {config.plain_device_port} (devices, plaintext: GALVANI_MQTT_PLAINTEXT)",
    )
    # Devices are admitted only once ingest and rules have subscribed (module docstring).
    broker.start([])
    return config


def admit_devices(stack: Stack, database_url: str) -> None:
    """Render the device credentials from the database so devices may connect."""
    assert stack.broker is not None
    with connect(database_url) as conn:
        admitted = sync_device_credentials(conn, stack.broker.files)
    log.info("admitting %d devices", admitted)


def admit_devices_once_subscribed(stack: Stack, database_url: str, stop: threading.Event) -> bool:
    """Wait until every ingest and rules worker reports it is subscribed, then admit devices.

    The second half of the broker's start-up, at ``make run``'s start and after a restart: the
    broker was started with no device logins (see :func:`start_broker`). A worker that exits
    meanwhile is restarted; the broker exiting raises :class:`BrokerExited`. Returns False,
    admitting no one, when ``stop`` is set first.
    """
    waiting = dict(stack.consumers)
    log.info("devices wait until %s have subscribed", ", ".join(waiting))
    reported = time.monotonic()
    while True:
        for name, service in list(waiting.items()):
            if worker_connected(stack.metrics[name], service):
                log.info("%s is subscribed", name)
                del waiting[name]
        if not waiting:
            break
        check_broker(stack)
        restart_exited_services(stack)
        if time.monotonic() - reported > SERVICE_READY_TIMEOUT_S:
            reported = time.monotonic()
            log.warning(
                "%s not subscribed yet; devices are kept out until they are (see their logs)",
                ", ".join(waiting),
            )
        if stop.wait(SUBSCRIBED_POLL_S):
            return False
    admit_devices(stack, database_url)
    return True


class BrokerExited(ChildExited):
    """Mosquitto exited while the stack was waiting on it."""


def broker_exited(stack: Stack) -> int | None:
    """The broker's exit status if it was started and has exited since, else None."""
    broker = stack.broker
    if broker is None or broker.child is None:
        return None
    return broker.child.process.poll()


def check_broker(stack: Stack) -> None:
    """Raise :class:`BrokerExited` when the broker has exited."""
    status = broker_exited(stack)
    if status is not None:
        raise BrokerExited(f"Mosquitto exited (status {status})")


@dataclass
class QuickFailures:
    """Exits soon after a start, in a row; a child that keeps failing is not started forever."""

    what: str
    count: int = 0

    def record(self, lived_s: float, log_tail: str) -> None:
        """Count an exit after ``lived_s``; raise :class:`ChildExited` when too many in a row."""
        self.count = self.count + 1 if lived_s < MIN_UPTIME_S else 0
        if self.count >= MAX_QUICK_FAILURES:
            raise ChildExited(
                f"{self.what} exited {self.count} times in a row within {MIN_UPTIME_S:.0f} s of"
                f" starting: not restarting it; its log ends with:\n{log_tail}"
            )


def restart_broker(
    stack: Stack, database_url: str, stop: threading.Event, failures: QuickFailures
) -> None:
    """Start Mosquitto again after it exited, on the same ports and persistence directory.

    The same procedure as at start-up: no device logins until every ingest and rules worker
    has subscribed again. Mosquitto 2.0 restores sessions from its persistence file but not
    their shared subscriptions (docs/architecture.md, "Broker restarts"), so a device admitted
    earlier would publish to no subscriber. An API provisioning call inside this window renders
    every device at once; those devices then get PUBACK 0x10 "no matching subscribers", keep
    their messages and send them again (protocol.md), so it costs a retry, not data.
    """
    broker = stack.broker
    assert broker is not None
    while True:
        child = broker.child
        assert child is not None
        assert broker.started_at is not None
        lived_s = time.monotonic() - broker.started_at
        failures.record(lived_s, _broker_log_tail(broker))
        log.warning(
            "Mosquitto exited (status %s) after %.1f s; restarting it with no device logins",
            child.process.poll(),
            lived_s,
        )
        broker.stop()
        _wait_consumers_disconnected(stack)
        if failures.count:
            time.sleep(RESTART_DELAY_S)
        try:
            broker.start([])
        except ChildExited as exc:
            log.warning("%s", exc)
            continue
        assert broker.child is not None
        log.info(
            "Mosquitto restarted (pid %d) on ports %s",
            broker.child.pid,
            ", ".join(map(str, broker.ports)),
        )
        stack.rewrite_run_json()
        try:
            admit_devices_once_subscribed(stack, database_url, stop)
        except BrokerExited:
            continue
        return


def _wait_consumers_disconnected(stack: Stack) -> None:
    """Wait (briefly) until no worker still reports the connection to the dead broker."""
    deadline = time.monotonic() + DISCONNECT_SEEN_TIMEOUT_S
    while True:
        stale = [
            name
            for name, service in stack.consumers.items()
            if worker_connected(stack.metrics[name], service)
        ]
        if not stale:
            return
        if time.monotonic() > deadline:
            log.warning(
                "%s still report a connection to the broker that exited; going on",
                ", ".join(stale),
            )
            return
        time.sleep(SUBSCRIBED_POLL_S)


def _broker_log_tail(broker: MosquittoBroker, lines: int = 5) -> str:
    # Mosquitto writes its own log to a file (log_dest in mosquitto.conf); stdout holds only
    # what it prints before reading its configuration.
    path = broker.config.directory / "mosquitto.log"
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return f"({path})\n" + "\n".join(text.strip().splitlines()[-lines:])
