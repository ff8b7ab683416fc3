"""Settings shared by every service; each service subclasses with its own env prefix."""

from enum import StrEnum
from pathlib import Path
from typing import Self

from pydantic import SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = REPO_ROOT / ".galvani"

# Values that must never reach a running system outside development.
KNOWN_DEFAULT_SECRETS = frozenset({"", "changeme", "password", "postgres", "secret", "galvani"})


class Environment(StrEnum):
    """Where a service runs; anything but development refuses default secrets."""

    DEVELOPMENT = "development"
    PRODUCTION = "production"


class ServiceSettings(BaseSettings):
    """Connection settings every service has (database, broker, data directory).

    Subclasses set ``model_config = SettingsConfigDict(env_prefix="GALVANI_<SERVICE>_")``.
    """

    model_config = SettingsConfigDict(env_prefix="GALVANI_", extra="ignore")

    environment: Environment = Environment.DEVELOPMENT
    database_url: SecretStr
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1884
    mqtt_username: str
    mqtt_password: SecretStr
    data_dir: Path = DEFAULT_DATA_DIR
    log_level: str = "INFO"

    @model_validator(mode="after")
    def _refuse_default_secrets(self) -> Self:
        if self.environment is Environment.DEVELOPMENT:
            return self
        if self.mqtt_password.get_secret_value() in KNOWN_DEFAULT_SECRETS:
            raise ValueError("mqtt_password is empty or a well-known default")
        if any(
            f":{word}@" in self.database_url.get_secret_value() for word in KNOWN_DEFAULT_SECRETS
        ):
            raise ValueError("database_url carries an empty or well-known default password")
        return self
