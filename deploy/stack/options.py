"""What ``make run`` was asked for (``GALVANI_*`` variables) and the secrets it keeps."""

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from deploy.stack.errors import SetupError
from deploy.stack.postgres import new_password
from services.common.settings import REPO_ROOT, Environment

DEFAULT_SIM_DEVICES = 50
# A live demo: sessions 50 times as often as real people start them, so the first ones come
# within minutes (each device's own limits still cap it at its mode table's daily count).
DEFAULT_SIM_ACTIVITY = 50.0
DEFAULT_INGEST_WORKERS = 2
# Like ingest: two, so the outbox is shared (claims skip each other's locked rows) from the
# start; a dispatcher that dies leaves its leased rows to the other until it is restarted.
DEFAULT_NOTIFY_DISPATCHERS = 2

Number = TypeVar("Number", int, float)


@dataclass(frozen=True)
class RunOptions:
    """What the user asked for, from the environment."""

    data_dir: Path
    sim_devices: int
    sim_activity: float
    ingest_workers: int
    api_port: int | None
    mqtt_port: int | None
    database_url: str | None
    # GALVANI_MQTT_PLAINTEXT=1: also a plaintext device listener (password auth), for a
    # development device without TLS. Refused in production.
    mqtt_plaintext: bool = False
    environment: Environment = Environment.DEVELOPMENT
    # GALVANI_API_TLS=1: the API serves HTTPS with the PKI's server certificate.
    api_tls: bool = False
    # GALVANI_NOTIFY_DISPATCHERS: notification dispatcher processes (not GALVANI_NOTIFY_WORKERS,
    # which is each dispatcher's own thread pool, services/notify/settings.py).
    notify_dispatchers: int = DEFAULT_NOTIFY_DISPATCHERS
    # GALVANI_RULES_WORKERS: rules workers to start (None: the stack's default, 1 on Mosquitto).
    rules_workers: int | None = None

    @classmethod
    def from_env(cls, env: dict[str, str]) -> "RunOptions":
        """Read ``GALVANI_*`` variables, refusing malformed values with a clear message."""
        raw_environment = env.get("GALVANI_ENVIRONMENT") or Environment.DEVELOPMENT.value
        try:
            environment = Environment(raw_environment)
        except ValueError:
            choices = ", ".join(e.value for e in Environment)
            raise SetupError(
                f"GALVANI_ENVIRONMENT={raw_environment!r} is not one of {choices}"
            ) from None
        plaintext = _flag_env(env, "GALVANI_MQTT_PLAINTEXT")
        if plaintext and environment is not Environment.DEVELOPMENT:
            raise SetupError(
                f"GALVANI_MQTT_PLAINTEXT=1 opens an unencrypted device listener and is refused"
                f" with GALVANI_ENVIRONMENT={environment.value}: unset GALVANI_MQTT_PLAINTEXT"
                " (devices connect with TLS, trusting run.json's ca_file)"
            )
        return cls(
            data_dir=Path(env.get("GALVANI_DATA_DIR", str(REPO_ROOT / ".galvani"))).resolve(),
            sim_devices=_int_env(env, "GALVANI_SIM_DEVICES", DEFAULT_SIM_DEVICES),
            sim_activity=_float_env(env, "GALVANI_SIM_ACTIVITY", DEFAULT_SIM_ACTIVITY),
            ingest_workers=max(1, _int_env(env, "GALVANI_INGEST_WORKERS", DEFAULT_INGEST_WORKERS)),
            api_port=_port_env(env, "GALVANI_API_PORT"),
            mqtt_port=_port_env(env, "GALVANI_MQTT_PORT"),
            database_url=env.get("GALVANI_DATABASE_URL") or None,
            mqtt_plaintext=plaintext,
            environment=environment,
            api_tls=_flag_env(env, "GALVANI_API_TLS"),
            notify_dispatchers=max(
                1, _int_env(env, "GALVANI_NOTIFY_DISPATCHERS", DEFAULT_NOTIFY_DISPATCHERS)
            ),
            rules_workers=(
                max(1, _int_env(env, "GALVANI_RULES_WORKERS", 1))
                if env.get("GALVANI_RULES_WORKERS")
                else None
            ),
        )


def _number_env(
    env: dict[str, str],
    name: str,
    default: Number,
    parse: Callable[[str], Number],
    *,
    kind: str,
    accept: Callable[[Number], bool],
    bound: str,
) -> Number:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = parse(raw)
    except ValueError:
        raise SetupError(f"{name}={raw!r} is not {kind}") from None
    if not accept(value):
        raise SetupError(f"{name}={raw!r} must be {bound}")
    return value


def _int_env(env: dict[str, str], name: str, default: int) -> int:
    return _number_env(
        env, name, default, int, kind="a whole number", accept=lambda v: v >= 0, bound="0 or more"
    )


def _float_env(env: dict[str, str], name: str, default: float) -> float:
    return _number_env(
        env, name, default, float, kind="a number", accept=lambda v: v > 0, bound="positive"
    )


def _flag_env(env: dict[str, str], name: str) -> bool:
    raw = env.get(name, "")
    if raw in ("", "0"):
        return False
    if raw == "1":
        return True
    raise SetupError(f"{name}={raw!r} must be 1 (on) or 0 (off)")


def _port_env(env: dict[str, str], name: str) -> int | None:
    if not env.get(name):
        return None
    port = _int_env(env, name, 0)
    if not 1 <= port <= 65535:
        raise SetupError(f"{name}={port} is not a TCP port (1-65535)")
    return port


class Secrets:
    """Generated secrets kept under ``.galvani/secrets`` (owner-only), reused across runs."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)

    def get(self, name: str) -> str:
        """The secret ``name``, created on first use."""
        path = self.directory / name
        if path.is_file():
            return path.read_text().strip()
        value = new_password()
        self.put(name, value)
        return value

    def put(self, name: str, value: str) -> None:
        """Store ``value`` as ``name``."""
        path = self.directory / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(value + "\n")

    def read(self, name: str) -> str | None:
        """The secret ``name`` if it exists."""
        path = self.directory / name
        return path.read_text().strip() if path.is_file() else None
