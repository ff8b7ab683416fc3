"""``make run-cluster``: the whole system on a three-node NATS cluster, data under
``.galvani-cluster/``.

The same stack as ``make run`` (deploy/stack/runner.py: database, roles, keys, PKI, the API,
maintenance, notification dispatchers, ingest and rules workers, a simulated fleet) with the
broker replaced by a NATS 2.10 cluster (deploy/stack/nats_cluster.py) and two auth-callout
responders (services/broker_access) that decide every login from the database. What changes
for the rest:

* the ingest and rules workers consume the JetStream stream ``GALVANI_DEVICES`` through
  durable pull consumers (services/common/broker/jetstream.py) instead of shared MQTT
  subscriptions, and each worker starts on another node (``GALVANI_NATS_URLS`` rotated), so
  one node's death takes only a share of them to another;
* the simulated devices speak MQTT 3.1.1 (the only MQTT NATS speaks), are spread over the
  three nodes, and fail over to the others when theirs dies;
* devices are admitted by the responders from the first moment: the stream (created by the
  workers before they report themselves connected) keeps what devices send until both
  consumers have it, so nothing waits on "every worker has subscribed" as Mosquitto's
  shared subscriptions do (deploy/stack/broker_lifecycle.py).

``run.json`` names every node (``broker.nodes``: ports, pid, data directory), and a node that
exits is started again with its configuration and data, as a dead Mosquitto is.
"""

import functools
import logging
import os
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from deploy.stack import sim_fleet
from deploy.stack.nats_cluster import CalloutConfig, NatsCluster
from deploy.stack.options import RunOptions, Secrets
from deploy.stack.ports import LOOPBACK, free_port
from deploy.stack.processes import Child, http_ok, service_env, spawn, wait_until
from deploy.stack.runner import (
    Prepared,
    check_postgres,
    exclusive,
    prepare,
    print_ready,
    run_main,
)
from deploy.stack.state import Stack
from deploy.stack.supervision import (
    SERVICE_READY_TIMEOUT_S,
    BrokerEndpoints,
    restart_exited_services,
    start_services,
)
from services.broker_access.issuer import ensure_issuer
from services.broker_access.settings import ISSUER_SEED_FILE
from services.common.broker_auth import BrokerFiles, ServiceAccount
from services.common.migrations.grants import ServiceRole
from services.common.settings import REPO_ROOT

log = logging.getLogger("galvani.run")

NODES: Final = 3
RESPONDERS: Final = 2  # auth-callout responders: a login is answered while one of them runs
# Ingest and rules workers, spread over the nodes by the order they start in.
DEFAULT_CLUSTER_INGEST_WORKERS: Final = 3
DEFAULT_CLUSTER_RULES_WORKERS: Final = 2
SUPERVISE_POLL_S: Final = 0.5
NODE_RESTART_DELAY_S: Final = 1.0


def rotated(items: list[str], start: int) -> list[str]:
    """``items`` beginning at ``start`` (mod its length): the n-th service's node first."""
    n = start % len(items)
    return items[n:] + items[:n]


def nats_endpoints(cluster: NatsCluster, ca_file: Path) -> BrokerEndpoints:
    """Service ``n`` first tries node ``n mod 3`` (NATS for the workers, MQTT for the
    publishers of config tables and session takeovers), then the others."""
    urls = cluster.nats_urls().split(",")
    mqtt = cluster.mqtt_nodes().split(",")

    def service_settings(n: int) -> Mapping[str, str | int]:
        node = cluster.nodes[n % len(cluster.nodes)]
        return {"mqtt_host": LOOPBACK, "mqtt_port": node.mqtt_port}

    def environment(n: int) -> Mapping[str, str]:
        return {
            "GALVANI_BROKER": "nats",
            "GALVANI_NATS_URLS": ",".join(rotated(urls, n)),
            "GALVANI_MQTT_NODES": ",".join(rotated(mqtt, n)),
        }

    return BrokerEndpoints(
        ca_file=ca_file,
        service_settings=service_settings,
        environment=environment,
        # Devices connect to any node's MQTT port; certificate devices are not served by the
        # cluster (docs/architecture.md, "The clustered broker").
        api_settings={"device_mqtt_port": cluster.nodes[0].mqtt_port},
        watched=False,
        # Maintenance watches every node's monitoring port (galvani_broker_node_up, ...).
        maintenance_settings={
            "nats_monitor_urls": ",".join(node.monitor_url("") for node in cluster.nodes)
        },
    )


