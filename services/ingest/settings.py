"""Ingest worker settings (environment prefix ``GALVANI_INGEST_``)."""

from pathlib import Path
from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import FlushIntervalS, ReceiveMaximum, WorkerSettings


class IngestSettings(WorkerSettings):
    """One ingest worker; run several with distinct ``worker_id`` to share the load."""

    model_config = SettingsConfigDict(env_prefix="GALVANI_INGEST_", extra="ignore")
    service: ClassVar[str] = "ingest"

    # Throughput-bound: large batches, each one COPY.
    batch_max_messages: int = Field(default=1000, ge=1, le=20_000)
    flush_interval_s: FlushIntervalS = 0.1
    receive_maximum: ReceiveMaximum = 4000
    # Tell each device which of its seqs are committed (protocol.md, channel ``ack``): a device
    # deletes a message from its outbox only then. Off only for fleets whose firmware deletes
    # on the broker's PUBACK and does not listen (it saves one small publish per device a batch).
    stored_acks: bool = True
    # A device's message budget, counted by each worker in the batches it takes (services/ingest/
    # throttle.py): past ``throttle_messages`` in ``throttle_window_s`` the device is banned
    # from the broker for ``throttle_ban_s``. protocol.md: a device sends at most 10 telemetry
    # messages a second (usually 1) and a few events; the budget is 20 times that, so an outbox
    # replayed after an outage only slows down. Off, a flooding device delays every other.
    throttle: bool = True
    throttle_messages: int = Field(default=2000, ge=10)
    throttle_window_s: float = Field(default=10.0, gt=0, le=3600)
    throttle_ban_s: float = Field(default=30.0, gt=0, le=86_400)
    # A banned device that connects with a certificate is not kept out by the password file:
    # its session is ended by takeover (ingest's account on the service listener) when the ban
    # starts and again while its messages keep arriving, at most once per this interval
    # (throttle.TAKEOVER_INTERVAL_S says why 0.2 s).
    throttle_takeover_interval_s: float = Field(default=0.2, gt=0, le=60)
    throttle_takeover_timeout_s: float = Field(default=5.0, gt=0, le=60)
    # The broker's configuration directory, where bans are written (default
    # ``<data_dir>/mosquitto``, as ``make run`` lays it out); ingest and the broker share a host.
    broker_dir: Path | None = None

    def mosquitto_dir(self) -> Path:
        """Where the broker's auth files live."""
        return self.broker_dir or self.data_dir / "mosquitto"
