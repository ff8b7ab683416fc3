"""Rules worker settings (environment prefix ``GALVANI_RULES_``)."""

from pathlib import Path
from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import FlushIntervalS, ReceiveMaximum, WorkerSettings


class RulesSettings(WorkerSettings):
    """One rules worker; run several with distinct ``worker_id`` to share the load."""

    model_config = SettingsConfigDict(env_prefix="GALVANI_RULES_", extra="ignore")
    service: ClassVar[str] = "rules"

    # Alerts are latency-bound, not throughput-bound: small batches, flushed within 5 ms.
    batch_max_messages: int = Field(default=200, ge=1, le=5000)
    flush_interval_s: FlushIntervalS = 0.005
    receive_maximum: ReceiveMaximum = 2000
    # Offline and unanswered-table checks, retention of the rules' own state, republishing.
    sweep_interval_s: float = Field(default=30.0, gt=0, le=3600)
    # An unanswered table is published again once its device has been back online this long
    # (a broker crash can lose a retained table; config_push.unanswered_pushes).
    republish_grace_s: float = Field(default=30.0, ge=0, le=86_400)
    # The backend's Ed25519 key; created (owner-only) on first run when absent.
    signing_key_dir: Path | None = None

    def key_dir(self) -> Path:
        """Where the signing key lives: ``signing_key_dir``, else ``<data_dir>/secrets``."""
        return self.signing_key_dir or self.data_dir / "secrets"
