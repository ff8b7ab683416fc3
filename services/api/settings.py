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
    # Per API key: this many requests at once, then this many a second (429 beyond).
    rate_limit_burst: int = 100
    rate_limit_per_s: float = 50.0
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
