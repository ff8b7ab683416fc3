"""Settings shared by every service; each service subclasses with its own env prefix."""

import ssl
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, ClassVar, Self

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.broker import BrokerKind
from services.common.tls import client_context

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = REPO_ROOT / ".galvani"

# Values that must never reach a running system outside development.
KNOWN_DEFAULT_SECRETS = frozenset({"", "changeme", "password", "postgres", "secret", "galvani"})

WEEK_S = 7 * 24 * 3600

# The types of the worker settings whose defaults each service sets for itself.
WorkerName = Annotated[str, Field(pattern=r"^[a-z0-9-]{1,32}$")]
FlushIntervalS = Annotated[float, Field(gt=0, le=5)]
ReceiveMaximum = Annotated[int, Field(ge=1, le=65_535)]


class Environment(StrEnum):
    """Where a service runs; anything but development refuses default secrets."""

    DEVELOPMENT = "development"
    PRODUCTION = "production"


def refuse_default_secrets(
    environment: Environment, database_url: SecretStr, mqtt_password: SecretStr | None
) -> None:
    """Raise ValueError outside development if a secret is empty or a well-known default."""
    if environment is Environment.DEVELOPMENT:
        return
    if mqtt_password is not None and mqtt_password.get_secret_value() in KNOWN_DEFAULT_SECRETS:
        raise ValueError("mqtt_password is empty or a well-known default")
    if any(f":{word}@" in database_url.get_secret_value() for word in KNOWN_DEFAULT_SECRETS):
        raise ValueError("database_url carries an empty or well-known default password")


def refuse_plaintext(environment: Environment, mqtt_tls: bool) -> None:
    """Raise ValueError outside development if the broker connection is not TLS."""
    if environment is not Environment.DEVELOPMENT and not mqtt_tls:
        raise ValueError(
            "mqtt_tls is off: outside development every broker connection is TLS with "
            "verification on (unset GALVANI_MQTT_TLS, or set it to 1)"
        )


NATS_SCHEMES = ("nats://", "tls://")


def split_nats_urls(urls: str) -> list[str]:
    """The comma-separated NATS server URLs, each ``nats://host:port`` or ``tls://host:port``."""
    servers = [url.strip() for url in urls.split(",") if url.strip()]
    for url in servers:
        if not url.startswith(NATS_SCHEMES) or ":" not in url.split("://", 1)[1]:
            raise ValueError(f"nats_urls: {url!r} is not nats://host:port or tls://host:port")
    return servers


def split_addresses(nodes: str) -> list[tuple[str, int]]:
    """The comma-separated ``host:port`` pairs of ``mqtt_nodes``."""
    addresses = []
    for node in (part.strip() for part in nodes.split(",")):
        if not node:
            continue
        host, _, port = node.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65_536:
            raise ValueError(f"mqtt_nodes: {node!r} is not host:port")
        addresses.append((host, int(port)))
    return addresses


def check_broker(
    environment: Environment, broker: BrokerKind, nats_urls: str, *, tls: bool
) -> None:
    """Raise ValueError if the NATS settings cannot work, or are plaintext outside development.

    NATS connections take their TLS from the broker's (``mqtt_tls``, ``mqtt_ca_file``)."""
    servers = split_nats_urls(nats_urls)
    if broker is not BrokerKind.NATS:
        return
    if not servers:
        raise ValueError("broker is nats but nats_urls is empty (set GALVANI_NATS_URLS)")
    if not tls and any(url.startswith("tls://") for url in servers):
        raise ValueError("nats_urls names tls:// servers but mqtt_tls is off")
    if environment is not Environment.DEVELOPMENT and any(
        not url.startswith("tls://") for url in servers
    ):
        raise ValueError("outside development every NATS server URL is tls://")


