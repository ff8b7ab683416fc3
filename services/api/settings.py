"""API service settings (environment prefix ``GALVANI_API_``)."""

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class ApiSettings(ServiceSettings):
    """What the API process needs to run."""

    model_config = SettingsConfigDict(env_prefix="GALVANI_API_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    # Server processes (uvicorn workers): one per core serves the most requests; each has its
    # own database pool, rate-limit buckets and alert feed.
    workers: int = Field(default=2, ge=1, le=64)
    mqtt_username: str = "galvani-api"
    # Database connections per process, for the reads on the event loop and again for the
    # requests that write: requests beyond it wait for one, at most ``pool_timeout_s``
    # (then 503).
    pool_size: int = 10
    pool_timeout_s: float = Field(default=10.0, gt=0)
    # Per API key, across every API process: this many requests at once, then this many a
    # second (429 beyond).
    rate_limit_burst: int = Field(default=100, ge=1)
    rate_limit_per_s: float = Field(default=50.0, gt=0)
    # Failed authentications (an unknown or revoked key), per source address and per presented
    # key prefix, across every API process: this many in a window of this many seconds; beyond,
    # 429 until the window ends, and an address over it is refused whatever key it sends.
    auth_failures_per_window: int = Field(default=20, ge=1)
    auth_failure_window_s: float = Field(default=60.0, gt=0)
    # Provisioning conflicts (a device id already taken) per key, across every API process:
    # beyond this many in a window, every provisioning call of the key gets 429 until it ends,
    # so the answer cannot be used to enumerate the ids other brands hold.
    provision_conflicts_per_window: int = Field(default=20, ge=1)
    provision_conflict_window_s: float = Field(default=600.0, gt=0)
    # Open alert streams (GET /v1/alerts/stream), per key and in all, in each API process.
    alert_streams_per_key: int = Field(default=5, ge=1)
    alert_streams_per_process: int = Field(default=200, ge=1)
    # At most this many alert changes replayed after Last-Event-ID (the newest of them), read
    # and sent a page at a time.
    alert_replay_max_changes: int = Field(default=10_000, ge=1)
    # The mode-table signing key's directory (default ``<data_dir>/secrets``).
    signing_key_dir: Path | None = None

    # The broker's configuration directory (its device password file is rendered there on
    # provisioning and revocation); the broker and the API share a host.
    broker_dir: Path | None = None
    # The device listener's address, handed to provisioned devices.
    device_mqtt_host: str = "127.0.0.1"
    device_mqtt_port: int = 1883

    def mosquitto_dir(self) -> Path:
        """Where the broker's auth files live (default ``<data_dir>/mosquitto``)."""
        return self.broker_dir or self.data_dir / "mosquitto"

    def key_dir(self) -> Path:
        """Where the signing key lives."""
        return self.signing_key_dir or self.data_dir / "secrets"