def start_cluster(stack: Stack, secrets: Secrets, prepared: Prepared) -> NatsCluster:
    """Write the service accounts' password file the responders check, then start the nodes
    with the auth callout (its issuer key is made once, kept in the secrets directory)."""
    options = stack.options
    passwords = {account: secrets.get(f"mqtt-{account}") for account in ServiceAccount}
    broker_dir = options.data_dir / "broker"
    broker_dir.mkdir(parents=True, exist_ok=True)
    BrokerFiles(broker_dir).write_service_files(passwords)
    issuer = ensure_issuer(secrets.directory / ISSUER_SEED_FILE)
    pki = prepared.pki
    cluster = NatsCluster(
        options.data_dir / "nats",
        nodes=NODES,
        tls=(pki.server_cert, pki.server_key, pki.ca_file),
        callout=CalloutConfig(
            issuer=issuer.public_key, auth_password=secrets.get("nats-auth-password")
        ),
        system_password=secrets.get("nats-sys-password"),
    )
    stack.cluster = cluster
    log.info("starting a %d-node NATS cluster", NODES)
    cluster.start()
    return cluster


def start_responders(
    stack: Stack, cluster: NatsCluster, secrets: Secrets, prepared: Prepared
) -> None:
    """Start the auth-callout responders, each first on another node, and wait until each
    serves its metrics (it has subscribed by then)."""
    urls = cluster.nats_urls().split(",")
    options = stack.options
    started = []
    for n in range(1, RESPONDERS + 1):
        name = f"broker-access-{n}"
        metrics_port = free_port()
        stack.metrics[name] = f"http://{LOOPBACK}:{metrics_port}/metrics"
        env = service_env(
            "BROKER_ACCESS",
            database_url=prepared.database_urls[ServiceRole.BROKER_ACCESS],
            mqtt_password=secrets.get("nats-auth-password"),
            mqtt_ca_file=str(prepared.pki.ca_file),
            issuer_seed_file=str(secrets.directory / ISSUER_SEED_FILE),
            broker_dir=str(options.data_dir / "broker"),
            responder_id=str(n),
            metrics_port=metrics_port,
        )
        env.update({"GALVANI_BROKER": "nats", "GALVANI_NATS_URLS": ",".join(rotated(urls, n - 1))})

        def start(name: str = name, env: dict[str, str] = env) -> Child:
            return spawn(
                name,
                [sys.executable, "-m", "services.broker_access.main"],
                options.data_dir / "logs" / f"{name}.log",
                env=env,
                cwd=REPO_ROOT,
            )

        child = start()
        stack.services.append(child)
        stack.restart[name] = start
        started.append(child)
    for child in started:
        wait_until(
            functools.partial(http_ok, stack.metrics[child.name]),
            child=child,
            timeout_s=SERVICE_READY_TIMEOUT_S,
            what=child.name,
        )


def run_cluster(options: RunOptions, stop: threading.Event) -> None:
    """Start everything on the cluster, write run.json, and block until ``stop`` or a child
    exits."""
    with exclusive(options.data_dir):
        stack = Stack(options)
        secrets = Secrets(options.data_dir / "secrets")
        try:
            prepared = prepare(stack, secrets)
            pki = prepared.pki
            cluster = start_cluster(stack, secrets, prepared)
            start_responders(stack, cluster, secrets, prepared)
            api_url = start_services(
                stack,
                prepared.database_urls,
                nats_endpoints(cluster, pki.ca_file),
                secrets,
                tls_cert=(pki.server_cert, pki.server_key),
                rules_workers=options.rules_workers or DEFAULT_CLUSTER_RULES_WORKERS,
            )
            if options.sim_devices:
                sim_fleet.start_fleet(
                    stack,
                    prepared.fleet_dir,
                    cluster.nodes[0].mqtt_port,
                    pki.ca_file,
                    brokers=[f"{LOOPBACK}:{node.mqtt_port}" for node in cluster.nodes],
                    mqtt_version="3.1.1",
                )
            stack.write_run_json(
                {
                    **prepared.run_json(stack, api_url),
                    "mqtt_host": LOOPBACK,
                    # Devices may connect to any node; mqtt_port is the first one's.
                    "mqtt_port": cluster.nodes[0].mqtt_port,
                    "broker": cluster.run_json(),
                    "metrics": stack.metrics,
                    "pids": stack.pids(),
                }
            )
            print_ready(stack.info, stack.run_json)
            supervise_cluster(stack, stop)
        finally:
            stack.stop()


def supervise_cluster(stack: Stack, stop: threading.Event) -> None:
    """Restart exited services and nodes until ``stop``; PostgreSQL exiting ends it."""
    cluster = stack.cluster
    assert cluster is not None
    while not stop.wait(SUPERVISE_POLL_S):
        restart_exited_services(stack)
        for i, node in enumerate(cluster.nodes):
            if not cluster.alive(i):
                log.warning("NATS node %s exited; starting it again", node.name)
                time.sleep(NODE_RESTART_DELAY_S)
                cluster.restart(i)
                stack.rewrite_run_json()
        check_postgres(stack)


def main() -> int:
    """Entry point for ``make run-cluster``."""
    env = dict(os.environ)
    env.setdefault("GALVANI_DATA_DIR", str(REPO_ROOT / ".galvani-cluster"))
    env.setdefault("GALVANI_INGEST_WORKERS", str(DEFAULT_CLUSTER_INGEST_WORKERS))
    return run_main(run_cluster, env)
