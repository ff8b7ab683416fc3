"""Rules worker settings (environment prefix ``GALVANI_RULES_``)."""

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings

WEEK_S = 7 * 24 * 3600


class RulesSettings(ServiceSettings):
    """One rules worker; run several with distinct ``worker_id`` to share the load."""

    model_config = SettingsConfigDict(env_prefix="GALVANI_RULES_", extra="ignore")

    mqtt_username: str = "galvani-rules"
    # The MQTT client id is galvani-rules-<worker_id>: a restarted worker must reuse it to
    # pick up the session (and the messages) the broker kept for it.
    worker_id: str = Field(default="1", pattern=r"^[a-z0-9-]{1,32}$")
    share_group: str = Field(default="rules", pattern=r"^[a-z0-9-]{1,32}$")
    # Alerts are latency-bound, not throughput-bound: small batches, flushed within 5 ms.
    batch_max_messages: int = Field(default=200, ge=1, le=5000)
    flush_interval_s: float = Field(default=0.005, gt=0, le=5)
    receive_maximum: int = Field(default=2000, ge=1, le=65_535)
    session_expiry_s: int = Field(default=WEEK_S, ge=3600)
    # Offline and unanswered-table checks, retention of the rules' own state, republishing.
    sweep_interval_s: float = Field(default=30.0, gt=0, le=3600)
    # An unanswered table is published again once its device has been back online this long
    # (a broker crash can lose a retained table; config_push.unanswered_pushes).
    republish_grace_s: float = Field(default=30.0, ge=0, le=86_400)
    # The backend's Ed25519 key; created (owner-only) on first run when absent.
    signing_key_dir: Path | None = None
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=0, ge=0, le=65_535)

    def key_dir(self) -> Path:
        """Where the signing key lives: ``signing_key_dir``, else ``<data_dir>/secrets``."""
        return self.signing_key_dir or self.data_dir / "secrets"
