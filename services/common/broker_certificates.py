"""Revoking a device that connects with a certificate: the broker refuses its next
handshakes, and its live connection is ended.

A revocation list refuses new connections only: OpenSSL checks it during a handshake, and an
established TLS session is never checked again. Mosquitto does not drop certificate sessions
on SIGHUP either (the password-file reload only drops logins whose password is gone). What
ends a live session is MQTT's session takeover (MQTT 5.0, 3.1.4-3): a CONNECT with the same
client id makes the broker close the existing connection ("already connected, closing old
connection"). Mosquitto keys sessions by client id across listeners, and on the certificate
listener the client id is the certificate's CN, the device id; so a backend account on the
service listener connecting as that client id ends the device's connection, whichever
listener it is on, and then disconnects with a session expiry of 0, discarding the session.

A broker that speaks only MQTT 3.1.1 (NATS's MQTT gateway, whose client-id registry spans the
cluster) takes over the same way (3.1.1, 3.1.4-2): the CONNECT asks for a clean session, which
the broker discards when the takeover client disconnects (3.1.2.4).
"""

import datetime as dt
import logging
import socket
import ssl
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from services.common import mqtt5, mqtt311
from services.common.pki import Authority, TrustDirectory

log = logging.getLogger(__name__)

TAKEOVER_TIMEOUT_S: Final = 5.0
# The takeover client reads nothing past its CONNACK: one message in flight, packets of any
# size the broker would let a device receive.
_RECEIVE_MAXIMUM: Final = 1
_MAXIMUM_PACKET_SIZE: Final = 256 * 1024


def revoke_certificates(
    trust_dir: Path, authority: Authority, revoked: Iterable[tuple[int, dt.datetime]]
) -> Path:
    """Publish ``authority``'s revocation list naming every (serial, revoked at) of
    ``revoked`` (all of the authority's revoked certificates, not only new ones: the list
    replaces the previous one) into the broker's trust directory; the file written."""
    return TrustDirectory(trust_dir).publish_revocations(authority, revoked)


def end_device_session(
    host: str,
    port: int,
    username: str,
    password: str,
    tls_context: ssl.SSLContext | None,
    device_id: str,
    timeout_s: float = TAKEOVER_TIMEOUT_S,
    protocol: int = 5,
) -> bool:
    """End ``device_id``'s connection to the broker, if it has one, by session takeover on
    the service listener (``host``:``port``, a backend account); whether the broker accepted
    the takeover (it then has closed the device's connection and discarded its session).
    ``protocol`` is the CONNECT's protocol level: 5, or 4 for a broker that speaks only MQTT
    3.1.1 (``ServiceSettings.mqtt_protocol()``).

    Safe to call when the device is not connected: the broker then accepts a new session
    that ends at once.
    """
    deadline = time.monotonic() + timeout_s
    keepalive_s = max(1, int(timeout_s))
    if protocol == mqtt311.PROTOCOL_LEVEL:
        connect = mqtt311.connect(
            device_id, username, password, keepalive_s=keepalive_s, clean_session=True
        )
    else:
        connect = mqtt5.connect(
            device_id,
            username,
            password,
            keepalive_s=keepalive_s,
            session_expiry_s=0,
            receive_maximum=_RECEIVE_MAXIMUM,
            maximum_packet_size=_MAXIMUM_PACKET_SIZE,
        )
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw:
            sock: socket.socket = raw
            if tls_context is not None:
                sock = tls_context.wrap_socket(raw, server_hostname=host)
            with sock:
                sock.sendall(connect)
                kind, body = _read_packet(sock, deadline)
                if kind != mqtt5.PacketType.CONNACK:
                    log.warning(
                        "session takeover of %s: the broker sent packet %d", device_id, kind
                    )
                    return False
                refusal = _refusal(body, protocol)
                if refusal is not None:
                    log.warning("session takeover of %s refused: %s", device_id, refusal)
                    return False
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                sock.sendall(mqtt5.disconnect(mqtt5.NORMAL_DISCONNECTION))  # 3.1.1's as well
                return True
    except (OSError, mqtt5.ProtocolViolation) as exc:
        log.warning("session takeover of %s failed: %s", device_id, exc)
        return False


def _refusal(connack: bytes, protocol: int) -> str | None:
    """Why the broker refused the connection, as the standard names it; None if it accepted."""
    if protocol == mqtt311.PROTOCOL_LEVEL:
        code = mqtt311.read_connack(connack).return_code
        return None if code == mqtt311.ACCEPTED else mqtt311.return_code_name(code)
    reason = mqtt5.read_connack(connack).reason
    return None if reason == 0 else mqtt5.reason_name(reason)


def _read_packet(sock: socket.socket, deadline: float) -> tuple[int, bytes]:
    """The next packet's type and body (after its fixed header)."""
    first = _read_exactly(sock, 1, deadline)[0]
    length = 0
    for shift in range(0, 28, 7):
        byte = _read_exactly(sock, 1, deadline)[0]
        length |= (byte & 0x7F) << shift
        if byte < 0x80:
            break
    else:
        raise mqtt5.ProtocolViolation("remaining length longer than 4 bytes")
    return first >> 4, _read_exactly(sock, length, deadline)


def _read_exactly(sock: socket.socket, size: int, deadline: float) -> bytes:
    data = bytearray()
    while len(data) < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no answer from the broker")
        sock.settimeout(remaining)
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the broker closed the connection")
        data += chunk
    return bytes(data)
