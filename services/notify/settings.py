"""Notification dispatcher settings (environment prefix ``GALVANI_NOTIFY_``)."""

from pathlib import Path
from typing import Self
from urllib.parse import urlsplit

from pydantic import SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.outbound_urls import OutboundPolicy
from services.common.secret_box import KEY_FILE
from services.common.settings import Environment, refuse_default_secrets


class NotifySettings(BaseSettings):
    """The database (as galvani_notify), the channel-secret key, and the delivery policy."""

    model_config = SettingsConfigDict(env_prefix="GALVANI_NOTIFY_", extra="ignore")

    environment: Environment = Environment.DEVELOPMENT
    database_url: SecretStr
    # The channel secrets' Fernet key, shared with the API: ``secret_key_file``, by default
    # ``<data_dir>/secrets/notify-secret-key`` (services/common/secret_box.py).
    data_dir: Path = Path(".galvani")
    secret_key_file: Path | None = None
    # Deliveries in flight in this process (the thread pool's size); each channel's own
    # ``max_concurrency`` bounds it further per channel.
    workers: int = 32
    # A new outbox row wakes the dispatcher at once (LISTEN galvani_notifications); the queue
    # is also polled this often, for retries coming due and a missed wake-up.
    poll_interval_s: float = 0.5
    request_timeout_s: float = 10.0
    # A claimed row is leased for this long: if its process dies before recording the outcome,
    # another dispatcher sends it again (same idempotency key) once the lease ends.
    lease_s: float = 60.0
    # Retries: full jitter, uniform in [0, min(backoff_max_s, backoff_base_s * 2^(attempt-1))].
    # The cap bounds how long a receiver that comes back waits for its backlog: 60 s, not the
    # 300 s this had (tests/test_notify_outage_long.py measured 243-261 s after a 10-minute
    # outage with 300). Only each alert's first undelivered row is retried, so a receiver that
    # is down sees about one request per alert every 30 s.
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    # A notification still undelivered this long after it was written is marked failed.
    give_up_after_s: float = 24 * 3600.0
    # Off by default: loopback and private ranges, and plain http, are refused at send time
    # (a brand must not aim the dispatcher at internal services); the same switches as the
    # API's (services/common/outbound_urls.py). Tests with a local receiver turn both on.
    allow_private_targets: bool = False
    allow_http_targets: bool = False
    # The dashboard's base URL (``make run``: ``<api_url>/dashboard/``): every notification
    # links to ``<dashboard_url>#/alerts/<id>``. Unset: no link.
    dashboard_url: str | None = None
    # E-mail channels: the operator's SMTP server (submission, port 587). Unset: e-mail
    # notifications fail with "no SMTP server configured" (retried until give-up, visible).
    smtp_host: str | None = None
    smtp_port: int = 587
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_from: str | None = None
    # Required by default: a server that does not offer STARTTLS is refused (nothing sent in
    # clear); the certificate is verified for smtp_host, against smtp_ca_file when set (a
    # private CA), else the system's CAs.
    smtp_starttls: bool = True
    smtp_ca_file: Path | None = None
    # Per network operation (connect, each command); keep a few of them within lease_s.
    smtp_timeout_s: float = 10.0
    # Where the metrics endpoint listens (0.0.0.0 in a pod, so Prometheus and probes reach it).
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0
    # Queue depth and oldest pending age are read from the database this often.
    queue_stats_interval_s: float = 5.0
    log_level: str = "INFO"

    def secret_key_path(self) -> Path:
        """The Fernet key file that decrypts the channels' HMAC secrets."""
        return self.secret_key_file or self.data_dir / "secrets" / KEY_FILE

    def outbound_policy(self) -> OutboundPolicy:
        """Which targets beyond public https ones the operator allows."""
        return OutboundPolicy(
            allow_private=self.allow_private_targets, allow_http=self.allow_http_targets
        )

    @model_validator(mode="after")
    def _check(self) -> Self:
        refuse_default_secrets(self.environment, self.database_url, None)
        if self.lease_s <= self.request_timeout_s:
            raise ValueError("lease_s must be longer than request_timeout_s")
        if self.workers < 1:
            raise ValueError("workers must be at least 1")
        if self.dashboard_url is not None:
            parts = urlsplit(self.dashboard_url)
            if parts.scheme not in ("https", "http") or not parts.netloc or parts.fragment:
                raise ValueError(
                    "dashboard_url must be an http(s) URL without a fragment, e.g. "
                    "https://galvani.example.com/dashboard/"
                )
        if self.smtp_host:
            if not self.smtp_from or "@" not in self.smtp_from:
                raise ValueError("smtp_from (an e-mail address) is required with smtp_host")
            if self.smtp_username and self.smtp_password is None:
                raise ValueError("smtp_password is required with smtp_username")
            if self.smtp_username and not self.smtp_starttls:
                raise ValueError(
                    "smtp_username without smtp_starttls would send the SMTP password in clear"
                )
        return self
