"""``make bench-ingest-floor``: the CPU per sample of the parts ingest cannot do without.

Issue 3 asks for ingest plus database CPU of at most 12 µs per stored sample. This measures
the client-side pieces that every message costs, in isolation, on the benchmark's own
message (10 samples, about 2 KB):

1. **receiving and acknowledging** one QoS 1 PUBLISH, after commit, in batches of 500:
   ingest's own subscriber (``services.common.subscriber``) against a scripted broker on a
   loopback port, and for comparison paho-mqtt 2.x with ``manual_ack``, which ingest used
   before. The packets are pre-encoded, so no broker CPU is counted, and the CPU is the
   reading thread's own (``time.thread_time``). The subscriber is measured twice: on plain
   TCP and over TLS (TLS 1.3 with a P-256 certificate of a CA made for the run, the
   connection the workers have in production), where its CPU includes decrypting what it
   reads and encrypting its PUBACKs;
2. **decoding and validating** the payload into rows: ingest's own ``decode_inbound`` (the
   msgspec fast path).

The database side of the floor is the raw binary COPY of the same rows, which
``make bench-ingest`` prints as its ``copy ceiling`` line (PostgreSQL CPU per row). The last
line is::

    subscriber_us_per_sample=N paho_us_per_sample=N decode_us_per_sample=N
    client_floor_us_per_sample=N subscriber_tls_us_per_sample=N

(one line), where ``client_floor`` is the (plain TCP) subscriber's and decoding's. The paho
harness sets two private attributes of ``paho.mqtt.client.Client`` (its socket and connection
state) so that it reads without a broker; it is a measuring tool, not code the services run.
"""

import json
import socket
import ssl
import struct
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bench.harness import say
from bench.mqtt_load import SAMPLE_FIELDS, SAMPLE_SPACING_MS
from deploy.stack.ports import LOOPBACK
from services.common import pki
from services.common.mqtt5 import varint
from services.common.subscriber import Inbound, Subscriber, SubscriberConfig
from services.common.tls import client_context, server_context
from services.ingest.decode import decode_inbound

MESSAGES: Final = 50_000
SAMPLES: Final = 10
TOPIC: Final = "galvani/v1/d/bench-00001/telemetry"
FEED_CHUNK: Final = 100
BATCH: Final = 500
# CONNACK (no session, success, no properties) and SUBACK (packet id 1, QoS 1 granted).
CONNACK: Final = b"\x20\x03\x00\x00\x00"
SUBACK: Final = b"\x90\x04\x00\x01\x00\x01"


def payload(seq: int) -> bytes:
    """The benchmark's telemetry message (bench/mqtt_load.py's sample fields)."""
    samples = [
        {"ts": 1_764_000_000_000 + seq * 1000 + i * SAMPLE_SPACING_MS, **SAMPLE_FIELDS}
        for i in range(SAMPLES)
    ]
    return json.dumps({"v": 1, "seq": seq, "session": "s-1", "samples": samples}).encode()


def publish_packet(packet_id: int, body: bytes) -> bytes:
    """An MQTT 5 PUBLISH at QoS 1 with no properties."""
    topic = TOPIC.encode()
    rest = struct.pack("!H", len(topic)) + topic + struct.pack("!H", packet_id) + b"\x00" + body
    return b"\x32" + varint(len(rest)) + rest


