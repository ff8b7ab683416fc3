"""Ingest worker settings (environment prefix ``GALVANI_INGEST_``)."""

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings

WEEK_S = 7 * 24 * 3600


class IngestSettings(ServiceSettings):
    """One ingest worker; run several with distinct ``worker_id`` to share the load."""

    model_config = SettingsConfigDict(env_prefix="GALVANI_INGEST_", extra="ignore")

    mqtt_username: str = "galvani-ingest"
    # The MQTT client id is galvani-ingest-<worker_id>: a restarted worker must reuse it to
    # pick up the session (and the messages) the broker kept for it.
    worker_id: str = Field(default="1", pattern=r"^[a-z0-9-]{1,32}$")
    share_group: str = Field(default="ingest", pattern=r"^[a-z0-9-]{1,32}$")
    # A batch is flushed when it holds this many messages or its oldest is this old.
    batch_max_messages: int = Field(default=1000, ge=1, le=20_000)
    flush_interval_s: float = Field(default=0.1, gt=0, le=5)
    # Unacknowledged messages the worker holds at most (sent as MQTT 5 Receive Maximum, and
    # enforced by the worker too): the bound on its memory. Below batch_max_messages, batches
    # are flushed by age only.
    receive_maximum: int = Field(default=4000, ge=1, le=65_535)
    # How long the broker keeps a stopped worker's session and queued messages.
    session_expiry_s: int = Field(default=WEEK_S, ge=3600)
    # Tell each device which of its seqs are committed (protocol.md, channel ``ack``): a device
    # deletes a message from its outbox only then. Off only for fleets whose firmware deletes
    # on the broker's PUBACK and does not listen (it saves one small publish per device a batch).
    stored_acks: bool = True
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=0, ge=0, le=65_535)
