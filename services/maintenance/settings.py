"""Maintenance service settings (environment prefix ``GALVANI_MAINTENANCE_``)."""

import ssl
from pathlib import Path
from typing import Self

from pydantic import SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.broker_auth import ServiceAccount
from services.common.settings import Environment, refuse_default_secrets, refuse_plaintext
from services.common.tls import client_context
from services.maintenance.silent_devices import DEFAULT_SILENT_AFTER_S, MIN_SILENT_AFTER_S


class MaintenanceSettings(BaseSettings):
    """The database, and the broker only when ``mqtt_password`` is given: maintenance then
    watches the broker's own statistics (``$SYS``) and serves them with its metrics.

    The broker fields follow :class:`services.common.settings.ServiceSettings`, except that
    the password is optional (without it nothing connects to the broker).
    """

    model_config = SettingsConfigDict(env_prefix="GALVANI_MAINTENANCE_", extra="ignore")

    environment: Environment = Environment.DEVELOPMENT
    # As galvani_maintenance's login role: retention's drops go through the functions it may
    # call (services/common/migrations/grants.py), not the owner's rights.
    database_url: SecretStr
    interval_s: float = 60.0
    # Rollups are recomputed for this much recent time on every pass, besides the hours
    # ingest marks dirty when late (buffered) samples arrive.
    rollup_lookback_s: float = 2 * 3600.0
    # A device from which nothing was received for this long is reported offline (a presence
    # log row with no ts, as a will), for wills a broker killed -9 never sent: 300 s is five
    # missed heartbeats (an idle device sends a telemetry sample a minute). Must exceed 60 s,
    # the heartbeat period (services/maintenance/silent_devices.py).
    silent_after_s: float = DEFAULT_SILENT_AFTER_S
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 8885
    mqtt_username: str = ServiceAccount.MAINTENANCE.value
    mqtt_password: SecretStr | None = None
    mqtt_tls: bool = True
    mqtt_ca_file: Path | None = None
    # The NATS cluster's HTTP monitoring URLs, comma-separated ("http://127.0.0.1:8222,...");
    # when given, maintenance polls each node's health and JetStream consumers
    # (services/maintenance/cluster_watch.py). Empty with Mosquitto.
    nats_monitor_urls: str = ""
    # Where the metrics endpoint listens (0.0.0.0 in a pod, so Prometheus and probes reach it).
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0
    log_level: str = "INFO"

    @property
    def watches_broker(self) -> bool:
        """Whether to watch the broker's statistics (a broker password was given)."""
        return self.mqtt_password is not None

    def nats_monitor_url_list(self) -> list[str]:
        """The cluster nodes' monitoring URLs (empty: no cluster to watch)."""
        return [url.strip() for url in self.nats_monitor_urls.split(",") if url.strip()]

    @model_validator(mode="after")
    def _refuse_insecure(self) -> Self:
        refuse_default_secrets(self.environment, self.database_url, self.mqtt_password)
        refuse_plaintext(self.environment, self.mqtt_tls)
        return self

    @field_validator("silent_after_s")
    @classmethod
    def _longer_than_a_heartbeat(cls, value: float) -> float:
        if not value > MIN_SILENT_AFTER_S:
            raise ValueError(
                f"silent_after_s must exceed {MIN_SILENT_AFTER_S:g} s, the heartbeat period:"
                " an idle device between two heartbeats would be reported offline"
            )
        return value

    def mqtt_tls_context(self) -> ssl.SSLContext | None:
        """The TLS context for the broker connection, None when ``mqtt_tls`` is off."""
        return client_context(self.mqtt_ca_file) if self.mqtt_tls else None
