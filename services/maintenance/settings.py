"""Maintenance service settings (environment prefix ``GALVANI_MAINTENANCE_``)."""

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class MaintenanceSettings(BaseSettings):
    """Database only: maintenance never talks to the broker."""

    model_config = SettingsConfigDict(env_prefix="GALVANI_MAINTENANCE_", extra="ignore")

    database_url: SecretStr
    interval_s: float = 60.0
    # Rollups are recomputed for this much recent time on every pass, besides the hours
    # ingest marks dirty when late (buffered) samples arrive.
    rollup_lookback_s: float = 2 * 3600.0
    metrics_port: int = 0
    log_level: str = "INFO"
