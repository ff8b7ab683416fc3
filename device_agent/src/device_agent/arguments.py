"""The command-line options ``galvani-agent`` and ``galvani-fleet`` share, declared once."""

import argparse
import base64
import dataclasses
import ssl
from pathlib import Path

from device_agent.link import BrokerAddress, DeleteOn

# MQTT over TLS's registered port, and plain MQTT's (a development broker's, only).
TLS_PORT = 8883
PLAINTEXT_PORT = 1883


def broker_port(port: int | None, ca_file: str | None) -> int:
    """The port asked for, or the default for the transport: TLS with a CA file."""
    if port is not None:
        return port
    return TLS_PORT if ca_file is not None else PLAINTEXT_PORT


def add_shared_arguments(parser: argparse.ArgumentParser, *, store_help: str) -> None:
    """The broker, the backend's key, the store file, when a message leaves the outbox, and
    how long to run."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help=f"the broker's port (default {TLS_PORT} with --ca-file, {PLAINTEXT_PORT} without)",
    )
    parser.add_argument(
        "--public-key",
        type=Path,
        required=True,
        help="the backend's config-signing public keys the device trusts (raw Ed25519, base64, "
        "one a line: the current key and, during a rotation, the next)",
    )
    parser.add_argument("--store", type=Path, required=True, help=store_help)
    parser.add_argument(
        "--delete-on",
        type=DeleteOn,
        choices=list(DeleteOn),
        default=DeleteOn.STORED,
        help="when a message leaves the outbox: the backend's stored-ack (default), or the "
        "broker's PUBACK for a backend that sends no stored-acks (or a broker with none "
        "behind it)",
    )
    parser.add_argument("--duration", type=float, help="stop after this many seconds")


def read_public_keys(path: Path) -> tuple[bytes, ...]:
    """The backend's raw 32-byte Ed25519 public keys the device trusts, stored base64, one a
    line (blank lines and ``#`` comments ignored): the current key, and during a rotation the
    next one, so tables signed with either verify (docs/protocol.md, "Signing keys")."""
    try:
        lines = path.read_text("ascii").splitlines()
    except (OSError, ValueError) as exc:
        raise SystemExit(f"cannot read the config public keys {path}: {exc}") from None
    keys = []
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            key = base64.b64decode(text, validate=True)
        except ValueError as exc:
            raise SystemExit(f"{path}:{number}: not base64: {exc}") from None
        if len(key) != 32:
            raise SystemExit(f"{path}:{number}: not a raw 32-byte Ed25519 public key (base64)")
        keys.append(key)
    if not keys:
        raise SystemExit(f"{path} holds no config public key")
    return tuple(keys)


def broker_address(program: str, address: BrokerAddress) -> BrokerAddress:
    """``address`` with its TLS context built (when it has a CA file), or a clear exit if a
    certificate, key or CA file cannot be read or used."""
    try:
        context = address.context()
    except (OSError, ssl.SSLError, ValueError) as exc:
        # ssl names no file in its errors: say which ones were in play.
        files = ", ".join(
            str(name) for name in (address.ca_file, address.cert_file, address.key_file) if name
        )
        raise SystemExit(f"{program}: cannot set up TLS from {files}: {exc}") from None
    return dataclasses.replace(address, tls_context=context)
