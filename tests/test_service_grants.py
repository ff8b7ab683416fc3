"""Each backend account's permissions on the NATS cluster (SERVICE_GRANTS in
services/broker_access/callout.py): the mapping itself, and, on a real 3-node cluster through
the responder, each account refused what is not its job. What each is allowed is used end to
end by the NATS acceptance tests (tests/test_acceptance_brokers.py, test_broker_access.py,
test_run_cluster.py); here only enough of it to show the refusals are not a dead login."""

import time
from pathlib import Path

import pytest

from deploy.stack.nats_cluster import NatsCluster
from deploy.stack.pki import DevelopmentPKI
from services.broker_access.callout import (
    MQTT_DELIVERY_SUBJECTS,
    SERVICE_GRANTS,
    Grant,
    service_grant,
    user_claims,
)
from services.common.broker.nats_client import ConnectionLost, NatsClient
from services.common.broker.subjects import STREAM, api, ensure_stream
from services.common.broker_auth import ServiceAccount
from services.common.tls import client_context
from tests.ingest import provision
from tests.mqtt import CONNACK_ACCEPTED, MQTT_311, MqttClient, connack_of

REFUSED = {4, 5}  # bad user name or password, not authorized (3.1.1 CONNACK)
SILENCE_S = 1.0  # how long an answer that should not come is waited for
CONSUMING = {
    f"$JS.API.STREAM.INFO.{STREAM}",
    f"$JS.API.STREAM.CREATE.{STREAM}",
    f"$JS.API.CONSUMER.INFO.{STREAM}.*",
    f"$JS.API.CONSUMER.CREATE.{STREAM}.*",
    f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.*",
    f"$JS.ACK.{STREAM}.>",
}


def _grant(account: ServiceAccount) -> Grant:
    grant = service_grant(account)
    assert grant is not None
    return grant


def test_each_account_has_only_the_subjects_of_its_job() -> None:
    assert set(SERVICE_GRANTS) == set(ServiceAccount)
    ingest, rules, api_grant = (
        _grant(a) for a in (ServiceAccount.INGEST, ServiceAccount.RULES, ServiceAccount.API)
    )
    assert ingest.publish is not None
    assert set(ingest.publish) == CONSUMING | {
        f"$JS.API.CONSUMER.DELETE.{STREAM}.*",
        "galvani.v1.d.*.ack",
    }
    assert ingest.subscribe == ("_INBOX.galvani-ingest.>",)
    assert ingest.connection_types == ("STANDARD", "MQTT")
    assert rules.publish is not None
    assert set(rules.publish) == CONSUMING | {"galvani.v1.d.*.config"}
    assert rules.subscribe == ("_INBOX.galvani-rules.>",)
    assert rules.connection_types == ("STANDARD", "MQTT")
    assert api_grant.publish == ("galvani.v1.d.*.config",)
    assert api_grant.subscribe == ()
    assert api_grant.connection_types == ("MQTT",)
    assert service_grant(ServiceAccount.MAINTENANCE) is None
    for account, grant in SERVICE_GRANTS.items():
        if grant is None:
            continue
        assert grant.name == account.value
        assert grant.publish is not None, account
        assert grant.subscribe is not None, account
        assert grant.connection_types is not None, account
        subjects = {*grant.publish, *grant.subscribe}
        everything = {">", "*", "_INBOX.*.>", "$JS.>", "$JS.API.>", MQTT_DELIVERY_SUBJECTS}
        assert not everything & subjects, account
        # No channel a device publishes on is any service's to publish or read directly: the
        # workers read them from the stream.
        for channel in ("telemetry", "events", "state", "presence"):
            assert f"galvani.v1.d.*.{channel}" not in subjects, (account, channel)


def test_each_account_is_admitted_over_its_own_protocols_only() -> None:
    """The responder checks the connection type (nats-server 2.10 does not, for a callout
    user): the workers speak NATS and MQTT, the API MQTT only."""
    for account in (ServiceAccount.INGEST, ServiceAccount.RULES):
        grant = _grant(account)
        assert grant.admits("nats")
        assert grant.admits("mqtt")
        assert not grant.admits("websocket")
        assert not grant.admits("")
    grant = _grant(ServiceAccount.API)
    assert grant.admits("mqtt")
    assert not grant.admits("nats")
    assert not grant.admits("websocket")


def test_no_subject_is_a_deny_of_everything_in_the_user_jwt() -> None:
    """No subject at all is a deny of ``>`` in the user JWT, not an empty allow list."""
    nats = user_claims(_grant(ServiceAccount.API), "U" + "A" * 55)["nats"]
    assert nats["sub"] == {"deny": [">"]}
    assert nats["pub"] == {"allow": ["galvani.v1.d.*.config"]}
    assert nats["allowed_connection_types"] == ["MQTT"]


# -- on a real cluster -------------------------------------------------------------------------


def _nats(
    cluster: NatsCluster, account: ServiceAccount, password: str, ca_file: Path
) -> NatsClient:
    client = NatsClient(
        cluster.nats_urls().split(","),
        user=account.value,
        password=password,
        tls=client_context(ca_file),
        name=f"{account.value}-grants-test",
    )
    client.connect(5.0)
    return client


def _violation(client: NatsClient) -> str:
    """The -ERR the server answered what was queued with ('' when none came): a round trip
    (a request to the stream's info, which every worker account may make) comes after it."""
    client.last_error = ""
    client.flush()
    deadline = time.monotonic() + SILENCE_S
    while not client.last_error and time.monotonic() < deadline:
        client.poll(0.1)
    return client.last_error


def _refused_publish(client: NatsClient, subject: str) -> bool:
    client.publish(subject, b"{}")
    error = _violation(client)
    return error.startswith("Permissions Violation for Publish") and subject in error


