"""Auth-callout responder settings (environment prefix ``GALVANI_BROKER_ACCESS_``)."""

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings, WorkerName

ISSUER_SEED_FILE = "nats-callout-issuer.seed"


class BrokerAccessSettings(ServiceSettings):
    """The database (as galvani_broker_access), the cluster's NATS URLs (GALVANI_NATS_URLS),
    the responder's own NATS login (``galvani-auth``, in the AUTH account, which the callout
    does not ask about), the issuer seed and the broker directory holding the service password
    file."""

    model_config = SettingsConfigDict(env_prefix="GALVANI_BROKER_ACCESS_", extra="ignore")

    mqtt_username: str = "galvani-auth"
    # The issuer account's seed (``SA...``), whose public key is every node's
    # ``auth_callout.issuer``: default ``<data_dir>/secrets/nats-callout-issuer.seed``.
    issuer_seed_file: Path | None = None
    # Where deploy writes the service password file (services.passwd).
    broker_dir: Path | None = None
    # Names this responder's NATS connection (galvani-auth-<id>); several serve one queue.
    responder_id: WorkerName = "1"
    # Prometheus metrics (decisions, answer time) on metrics_host:metrics_port; 0 = none.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=0, ge=0, le=65_535)

    @model_validator(mode="after")
    def _needs_nats(self) -> "BrokerAccessSettings":
        if not self.nats_servers():
            raise ValueError("the auth-callout responder needs GALVANI_NATS_URLS")
        return self

    def issuer_seed_path(self) -> Path:
        """The issuer seed file."""
        return self.issuer_seed_file or self.data_dir / "secrets" / ISSUER_SEED_FILE

    def service_dir(self) -> Path:
        """The directory holding the service password file."""
        return self.broker_dir or self.data_dir / "nats"

    def client_name(self) -> str:
        """This responder's NATS connection name."""
        return f"galvani-auth-{self.responder_id}"
