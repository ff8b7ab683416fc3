"""The command-line options ``galvani-agent`` and ``galvani-fleet`` share, declared once."""

import argparse
import base64
import dataclasses
import ssl
from pathlib import Path

from device_agent.connection import KEEPALIVE_S, MQTT_5, MQTT_311
from device_agent.link import BrokerAddress, DeleteOn

# MQTT over TLS's registered port, and plain MQTT's (a development broker's, only).
TLS_PORT = 8883
PLAINTEXT_PORT = 1883
# --mqtt-version: the CONNECT's protocol level for each.
MQTT_VERSIONS = {"5": MQTT_5, "3.1.1": MQTT_311}
DEFAULT_HOST = "127.0.0.1"


def broker_port(port: int | None, ca_file: str | None) -> int:
    """The port asked for, or the default for the transport: TLS with a CA file."""
    if port is not None:
        return port
    return TLS_PORT if ca_file is not None else PLAINTEXT_PORT


def add_shared_arguments(parser: argparse.ArgumentParser, *, store_help: str) -> None:
    """The broker, the backend's key, the store file, when a message leaves the outbox, and
    how long to run."""
    parser.add_argument("--host", help=f"the broker's host (default {DEFAULT_HOST})")
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help=f"the broker's port (default {TLS_PORT} with --ca-file, {PLAINTEXT_PORT} without)",
    )
    parser.add_argument(
        "--broker",
        action="append",
        type=_nodes,
        default=[],
        metavar="HOST[:PORT][,...]",
        help="a node of a broker cluster, instead of --host and --port; repeat it or give a "
        "comma-separated list for several: a device connects to one and, when that connection "
        "fails or ends, tries the next",
    )
    parser.add_argument(
        "--mqtt-version",
        choices=list(MQTT_VERSIONS),
        default="5",
        help="the MQTT version to speak (default 5; 3.1.1 for a broker that has only it, such "
        "as a NATS cluster's MQTT gateway)",
    )
    parser.add_argument(
        "--keepalive",
        type=int,
        default=KEEPALIVE_S,
        help=f"seconds (default {KEEPALIVE_S}): a connection that hears nothing for one to two "
        "of these is given up (and, with --broker, the next node tried)",
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


def _nodes(text: str) -> list[tuple[str, int | None]]:
    """``HOST[:PORT][,HOST[:PORT]...]``: the port None when not given."""
    nodes: list[tuple[str, int | None]] = []
    for item in text.split(","):
        host, colon, port = item.strip().rpartition(":")
        if not colon:
            host, port = port, ""
        if not host or (colon and not port.isdigit()) or (port and not 0 < int(port) < 65536):
            raise argparse.ArgumentTypeError(f"expected HOST or HOST:PORT, got {item!r}")
        nodes.append((host, int(port) if port else None))
    return nodes


def broker_nodes(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> list[tuple[str, int]]:
    """The broker nodes asked for (``--broker``, or ``--host``/``--port``), each with its port
    (the transport's default when not given), in the order given."""
    if args.broker and (args.host is not None or args.port is not None):
        parser.error("give --broker, or --host and --port, not both")
    asked = [node for group in args.broker for node in group] or [
        (args.host or DEFAULT_HOST, args.port)
    ]
    return [(host, broker_port(port, args.ca_file)) for host, port in asked]


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