def _refused_subscribe(client: NatsClient, subject: str) -> bool:
    sid = client.subscribe(subject)
    error = _violation(client)
    client.unsubscribe(sid)
    return error.startswith("Permissions Violation for Subscription") and subject in error


def _mqtt(cluster: NatsCluster, username: str, password: str, client_id: str) -> MqttClient:
    return MqttClient(
        "127.0.0.1",
        cluster.nodes[1].mqtt_port,
        username,
        password,
        client_id=client_id,
        protocol=MQTT_311,
    )


def test_each_worker_account_is_refused_what_is_not_its_job(
    nats_broker: NatsCluster,
    database_url: str,
    service_passwords: dict[ServiceAccount, str],
    pki: DevelopmentPKI,
) -> None:
    """Over the NATS protocol: neither worker may read device channels directly, publish
    what the other publishes, nor delete or change the stream; ingest publishes acks, rules
    does not, and neither publishes configs."""
    [device] = provision(database_url, 1, prefix="grant")
    own = f"galvani.v1.d.{device.device_id}"
    forbidden_to_both = [
        f"$JS.API.STREAM.DELETE.{STREAM}",
        f"$JS.API.STREAM.UPDATE.{STREAM}",
        f"$JS.API.STREAM.PURGE.{STREAM}",
        "$JS.API.STREAM.CREATE.OTHER",
        f"$JS.API.STREAM.MSG.GET.{STREAM}",
        "$JS.API.STREAM.LIST",
        f"{own}.telemetry",  # a forged device message
        f"{own}.presence",
        "$MQTT.sub.anything",
        "_INBOX.anything",
    ]
    for account, refused_too, others_replies in (
        (ServiceAccount.INGEST, [f"{own}.config"], "_INBOX.galvani-rules.>"),
        (
            ServiceAccount.RULES,
            [f"{own}.ack", f"$JS.API.CONSUMER.DELETE.{STREAM}.ingest"],
            "_INBOX.galvani-ingest.>",
        ),
    ):
        client = _nats(nats_broker, account, service_passwords[account], pki.ca_file)
        try:
            # Allowed: the stream's info (its API answers), and no violation follows.
            ensure_stream(client)
            assert api(client, f"$JS.API.STREAM.INFO.{STREAM}", None)["config"]["name"] == STREAM
            assert _violation(client) == ""
            for subject in forbidden_to_both + refused_too:
                assert _refused_publish(client, subject), (account, subject)
            for subject in (
                f"{own}.telemetry",
                "galvani.v1.d.>",
                ">",
                "$JS.>",
                "$MQTT.sub.*",
                "_INBOX.>",
                others_replies,
            ):
                assert _refused_subscribe(client, subject), (account, subject)
        finally:
            client.close()
    ingest = _nats(
        nats_broker, ServiceAccount.INGEST, service_passwords[ServiceAccount.INGEST], pki.ca_file
    )
    try:
        ingest.publish(f"{own}.ack", b"{}")
        assert _violation(ingest) == ""
    finally:
        ingest.close()


def test_the_api_publishes_configs_over_mqtt_and_nothing_else(
    nats_broker: NatsCluster,
    database_url: str,
    service_passwords: dict[ServiceAccount, str],
    pki: DevelopmentPKI,
) -> None:
    """The API speaks MQTT only (a NATS login is refused, so it can neither pull from the
    workers' consumers nor touch the stream), reads no device channel, and what it publishes
    outside ``config`` never reaches the device."""
    [device] = provision(database_url, 1, prefix="gapi")
    password = service_passwords[ServiceAccount.API]
    with pytest.raises(ConnectionLost, match="uthoriz"):
        _nats(nats_broker, ServiceAccount.API, password, pki.ca_file)
    receiver = MqttClient(
        "127.0.0.1",
        nats_broker.nodes[0].mqtt_port,
        device.device_id,
        device.password,
        client_id=device.device_id,
        protocol=MQTT_311,
    ).connect()
    publisher = _mqtt(nats_broker, ServiceAccount.API.value, password, "galvani-api-grants")
    publisher.connect()
    try:
        ack = f"galvani/v1/d/{device.device_id}/ack"
        config = f"galvani/v1/d/{device.device_id}/config"
        assert receiver.subscribe(ack) == 1
        assert receiver.subscribe(config) == 1
        for channel in ("telemetry", "state", "presence", "config", "ack"):
            assert publisher.subscribe(f"galvani/v1/d/+/{channel}") == 0x80, channel
        publisher.publish(ack, b"forged ack")  # the gateway acknowledges what it drops
        publisher.publish(config, b"table")
        assert receiver.wait_for(config) is not None
        assert receiver.wait_for(ack, timeout_s=SILENCE_S) is None
    finally:
        publisher.close()
        receiver.close()


def test_maintenance_is_refused_by_the_cluster(
    nats_broker: NatsCluster, service_passwords: dict[ServiceAccount, str], pki: DevelopmentPKI
) -> None:
    """Maintenance watches the nodes' monitoring ports and has no login on the cluster, over
    either protocol, with its right password; the other accounts do (MQTT)."""
    account = ServiceAccount.MAINTENANCE
    password = service_passwords[account]
    with pytest.raises(ConnectionLost, match="uthoriz"):
        _nats(nats_broker, account, password, pki.ca_file)
    port = nats_broker.nodes[2].mqtt_port
    assert connack_of(port, "galvani-maintenance-1", account.value, password) in REFUSED
    for other in (ServiceAccount.INGEST, ServiceAccount.RULES, ServiceAccount.API):
        code = connack_of(port, f"{other.value}-grants", other.value, service_passwords[other])
        assert code == CONNACK_ACCEPTED, other
