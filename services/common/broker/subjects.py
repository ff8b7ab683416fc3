"""Device traffic on NATS: subjects, the JetStream stream that keeps it, the workers'
consumers, and their idempotent creation through the JetStream API.

NATS's MQTT gateway publishes an MQTT message on the subject its topic names, with ``/``
turned into ``.`` (and a ``.`` inside a level into ``//``), so a device's
``galvani/v1/d/<id>/telemetry`` is ``galvani.v1.d.<id>.telemetry`` (device ids hold no dots).
The stream ``GALVANI_DEVICES`` captures the four device channels; its interest retention keeps
a message until every consumer (``ingest``, ``rules``) has acknowledged it, so each worker
group sees every message, once per group, as a ``$share`` group does on Mosquitto. A message
published while neither consumer exists is not kept: the workers create the stream and their
consumer when they connect, before devices are let in by a fresh installation.

Creation is idempotent: STREAM.INFO, and STREAM.CREATE only when it is missing (a racing
worker's identical CREATE is accepted by the server); CONSUMER.CREATE with the "create or
update" action, which answers an identical config with the existing consumer.
"""

import json
import logging
from typing import Any, Final

from services.common.broker.nats_client import NatsClient, NatsError
from services.common.protocol.topics import DEVICE_CHANNELS

log = logging.getLogger(__name__)

STREAM: Final = "GALVANI_DEVICES"
DEVICE_SUBJECT_ROOT: Final = "galvani.v1.d"
STREAM_SUBJECTS: Final = tuple(f"{DEVICE_SUBJECT_ROOT}.*.{channel}" for channel in DEVICE_CHANNELS)
# One replica per node of a 3-node cluster: a message survives the loss of any one node.
CLUSTER_REPLICAS: Final = 3
ACK_WAIT_S: Final = 30.0
# The most messages delivered and not acknowledged across all the workers of one consumer:
# above workers x receive_maximum (64 ingest workers at 4,000), so that it never, rather
# than the workers' own windows, is what holds delivery back.
MAX_ACK_PENDING: Final = 262_144
# Pull requests waiting at once per consumer (the server's default is 512); each worker keeps
# at most two open.
MAX_WAITING: Final = 512
API_TIMEOUT_S: Final = 5.0
NS_PER_S: Final = 1_000_000_000
# JetStream API error codes (server/errors.json).
STREAM_NOT_FOUND: Final = 10059
STREAM_NAME_IN_USE: Final = 10058
CONSUMER_NOT_FOUND: Final = 10014


class JetStreamError(NatsError):
    """The JetStream API refused a request, or did not answer it."""

    def __init__(self, what: str, code: int = 0) -> None:
        super().__init__(what)
        self.code = code


def topic_to_subject(topic: str) -> str:
    """The NATS subject of an MQTT topic, as NATS's MQTT gateway maps it."""
    return ".".join(level.replace(".", "//") for level in topic.split("/"))


def subject_to_topic(subject: str) -> str:
    """The MQTT topic of a NATS subject (the inverse of :func:`topic_to_subject`)."""
    if "//" not in subject:
        return subject.replace(".", "/")
    return ".".join(part.replace(".", "/") for part in subject.split("//"))


def replicas_for(info: dict[str, Any]) -> int:
    """The stream's replica count on the server that sent ``info``: CLUSTER_REPLICAS in a
    cluster, 1 on a lone server (which cannot hold more)."""
    return CLUSTER_REPLICAS if info.get("cluster") else 1


def stream_config(replicas: int) -> dict[str, Any]:
    """The configuration of GALVANI_DEVICES: file storage, interest retention, discard new."""
    return {
        "name": STREAM,
        "subjects": list(STREAM_SUBJECTS),
        "retention": "interest",
        "storage": "file",
        "num_replicas": replicas,
        "discard": "new",
        "max_msgs": -1,
        "max_bytes": -1,
        "max_age": 0,
        "max_msg_size": -1,
        "max_consumers": -1,
        "allow_direct": False,
    }


def consumer_config(durable: str, *, ack_wait_s: float = ACK_WAIT_S) -> dict[str, Any]:
    """A worker group's durable pull consumer: every message of the stream, acknowledged one by
    one after commit, redelivered after ``ack_wait_s`` without an ack, without a limit."""
    return {
        "durable_name": durable,
        "name": durable,
        "deliver_policy": "all",
        "ack_policy": "explicit",
        "ack_wait": int(ack_wait_s * NS_PER_S),
        "max_deliver": -1,
        "replay_policy": "instant",
        "max_ack_pending": MAX_ACK_PENDING,
        "max_waiting": MAX_WAITING,
    }


def api(client: NatsClient, subject: str, body: dict[str, Any] | None) -> dict[str, Any]:
    """One JetStream API request and its answer; JetStreamError when it carries an error or
    none comes (503: JetStream is not enabled for the account, or not reachable)."""
    payload = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
    try:
        answer = client.request(subject, payload, API_TIMEOUT_S)
    except TimeoutError as exc:
        raise JetStreamError(f"{subject}: {exc}") from None
    if answer.status == 503:
        raise JetStreamError(f"{subject}: no responders (JetStream unavailable)", 503)
    reply: dict[str, Any] = json.loads(answer.payload)
    error = reply.get("error")
    if error:
        raise JetStreamError(
            f"{subject}: {error.get('description', error)}", int(error.get("err_code", 0))
        )
    return reply


def ensure_stream(client: NatsClient, *, replicas: int | None = None) -> bool:
    """Create GALVANI_DEVICES unless it exists; whether this call created it."""
    try:
        api(client, f"$JS.API.STREAM.INFO.{STREAM}", None)
    except JetStreamError as exc:
        if exc.code != STREAM_NOT_FOUND:
            raise
    else:
        return False
    count = replicas_for(client.info) if replicas is None else replicas
    try:
        api(client, f"$JS.API.STREAM.CREATE.{STREAM}", stream_config(count))
    except JetStreamError as exc:
        if exc.code != STREAM_NAME_IN_USE:
            raise
        return False  # another worker made it between our INFO and CREATE
    log.info("created stream %s (%d replicas)", STREAM, count)
    return True


def ensure_consumer(client: NatsClient, durable: str, *, ack_wait_s: float = ACK_WAIT_S) -> bool:
    """Create (or bring up to date) the durable pull consumer ``durable``; whether it was
    missing before."""
    config = consumer_config(durable, ack_wait_s=ack_wait_s)
    existed = True
    try:
        api(client, f"$JS.API.CONSUMER.INFO.{STREAM}.{durable}", None)
    except JetStreamError as exc:
        if exc.code != CONSUMER_NOT_FOUND:
            raise
        existed = False
    api(
        client,
        f"$JS.API.CONSUMER.CREATE.{STREAM}.{durable}",
        {"stream_name": STREAM, "config": config},
    )
    if not existed:
        log.info("created consumer %s on %s", durable, STREAM)
    return not existed


def next_subject(durable: str) -> str:
    """Where a pull request for ``durable``'s next messages goes."""
    return f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{durable}"
