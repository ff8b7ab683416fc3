"""The backend's processes under ``make run``: the API, maintenance, the notification
dispatchers, and the ingest and rules workers, each started with its ``GALVANI_<SERVICE>_*``
settings and restarted when it exits."""

import functools
import logging
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from deploy.stack.mosquitto import BrokerConfig
from deploy.stack.options import Secrets
from deploy.stack.ports import LOOPBACK, choose_port, free_port
from deploy.stack.processes import (
    Child,
    ChildExited,
    http_get,
    http_ok,
    service_env,
    spawn,
    wait_until,
)
from deploy.stack.state import Stack
from services.common.broker_auth import ServiceAccount
from services.common.migrations.grants import ServiceRole
from services.common.settings import REPO_ROOT
from services.common.tls import client_context

log = logging.getLogger("galvani.run")

# A worker that dies is restarted under the same client id (the broker keeps dealing its
# share of messages to its session), but not in a tight loop.
RESTART_DELAY_S = 1.0
PREFERRED_API_PORT = 8000
SERVICE_READY_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class BrokerEndpoints:
    """Where the backend's services find the broker, whichever it is.

    ``service_settings(n)`` are the broker settings of the n-th service started (each gets
    them as ``GALVANI_<SERVICE>_*``): one Mosquitto gives every service its service listener;
    a cluster spreads the services over its nodes. ``api_settings`` are what the API alone
    needs (the device listeners it tells devices about, the device CA and trust directory).
    ``watched`` says whether maintenance watches the broker's own statistics (Mosquitto's
    ``$SYS``, with the maintenance account's broker password). ``environment(n)`` holds the
    installation-wide variables (no service prefix) of the n-th service.
    """

    ca_file: Path
    service_settings: Callable[[int], Mapping[str, str | int]]
    api_settings: Mapping[str, str | int]
    watched: bool = True
    # Installation-wide variables (GALVANI_BROKER, GALVANI_NATS_URLS, ...) of the n-th service.
    environment: Callable[[int], Mapping[str, str]] = lambda _: {}
    # Maintenance's own broker settings (a cluster's monitoring URLs).
    maintenance_settings: Mapping[str, str | int] = field(default_factory=dict)


def mosquitto_endpoints(broker: BrokerConfig) -> BrokerEndpoints:
    """Every service on Mosquitto's service listener; the API also knows the device ones."""
    service_port = broker.service_port
    return BrokerEndpoints(
        ca_file=broker.pki.ca_file,
        service_settings=lambda _: {"mqtt_port": service_port},
        api_settings={
            "device_mqtt_port": broker.device_port,
            "device_cert_mqtt_port": broker.cert_port,
            "device_ca_cert": str(broker.pki.device_ca_cert),
            "device_ca_key": str(broker.pki.device_ca_key),
            "trust_dir": str(broker.pki.trust_dir),
        },
    )


@dataclass
class _Connection:
    """Where every service finds the database (as its own role) and the broker, and the CA
    it verifies the broker's certificate against."""

    database_urls: Mapping[ServiceRole, str]
    broker: BrokerEndpoints
    secrets: Secrets
    started: int = 0  # services started so far: the next one's index into the broker's nodes

    def spawn(
        self,
        stack: Stack,
        name: str,
        account: ServiceAccount,
        *,
        with_broker_password: bool = True,
        extra: Mapping[str, str | int] | None = None,
        **settings: str | int,
    ) -> Child:
        """Start the service of ``account`` (``python -m services.<service>.main``) as ``name``
        with its ``GALVANI_<SERVICE>_*`` settings, logging to ``logs/<name>.log``."""
        service = account.removeprefix("galvani-")
        broker_settings = dict(self.broker.service_settings(self.started))
        environment = self.broker.environment(self.started)
        self.started += 1
        if with_broker_password:
            broker_settings["mqtt_password"] = self.secrets.get(f"mqtt-{account}")
        env = service_env(
            service.upper(),
            database_url=self.database_urls[ServiceRole(f"galvani_{service}")],
            mqtt_ca_file=str(self.broker.ca_file),
            **broker_settings,
            **(extra or {}),
            **settings,
        )
        env.update(environment)
        return spawn(
            name,
            [sys.executable, "-m", f"services.{service}.main"],
            stack.options.data_dir / "logs" / f"{name}.log",
            env=env,
            cwd=REPO_ROOT,
        )