class ServiceSettings(BaseSettings):
    """Connection settings every service has (database, broker, data directory).

    Subclasses set ``model_config = SettingsConfigDict(env_prefix="GALVANI_<SERVICE>_")``.
    """

    model_config = SettingsConfigDict(env_prefix="GALVANI_", extra="ignore")

    environment: Environment = Environment.DEVELOPMENT
    # The service's own login role (services/common/migrations/grants.py; `make run` passes
    # run.json's database_urls entry), never the migration role that owns the schema.
    database_url: SecretStr
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 8885
    mqtt_username: str
    mqtt_password: SecretStr
    # TLS to the broker, verifying its certificate and host name against ``mqtt_ca_file``
    # (the system's trust store when unset; `make run` passes run.json's ca_file). Off only in
    # development, for a broker listener without TLS.
    mqtt_tls: bool = True
    mqtt_ca_file: Path | None = None
    data_dir: Path = DEFAULT_DATA_DIR
    log_level: str = "INFO"
    # The engine: one Mosquitto (MQTT 5), or a NATS cluster whose MQTT gateway speaks 3.1.1
    # only and whose workers consume JetStream over the NATS protocol at ``nats_urls``.
    # Installation-wide, so read from GALVANI_BROKER (and GALVANI_NATS_URLS,
    # GALVANI_MQTT_NODES) whatever the service's own prefix.
    broker: BrokerKind = Field(
        default=BrokerKind.MOSQUITTO, validation_alias=AliasChoices("GALVANI_BROKER", "broker")
    )
    nats_urls: str = Field(
        default="", validation_alias=AliasChoices("GALVANI_NATS_URLS", "nats_urls")
    )
    # The backend MQTT clients' failover list, "host:port,host:port"; empty = mqtt_host:mqtt_port.
    mqtt_nodes: str = Field(
        default="", validation_alias=AliasChoices("GALVANI_MQTT_NODES", "mqtt_nodes")
    )

    @model_validator(mode="after")
    def _refuse_insecure(self) -> Self:
        refuse_default_secrets(self.environment, self.database_url, self.mqtt_password)
        refuse_plaintext(self.environment, self.mqtt_tls)
        check_broker(self.environment, self.broker, self.nats_urls, tls=self.mqtt_tls)
        split_addresses(self.mqtt_nodes)
        return self

    def mqtt_protocol(self) -> int:
        """The MQTT version of the backend's MQTT clients: 4 (3.1.1) on NATS, else 5."""
        return 4 if self.broker is BrokerKind.NATS else 5

    def mqtt_addresses(self) -> list[tuple[str, int]]:
        """The broker nodes an MQTT client tries in turn (``mqtt_nodes``, else the one host)."""
        return split_addresses(self.mqtt_nodes) or [(self.mqtt_host, self.mqtt_port)]

    def nats_servers(self) -> list[str]:
        """The NATS server URLs, in the order given."""
        return split_nats_urls(self.nats_urls)

    def mqtt_tls_context(self) -> ssl.SSLContext | None:
        """The TLS context for the broker connection, None when ``mqtt_tls`` is off."""
        return client_context(self.mqtt_ca_file) if self.mqtt_tls else None


class WorkerSettings(ServiceSettings):
    """What every broker-fed worker has (services.common.worker); ingest and rules subclass it
    with their prefix and ``service`` name.

    The broker account defaults to ``galvani-<service>`` and the share group to ``<service>``;
    each subclass declares ``batch_max_messages``, ``flush_interval_s`` and
    ``receive_maximum`` with the defaults its work calls for.
    """

    # ``ingest`` or ``rules``: the middle of client ids, account names and metric names.
    service: ClassVar[str]

    # The MQTT client id is galvani-<service>-<worker_id>: a restarted worker must reuse it to
    # pick up the session (and the messages) the broker kept for it.
    worker_id: WorkerName = "1"
    share_group: WorkerName
    # A batch is handled when it holds this many messages or its oldest is this old.
    batch_max_messages: int
    flush_interval_s: FlushIntervalS
    # Unacknowledged messages the worker holds at most (sent as MQTT 5 Receive Maximum, and
    # enforced by the worker too): the bound on its memory. Below batch_max_messages, batches
    # are flushed by age only.
    receive_maximum: ReceiveMaximum
    # How long the broker keeps a stopped worker's session and queued messages.
    session_expiry_s: int = Field(default=WEEK_S, ge=3600)
    # On NATS: how long JetStream waits for a message's ack before it redelivers it to the
    # group (a worker that died holding it); a held batch is kept alive with +WPI meanwhile.
    nats_ack_wait_s: float = Field(default=30.0, ge=0.5, le=3600)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=0, ge=0, le=65_535)

    @model_validator(mode="before")
    @classmethod
    def _service_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data.setdefault("mqtt_username", f"galvani-{cls.service}")
            data.setdefault("share_group", cls.service)
        return data

    def client_id(self) -> str:
        """This worker's MQTT client id, ``galvani-<service>-<worker_id>``."""
        return f"galvani-{self.service}-{self.worker_id}"
