"""What ``make run`` has started, and ``run.json``, the file that tells clients about it."""

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from deploy.stack.mosquitto import MosquittoBroker
from deploy.stack.nats_cluster import NatsCluster
from deploy.stack.options import RunOptions
from deploy.stack.postgres import PostgresServer
from deploy.stack.processes import Child

log = logging.getLogger("galvani.run")


@dataclass
class Stack:
    """Everything ``make run`` started, stopped in reverse order."""

    options: RunOptions
    postgres: PostgresServer | None = None
    broker: MosquittoBroker | None = None
    cluster: NatsCluster | None = None  # make run-cluster's broker, instead of Mosquitto
    services: list[Child] = field(default_factory=list)
    # Services restarted when they exit, by name: how to start each again.
    restart: dict[str, Callable[[], Child]] = field(default_factory=dict)
    metrics: dict[str, str] = field(default_factory=dict)
    # The broker's consumers (ingest and rules workers) by child name: their service, which
    # names the gauge (galvani_<service>_connected) that says they are subscribed.
    consumers: dict[str, str] = field(default_factory=dict)
    # What run.json says, once written; rewritten when a restart changes a pid.
    info: dict[str, object] = field(default_factory=dict)

    @property
    def run_json(self) -> Path:
        """Where the start-up contract file goes."""
        return self.options.data_dir / "run.json"

    def pids(self) -> dict[str, int]:
        """Every running child's pid by name (run.json's ``pids``)."""
        pids = {child.name: child.pid for child in self.services}
        if self.postgres and self.postgres.child:
            pids["postgres"] = self.postgres.child.pid
        if self.broker and self.broker.child:
            pids["mosquitto"] = self.broker.child.pid
        if self.cluster is not None:
            for i, node in enumerate(self.cluster.nodes):
                if self.cluster.alive(i):
                    pids[f"nats-{node.name}"] = self.cluster.pid(i)
        return pids

    def write_run_json(self, info: dict[str, object]) -> None:
        """Write run.json atomically, owner-only (it holds the operator key)."""
        self.info = info
        tmp = self.run_json.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(info, handle, indent=2)
            handle.write("\n")
        os.replace(tmp, self.run_json)

    def rewrite_run_json(self) -> None:
        """Rewrite run.json with the current pids after a restart (once it has been written)."""
        if self.info:
            self.info["pids"] = self.pids()
            if self.cluster is not None:
                self.info["broker"] = self.cluster.run_json()
            self.write_run_json(self.info)

    def stop(self) -> None:
        """Stop services, then the broker, then the database; remove run.json."""
        self.run_json.unlink(missing_ok=True)
        if self.services or self.broker or self.cluster or self.postgres:
            log.info("stopping")
        # The fleet first, so that its devices' last messages reach ingest; then the backend's
        # services side by side (each finishes its own work; none needs another to stop).
        services = list(reversed(self.services))
        for child in services:
            if child.name == "fleet":
                child.stop()
        for child in services:
            child.ask_to_stop()
        for child in services:
            child.stop()
        self.services.clear()
        if self.broker is not None:
            self.broker.stop()
        if self.cluster is not None:
            self.cluster.stop()
        if self.postgres is not None:
            self.postgres.stop()