def start_services(
    stack: Stack,
    database_urls: Mapping[ServiceRole, str],
    broker: BrokerEndpoints,
    secrets: Secrets,
    *,
    tls_cert: tuple[Path, Path],
    rules_workers: int = 1,
) -> str:
    """Start the API and the maintenance loop, each with its own database URL, then the ingest
    and rules workers with theirs; return the API's URL once it is ready. ``tls_cert`` is the
    server certificate and key the API serves HTTPS with (``GALVANI_API_TLS=1``)."""
    options = stack.options
    api_port = choose_port(
        PREFERRED_API_PORT, required=options.api_port, what="API", env_var="GALVANI_API_PORT"
    )
    connection = _Connection(database_urls, broker, secrets)
    # The API signs device certificates with the device CA, publishes revocation lists into
    # the broker's trust directory, and (with GALVANI_API_TLS=1) serves HTTPS with the
    # server certificate.
    api = connection.spawn(
        stack,
        "api",
        ServiceAccount.API,
        data_dir=str(options.data_dir),
        port=api_port,
        extra=broker.api_settings,
        tls=int(options.api_tls),
        tls_cert_file=str(tls_cert[0]),
        tls_key_file=str(tls_cert[1]),
    )
    stack.services.append(api)
    maintenance_metrics_port = free_port()
    stack.metrics["maintenance"] = f"http://{LOOPBACK}:{maintenance_metrics_port}/metrics"
    # With the broker's password it also watches the broker's statistics ($SYS).
    maintenance = connection.spawn(
        stack,
        "maintenance",
        ServiceAccount.MAINTENANCE,
        with_broker_password=broker.watched,
        extra=broker.maintenance_settings,
        metrics_port=maintenance_metrics_port,
    )
    stack.services.append(maintenance)
    scheme = "https" if options.api_tls else "http"
    api_url = f"{scheme}://{LOOPBACK}:{api_port}"
    dispatchers = []
    for dispatcher in range(1, options.notify_dispatchers + 1):
        start_notify = _notify_starter(stack, connection, str(dispatcher), f"{api_url}/dashboard/")
        notify = start_notify()
        stack.services.append(notify)
        stack.restart[notify.name] = start_notify
        dispatchers.append(notify)
    # Both consumers subscribe before any device is admitted (see broker_lifecycle). They are
    # started together, then waited for: each spends its first seconds importing.
    workers = [("ingest", str(n)) for n in range(1, options.ingest_workers + 1)]
    workers.extend(("rules", str(n)) for n in range(1, rules_workers + 1))
    started = []
    for service, worker in workers:
        start_worker = _worker_starter(stack, connection, service, worker)
        child = start_worker()
        stack.services.append(child)
        stack.restart[child.name] = start_worker
        stack.consumers[child.name] = service
        started.append((child, service, worker))
    for child, service, worker in started:
        wait_until(
            functools.partial(worker_connected, stack.metrics[child.name], service),
            child=child,
            timeout_s=SERVICE_READY_TIMEOUT_S,
            what=f"{service} worker {worker}",
        )
    # A dispatcher serves its metrics once its settings are read: one that refuses them (an
    # SMTP server without a sender, say) stops the start with its log, not a restart loop.
    for notify in dispatchers:
        wait_until(
            functools.partial(http_ok, stack.metrics[notify.name]),
            child=notify,
            timeout_s=SERVICE_READY_TIMEOUT_S,
            what=f"notification dispatcher {notify.name}",
        )
    api_tls = client_context(broker.ca_file) if options.api_tls else None
    wait_until(
        lambda: http_ok(f"{api_url}/readyz", tls=api_tls),
        child=api,
        timeout_s=SERVICE_READY_TIMEOUT_S,
        what="the API",
    )
    return api_url


def _notify_starter(
    stack: Stack, connection: _Connection, dispatcher: str, dashboard_url: str
) -> Callable[[], Child]:
    """How to (re)start notification dispatcher ``dispatcher`` (``notify-<n>``): its own
    database role, no broker. Dispatchers share the outbox (a claim skips rows another holds),
    and a restart loses nothing: what was in flight is sent again when its lease ends, with
    the same idempotency key. They share the channel secrets' key with the API
    (``<data_dir>/secrets/notify-secret-key``) and link notifications to ``dashboard_url``.
    The rest of the caller's ``GALVANI_NOTIFY_*`` environment reaches them as it is:
    ``_ALLOW_PRIVATE_TARGETS`` and ``_ALLOW_HTTP_TARGETS`` (also read by the API) for a
    receiver on this machine, ``_SMTP_*`` for the e-mail channels' server."""
    name = f"notify-{dispatcher}"
    metrics_port = free_port()
    stack.metrics[name] = f"http://{LOOPBACK}:{metrics_port}/metrics"

    def start() -> Child:
        return spawn(
            name,
            [sys.executable, "-m", "services.notify.main"],
            stack.options.data_dir / "logs" / f"{name}.log",
            env=service_env(
                "NOTIFY",
                database_url=connection.database_urls[ServiceRole.NOTIFY],
                data_dir=str(stack.options.data_dir),
                metrics_port=metrics_port,
                dashboard_url=dashboard_url,
            ),
            cwd=REPO_ROOT,
        )

    return start


def _worker_starter(
    stack: Stack, connection: _Connection, service: str, worker: str
) -> Callable[[], Child]:
    """How to (re)start worker ``worker`` of ``service`` (ingest or rules) under one name."""
    name = f"{service}-{worker}"
    metrics_port = free_port()
    stack.metrics[name] = f"http://{LOOPBACK}:{metrics_port}/metrics"
    account = ServiceAccount.INGEST if service == "ingest" else ServiceAccount.RULES

    def start() -> Child:
        return connection.spawn(
            stack,
            name,
            account,
            data_dir=str(stack.options.data_dir),
            worker_id=worker,
            metrics_port=metrics_port,
        )

    return start


def worker_connected(metrics_url: str, service: str) -> bool:
    """Whether a worker's metrics say it holds its subscriptions (set on the broker's SUBACK)."""
    body = http_get(metrics_url)
    return body is not None and f"galvani_{service}_connected 1.0".encode() in body


def restart_exited_services(stack: Stack) -> None:
    """Restart each restartable service that exited; any other exit stops the stack."""
    restarted = False
    for index, child in enumerate(stack.services):
        if child.alive():
            continue
        start = stack.restart.get(child.name)
        if start is None:
            raise ChildExited(
                f"{child.name} exited unexpectedly; its log ({child.log_path}) ends with:\n"
                f"{child.log_tail()}"
            )
        log.warning("%s exited (status %s); restarting it", child.name, child.process.returncode)
        child.stop()
        time.sleep(RESTART_DELAY_S)
        stack.services[index] = start()
        restarted = True
    if restarted:
        stack.rewrite_run_json()
