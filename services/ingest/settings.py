"""Ingest worker settings (environment prefix ``GALVANI_INGEST_``)."""

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
