"""API service settings (environment prefix ``GALVANI_API_``)."""

from pathlib import Path
from typing import Self

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.outbound_urls import OutboundPolicy
from services.common.pki import CRL_DAYS
from services.common.secret_box import KEY_FILE
from services.common.settings import Environment, ServiceSettings


class ApiSettings(ServiceSettings):
    """What the API process needs to run."""

    model_config = SettingsConfigDict(
        env_prefix="GALVANI_API_", extra="ignore", populate_by_name=True
    )

    # Also read from GALVANI_ENVIRONMENT, the installation-wide switch.
    environment: Environment = Field(
        default=Environment.DEVELOPMENT,
        validation_alias=AliasChoices(
            "GALVANI_API_ENVIRONMENT", "GALVANI_ENVIRONMENT", "environment"
        ),
    )

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
    device_mqtt_port: int = 8883

    # The certificate listener's port, handed to devices that enrol with a certificate.
    device_cert_mqtt_port: int = 8884
    # Galvani's device CA (default ``<data_dir>/pki/device-ca.pem`` and ``device-ca.key``),
    # which signs every device certificate, and the broker's trust directory (default
    # ``<data_dir>/pki/trust``) its revocation lists are written to.
    device_ca_cert: Path | None = None
    device_ca_key: Path | None = None
    trust_dir: Path | None = None
    device_certificate_days: int = Field(default=365, ge=1, le=3650)
    # How long decommissioning waits for the broker to end a certificate device's session.
    session_end_timeout_s: float = Field(default=5.0, gt=0)
    # The device CA's revocation list is valid pki.CRL_DAYS (30) days; past its nextUpdate the
    # broker refuses every certificate device. Every ``crl_renew_interval_s`` each API process
    # looks at the newest list in the trust directory and, when it expires within
    # ``crl_renew_before_s``, publishes it again (the same revoked serials, new dates). Less
    # than a list's validity, or every look would publish one (the broker keeps each it loads).
    crl_renew_interval_s: float = Field(default=3600.0, gt=0)
    crl_renew_before_s: float = Field(default=7 * 86_400.0, ge=0, lt=CRL_DAYS * 86_400)

    # Notification channels (services/api/notification_channels). A channel's URL must be
    # https to a public address unless these allow private (loopback, RFC 1918, ULA,
    # link-local, ...) targets or plain http; the dispatcher reads the same switches
    # (GALVANI_NOTIFY_*), and the API reads those too, so one setting serves both.
    notify_allow_private_targets: bool = Field(
        default=False,
        validation_alias=AliasChoices(
            "GALVANI_API_NOTIFY_ALLOW_PRIVATE_TARGETS",
            "GALVANI_NOTIFY_ALLOW_PRIVATE_TARGETS",
            "notify_allow_private_targets",
        ),
    )
    notify_allow_http_targets: bool = Field(
        default=False,
        validation_alias=AliasChoices(
            "GALVANI_API_NOTIFY_ALLOW_HTTP_TARGETS",
            "GALVANI_NOTIFY_ALLOW_HTTP_TARGETS",
            "notify_allow_http_targets",
        ),
    )
    # Live (not deleted) notification channels per brand: the next create answers 409.
    notify_channels_per_brand: int = Field(default=50, ge=1)
    # The key channel secrets are encrypted with (default ``<data_dir>/secrets/notify-secret-key``,
    # created 0600 on first use; services/common/secret_box.py), shared with the dispatcher.
    notify_secret_key_file: Path | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "GALVANI_API_NOTIFY_SECRET_KEY_FILE",
            "GALVANI_NOTIFY_SECRET_KEY_FILE",
            "notify_secret_key_file",
        ),
    )

    # HTTPS: the API serves TLS itself with this certificate and key, or (outside
    # development) ``tls_offloaded`` says a proxy in front of it terminates TLS.
    tls: bool = False
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_offloaded: bool = False

    @model_validator(mode="after")
    def _refuse_plain_http(self) -> Self:
        if self.tls and (self.tls_cert_file is None or self.tls_key_file is None):
            raise ValueError(
                "GALVANI_API_TLS is on: set GALVANI_API_TLS_CERT_FILE and "
                "GALVANI_API_TLS_KEY_FILE to the server certificate and its key"
            )
        if (
            self.environment is not Environment.DEVELOPMENT
            and not self.tls
            and not self.tls_offloaded
        ):
            raise ValueError(
                "GALVANI_API_TLS is off: outside development the API serves HTTPS "
                "(GALVANI_API_TLS=1 with GALVANI_API_TLS_CERT_FILE and GALVANI_API_TLS_KEY_FILE),"
                " or GALVANI_API_TLS_OFFLOADED=1 says a proxy in front of it terminates TLS"
            )
        return self

    def pki_dir(self) -> Path:
        """The installation's certificates (``<data_dir>/pki``)."""
        return self.data_dir / "pki"

    def device_ca_files(self) -> tuple[Path, Path]:
        """The device CA's certificate and key."""
        return (
            self.device_ca_cert or self.pki_dir() / "device-ca.pem",
            self.device_ca_key or self.pki_dir() / "device-ca.key",
        )

    def trust_directory(self) -> Path:
        """The broker's trust directory (device CA and its revocation lists)."""
        return self.trust_dir or self.pki_dir() / "trust"

    def mosquitto_dir(self) -> Path:
        """Where the broker's auth files live (default ``<data_dir>/mosquitto``)."""
        return self.broker_dir or self.data_dir / "mosquitto"

    def notify_secret_key_path(self) -> Path:
        """The key file that encrypts notification channels' secrets."""
        return self.notify_secret_key_file or self.data_dir / "secrets" / KEY_FILE

    def outbound_policy(self) -> OutboundPolicy:
        """Which notification targets beyond public https ones the operator allows."""
        return OutboundPolicy(
            allow_private=self.notify_allow_private_targets,
            allow_http=self.notify_allow_http_targets,
        )

    def key_dir(self) -> Path:
        """Where the signing key lives."""
        return self.signing_key_dir or self.data_dir / "secrets"