def paho_us_per_message() -> float:
    """paho's CPU to read, dispatch and acknowledge one message."""
    reader, feeder = socket.socketpair()
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id="floor", protocol=paho.MQTTv5, manual_ack=True
    )
    received = 0

    def on_message(c: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        nonlocal received
        received += 1
        c.ack(message.mid, message.qos)

    client.on_message = on_message
    # The harness (see the module docstring) reads without a broker.
    client._sock = reader  # type: ignore[assignment]
    client._state = paho._ConnectionState.MQTT_CS_CONNECTED
    reader.setblocking(False)
    packets = [publish_packet(i % 65_535 + 1, payload(i)) for i in range(MESSAGES)]

    def feed() -> None:
        for i in range(0, MESSAGES, FEED_CHUNK):
            feeder.sendall(b"".join(packets[i : i + FEED_CHUNK]))

    def drain() -> None:  # the PUBACKs, 4 bytes each
        left = 4 * MESSAGES
        while left > 0:
            left -= len(feeder.recv(65_536))

    threads = [threading.Thread(target=feed), threading.Thread(target=drain)]
    for thread in threads:
        thread.start()
    started = time.thread_time()
    while received < MESSAGES:
        client.loop_read()
        client.loop_write()
    spent = time.thread_time() - started
    for thread in threads:
        thread.join()
    reader.close()
    feeder.close()
    return spent / MESSAGES * 1e6


def _read_exactly(conn: socket.socket, size: int) -> None:
    while size > 0:
        size -= len(conn.recv(min(size, 65_536)))


def tls_contexts(directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A client context and a server context whose certificate it verifies."""
    authority = pki.Authority.create("ingest-floor CA")
    certificate, key = authority.issue_server()
    pki.write_file(directory / "ca.pem", pki.pem(authority.certificate), mode=0o600)
    pki.write_file(directory / "server.pem", pki.pem(certificate), mode=0o600)
    pki.write_file(directory / "server.key", pki.private_pem(key), mode=0o600)
    return (
        client_context(directory / "ca.pem"),
        server_context(directory / "server.pem", directory / "server.key"),
    )


def subscriber_us_per_message(contexts: tuple[ssl.SSLContext, ssl.SSLContext] | None) -> float:
    """ingest's subscriber: read, take a batch, acknowledge it (as after a commit); over TLS
    with ``contexts`` (the client's and the scripted broker's)."""
    listener = socket.create_server((LOOPBACK, 0))
    subscriber = Subscriber(
        SubscriberConfig(
            host=LOOPBACK,
            port=listener.getsockname()[1],
            username="floor",
            password="floor",  # noqa: S106 (the scripted broker checks nothing)
            client_id="floor",
            topic_filters=(TOPIC,),
            receive_maximum=2 * BATCH,
            session_expiry_s=3600,
            tls=None if contexts is None else contexts[0],
        )
    )
    if contexts is None:
        subscriber.poll(0)  # connects: the kernel completes the handshake from the backlog
        broker, _ = listener.accept()
    else:
        # The subscriber's TLS handshake blocks in poll: the broker's side runs meanwhile.
        accepted: list[ssl.SSLSocket] = []
        server = contexts[1]
        handshake = threading.Thread(
            target=lambda: accepted.append(server.wrap_socket(listener.accept()[0], True))
        )
        handshake.start()
        subscriber.poll(0)
        handshake.join()
        broker = accepted[0]
    packets = [publish_packet(i % 65_535 + 1, payload(i)) for i in range(MESSAGES)]

    def play_broker() -> None:
        broker.recv(65_536)  # CONNECT
        broker.sendall(CONNACK)
        broker.recv(65_536)  # SUBSCRIBE
        broker.sendall(SUBACK)
        for i in range(0, MESSAGES, FEED_CHUNK):
            broker.sendall(b"".join(packets[i : i + FEED_CHUNK]))

    def drain() -> None:  # the PUBACKs, 4 bytes each
        _read_exactly(broker, 4 * MESSAGES)

    feeder = threading.Thread(target=play_broker)
    feeder.start()
    while not subscriber.connected:
        subscriber.poll(0.1)
    drainer = threading.Thread(target=drain)
    drainer.start()
    acked = 0
    started = time.thread_time()
    while acked < MESSAGES:
        subscriber.poll(0.1)
        if len(subscriber.pending) >= BATCH or acked + len(subscriber.pending) == MESSAGES:
            acked += subscriber.ack(subscriber.take(BATCH))
    spent = time.thread_time() - started
    feeder.join()
    drainer.join()
    subscriber.close()
    broker.close()
    listener.close()
    return spent / MESSAGES * 1e6


def decode_us_per_message() -> float:
    """ingest's decode and validation of one message into rows."""
    now = datetime.now(UTC)
    inbound = [
        Inbound(TOPIC, payload(i), mid=i + 1, qos=1, received_at=now, generation=1)
        for i in range(MESSAGES)
    ]
    started = time.process_time()
    for message in inbound:
        decode_inbound(message)
    return (time.process_time() - started) / MESSAGES * 1e6


def main() -> int:
    subscriber_us = subscriber_us_per_message(None)
    with tempfile.TemporaryDirectory(prefix="galvani-floor-") as directory:
        subscriber_tls_us = subscriber_us_per_message(tls_contexts(Path(directory)))
    paho_us = paho_us_per_message()
    decode_us = decode_us_per_message()
    say(f"subscriber receive+ack: {subscriber_us:.1f} us per message of {SAMPLES} samples")
    say(
        f"subscriber receive+ack over TLS: {subscriber_tls_us:.1f} us per message of "
        f"{SAMPLES} samples ({subscriber_tls_us / subscriber_us:.2f} times plain TCP's)"
    )
    say(f"paho receive+ack: {paho_us:.1f} us per message of {SAMPLES} samples")
    say(f"decode+validate: {decode_us:.1f} us per message of {SAMPLES} samples")
    say(
        f"subscriber_us_per_sample={subscriber_us / SAMPLES:.2f} "
        f"paho_us_per_sample={paho_us / SAMPLES:.1f} "
        f"decode_us_per_sample={decode_us / SAMPLES:.1f} "
        f"client_floor_us_per_sample={(subscriber_us + decode_us) / SAMPLES:.1f} "
        f"subscriber_tls_us_per_sample={subscriber_tls_us / SAMPLES:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
