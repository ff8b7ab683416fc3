"""Test helpers for the NATS cluster: a cluster in a test's directory, and the auth-callout
responder for a test's database. Its MQTT gateway (3.1.1 only) is spoken to with tests/mqtt.py's
``MqttClient(..., protocol=MQTT_311)``."""

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from deploy.stack.nats_cluster import AUTH_USER, CalloutConfig, NatsCluster, callout_config
from deploy.stack.pki import DevelopmentPKI
from deploy.stack.ports import free_port
from deploy.stack.postgres import new_password
from deploy.stack.processes import Child, http_get, http_ok, spawn
from services.broker_access.settings import ISSUER_SEED_FILE
from services.common.broker_auth import BrokerFiles, ServiceAccount
from services.common.migrations.grants import ServiceRole
from tests.roles import as_service


def cluster_tls(pki: DevelopmentPKI) -> tuple[Path, Path, Path]:
    """The cluster's server certificate, key and CA from the suite's PKI."""
    return (pki.server_cert, pki.server_key, pki.ca_file)


@contextlib.contextmanager
def running_cluster(
    directory: Path,
    pki: DevelopmentPKI,
    *,
    callout: CalloutConfig | None = None,
    static_users: dict[str, str] | None = None,
) -> Iterator[NatsCluster]:
    """A started 3-node cluster under ``directory`` (TLS from ``pki``), stopped afterwards."""
    cluster = NatsCluster(
        directory, tls=cluster_tls(pki), callout=callout, static_users=static_users
    )
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@dataclass(frozen=True)
class CalloutSetup:
    """What a responder needs besides its database: the issuer seed, its own password as
    ``galvani-auth``, and the directory holding the service password file."""

    issuer_seed_file: Path
    auth_password: str
    broker_dir: Path
    ca_file: Path


def callout_setup(
    directory: Path, pki: DevelopmentPKI, service_passwords: dict[ServiceAccount, str]
) -> tuple[CalloutSetup, CalloutConfig]:
    """An issuer key, the responder's password and the service password file under
    ``directory``, and the cluster's callout configuration that goes with them."""
    seed_file = directory / "secrets" / ISSUER_SEED_FILE
    config = callout_config(seed_file, new_password())
    broker_dir = directory / "broker"
    broker_dir.mkdir(parents=True, exist_ok=True)
    BrokerFiles(broker_dir).write_service_files(service_passwords)
    setup = CalloutSetup(
        issuer_seed_file=seed_file,
        auth_password=config.auth_password,
        broker_dir=broker_dir,
        ca_file=pki.ca_file,
    )
    return setup, config


READY_TIMEOUT_S = 20.0


class ResponderProcess:
    """``python -m services.broker_access.main`` for one test's database (as the responder's
    own role), stopped by its pid."""

    def __init__(
        self,
        cluster: NatsCluster,
        setup: CalloutSetup,
        database_url: str,
        log_path: Path,
        responder_id: str = "1",
        nats_urls: str | None = None,
    ) -> None:
        """``nats_urls``: the servers in the order tried (the cluster's, from its first node,
        by default); a cluster's responders each start on another node, as make run-cluster
        starts them, so that one node stopping leaves the others a responder."""
        metrics_port = free_port()
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        env = dict(os.environ)
        env.update(
            {
                "GALVANI_BROKER_ACCESS_METRICS_PORT": str(metrics_port),
                "GALVANI_BROKER": "nats",
                "GALVANI_NATS_URLS": nats_urls or cluster.nats_urls(),
                "GALVANI_BROKER_ACCESS_DATABASE_URL": as_service(
                    database_url, ServiceRole.BROKER_ACCESS
                ),
                "GALVANI_BROKER_ACCESS_MQTT_USERNAME": AUTH_USER,
                "GALVANI_BROKER_ACCESS_MQTT_PASSWORD": setup.auth_password,
                "GALVANI_BROKER_ACCESS_MQTT_CA_FILE": str(setup.ca_file),
                "GALVANI_BROKER_ACCESS_ISSUER_SEED_FILE": str(setup.issuer_seed_file),
                "GALVANI_BROKER_ACCESS_BROKER_DIR": str(setup.broker_dir),
                "GALVANI_BROKER_ACCESS_RESPONDER_ID": responder_id,
                "GALVANI_BROKER_ACCESS_LOG_LEVEL": "DEBUG",
            }
        )
        self.log_path = log_path
        self.child: Child = spawn(
            f"broker-access-{responder_id}",
            [sys.executable, "-m", "services.broker_access.main"],
            log_path,
            env=env,
        )
        self._wait_serving()

    def _wait_serving(self) -> None:
        # The metrics endpoint opens once the responder has subscribed (as make run-cluster
        # waits for it).
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not http_ok(self.metrics_url):
            if not self.child.alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the responder did not start:\n{self.child.log_tail(20)}")
            time.sleep(0.05)

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample of the responder's metrics (0 when absent)."""
        body = http_get(self.metrics_url)
        assert body is not None
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
        return 0.0

    def stop(self) -> None:
        """SIGTERM, then wait."""
        self.child.stop()
