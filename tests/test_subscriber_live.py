"""The Subscriber against the real Mosquitto the suite starts, on the service listener (TLS,
verifying the broker against the suite's CA).

Byte-level behaviour is in test_subscriber.py against a scripted broker; this checks that the
same client, with the service accounts and ACLs Galvani renders, is what Mosquitto expects.
A refused subscription is tested only there: Mosquitto 2.0.11 grants a filter its ACL forbids
to read (SUBACK 0x01) and filters at delivery instead, so it never sends the refusal.
"""

import secrets
import time
from collections.abc import Callable

import pytest

from deploy.stack.mosquitto import MosquittoBroker
from services.common.broker_auth import ServiceAccount
from services.common.subscriber import Subscriber, SubscriberConfig
from tests.ingest import connect_device, provision, topic

WAIT_S = 5.0
POLL_S = 0.05


def ingest_subscriber(
    broker: MosquittoBroker, passwords: dict[ServiceAccount, str], channel: str
) -> Subscriber:
    """A subscriber on the ingest account, in a share group and client id of its own."""
    run = secrets.token_hex(4)
    return Subscriber(
        SubscriberConfig(
            host="127.0.0.1",
            port=broker.config.service_port,
            username=ServiceAccount.INGEST,
            password=passwords[ServiceAccount.INGEST],
            client_id=f"galvani-ingest-live-{run}",
            topic_filters=(f"$share/live-{run}/galvani/v1/d/+/{channel}",),
            receive_maximum=16,
            session_expiry_s=0,  # leaves no session behind in the broker the suite shares
            tls=broker.tls_context(),
        )
    )


def poll_until(sub: Subscriber, condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {WAIT_S:g} s: {what}")
        sub.poll(POLL_S)


def test_publish_from_the_ingest_account_reaches_the_device(
    broker: MosquittoBroker,
    service_passwords: dict[ServiceAccount, str],
    database_url: str,
    sync_devices,  # type: ignore[no-untyped-def]
) -> None:
    [device] = provision(database_url, 1)
    sync_devices()
    ack_topic = topic(device.device_id, "ack")
    listener = connect_device(broker.config.device_port, device)
    sub = ingest_subscriber(broker, service_passwords, "telemetry")
    try:
        assert listener.subscribe(ack_topic) == 1
        poll_until(sub, lambda: sub.connected, "the ingest account connected and subscribed")

        sub.publish(ack_topic, b'{"v":1,"seq":[[1,3]]}')
        sub.poll(POLL_S)

        received = listener.wait_for(ack_topic)
        assert received is not None, "the device heard nothing on its ack topic"
        assert received.payload == b'{"v":1,"seq":[[1,3]]}'
        assert not received.retain
        assert sub.stats.publishes_dropped == sub.stats.publishes_too_large == 0
        assert sub.stats.subscribe_failures == 0
    finally:
        sub.close()
        listener.close()
