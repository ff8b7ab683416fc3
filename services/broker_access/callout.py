"""The auth-callout protocol of NATS 2.10 in config mode (server/auth_callout.go), and who
may do what on the cluster.

For every CONNECT that is not one of the callout's own ``auth_users``, the server sends an
authorization request JWT, signed by its own server nkey (``N...``), on
``$SYS.REQ.USER.AUTH`` in the callout account, with a reply subject. The request carries
the server's id (``nats.server_id.id``), a fresh user nkey made for this connection
(``nats.user_nkey``), what the client said (``nats.connect_opts.user``/``pass``) and what the
server knows of it (``nats.client_info``: ``type`` ``mqtt`` or ``nats``, and ``mqtt_id``, the
MQTT client id).

The answer is an authorization response JWT signed by the callout's issuer account key, with
``sub`` the request's user nkey and ``aud`` the server id, holding either ``nats.jwt`` (a user
JWT) or ``nats.error``. The user JWT is signed by the same issuer (the server checks that
``iss`` is the configured ``issuer``), has ``sub`` the user nkey, ``aud`` the account to place
the client in (config mode's "placement"), ``name`` the name the server then calls the client
by (which is also the source it records on retained MQTT messages), and in ``nats`` the
subject permissions and allowed connection types. An answer the server cannot verify, or
none within the authorization timeout, refuses the client; an MQTT client then gets CONNACK
return code 5 (not authorized).
"""

import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Final

from services.broker_access import jwt
from services.broker_access.nkeys import KeyPair, Prefix, is_public
from services.common.broker.nats_client import inbox_root
from services.common.broker.subjects import STREAM
from services.common.broker_auth import ServiceAccount
from services.common.protocol.topics import (
    ACK_CHANNEL,
    CONFIG_CHANNEL,
    DEVICE_CHANNELS,
    DEVICE_ID_PATTERN,
)

log = logging.getLogger(__name__)

CALLOUT_SUBJECT: Final = "$SYS.REQ.USER.AUTH"
# Every responder serves the subject in one queue group: each request reaches one of them.
QUEUE_GROUP: Final = "galvani-auth"
APP_ACCOUNT: Final = "GALVANI"
DEVICE_SUBJECT_ROOT: Final = "galvani.v1.d"
# The MQTT gateway delivers a QoS 1 subscription's messages through a JetStream consumer
# whose deliver subject is ``$MQTT.sub.<random token>``, subscribed as the client: without
# subscribe permission there, a device's QoS 1 SUBSCRIBE gets SUBACK 0x80 (tried in
# tests/test_broker_access.py with this grant removed). The token is random, so one level of
# wildcard is the narrowest grant. It lets a device read no other device's messages:
# ``allowed_connection_types: MQTT`` keeps it off the NATS protocol, and an MQTT topic
# cannot name a ``$MQTT`` subject (server/mqtt.go refuses it).
MQTT_DELIVERY_SUBJECTS: Final = "$MQTT.sub.*"
DEVICE_CONNECTION_TYPES: Final = ("MQTT",)
STANDARD: Final = "STANDARD"  # the NATS protocol
MQTT: Final = "MQTT"
# An authorization request's ``client_info.type`` (server/client.go clientTypeString) to the
# user JWT's connection type.
CONNECTION_TYPES: Final = {"nats": STANDARD, "mqtt": MQTT, "websocket": "WEBSOCKET"}
# The authorization response's lifetime: the server reads it at once. The user JWT inside has
# no ``exp``: the server would close the connection when it passed.
RESPONSE_TTL_S: Final = 60

_DEVICE_ID: Final = re.compile(DEVICE_ID_PATTERN)


class CalloutError(ValueError):
    """A request that is not a valid authorization request."""


@dataclass(frozen=True)
class AuthRequest:
    """What an authorization request says about one CONNECT."""

    server_id: str
    user_nkey: str
    username: str
    password: str
    client_type: str  # "mqtt", "nats", "websocket"
    mqtt_client_id: str
    host: str

    @property
    def is_mqtt(self) -> bool:
        """Whether the client came through the MQTT gateway."""
        return self.client_type == "mqtt"


def parse_request(token: str, *, now: float | None = None) -> AuthRequest:
    """The request in ``token``, once its signature by a server key checks out."""
    try:
        claims = jwt.decode(token, issuer_prefix=Prefix.SERVER, now=now)
    except jwt.JwtError as exc:
        raise CalloutError(f"not a valid request: {exc}") from exc
    if jwt.claim_type(claims) != jwt.AUTHORIZATION_REQUEST_CLAIM:
        raise CalloutError(f"not an authorization request: {jwt.claim_type(claims)!r}")
    nats = claims["nats"]
    server = nats.get("server_id") or {}
    info = nats.get("client_info") or {}
    options = nats.get("connect_opts") or {}
    user_nkey = str(nats.get("user_nkey", ""))
    if not is_public(user_nkey, Prefix.USER):
        raise CalloutError("the request's user_nkey is not a user key")
    server_id = str(server.get("id", ""))
    if not is_public(server_id, Prefix.SERVER):
        raise CalloutError("the request's server id is not a server key")
    return AuthRequest(
        server_id=server_id,
        user_nkey=user_nkey,
        username=str(options.get("user", "")),
        password=str(options.get("pass", "")),
        client_type=str(info.get("type", "")),
        mqtt_client_id=str(info.get("mqtt_id", "")),
        host=str(info.get("host", "")),
    )


@dataclass(frozen=True)
class Grant:
    """Let the client in as ``name`` in ``account`` with these subject permissions
    (None: everything, an empty tuple: nothing) and connection types (None: any)."""

    name: str
    publish: tuple[str, ...] | None
    subscribe: tuple[str, ...] | None
    connection_types: tuple[str, ...] | None
    account: str = APP_ACCOUNT

    def admits(self, client_type: str) -> bool:
        """Whether a client of ``client_type`` (the request's ``client_info.type``) may use
        this grant. nats-server 2.10 does not enforce a callout user JWT's
        ``allowed_connection_types`` (server/auth_callout.go registers the user without
        checking them; tried in tests/test_service_grants.py), so the responder does."""
        if self.connection_types is None:
            return True
        return CONNECTION_TYPES.get(client_type) in self.connection_types


@dataclass(frozen=True)
class Refusal:
    """Keep the client out; ``reason`` is logged, and sent to the server, which logs it."""

    reason: str


Decision = Grant | Refusal


def device_subject(device_id: str, channel: str) -> str:
    """The NATS subject of a device channel (MQTT topic ``galvani/v1/d/<id>/<channel>``)."""
    return f"{DEVICE_SUBJECT_ROOT}.{device_id}.{channel}"


def device_grant(device_id: str) -> Grant:
    """protocol.md "Authorization" on NATS: a device publishes on its own telemetry, events,
    state and presence (its will is one of these: the gateway publishes it as the client),
    subscribes to its own config and ack, over MQTT only."""
    if not _DEVICE_ID.fullmatch(device_id):
        raise ValueError(f"not a device id: {device_id!r}")
    return Grant(
        name=device_id,
        publish=tuple(device_subject(device_id, channel) for channel in DEVICE_CHANNELS),
        subscribe=(
            device_subject(device_id, CONFIG_CHANNEL),
            device_subject(device_id, ACK_CHANNEL),
            MQTT_DELIVERY_SUBJECTS,
        ),
        connection_types=DEVICE_CONNECTION_TYPES,
    )


# What a backend account reaches on NATS (services/common/broker/subjects.py, jetstream.py,
# nats_client.py; services/common/config_push.py; services/common/broker_certificates.py):
#
# * the JetStream API of the stream GALVANI_DEVICES, as ensure_stream and ensure_consumer call
#   it on every connection of a worker (STREAM.INFO, then STREAM.CREATE when it is missing;
#   CONSUMER.INFO and CONSUMER.CREATE of the group's durable), and the pull requests
#   (CONSUMER.MSG.NEXT). The durable is the worker's share group, a setting
#   (GALVANI_<SERVICE>_SHARE_GROUP, ``ingest``/``rules`` by default, one of its own per test),
#   so its token is ``*``: a worker account can pull from another group's consumer too;
# * ``$JS.ACK.GALVANI_DEVICES.>``: acknowledging a message (and ``+WPI``) is a publish to its
#   reply subject, ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>``;
# * ``_INBOX.<account>.>`` (subscribe): the replies of the JetStream API and the pulled
#   messages come to ``_INBOX.<user>.<random>.<n>`` (nats_client.new_inbox_prefix), so a
#   worker reads its own account's replies and not the other's;
# * over MQTT: a config table published retained at QoS 1 is a publish on the device's
#   ``config`` subject; a session takeover (CONNECT with the device's client id, then
#   DISCONNECT) needs no subject at all.
_STREAM_INFO: Final = f"$JS.API.STREAM.INFO.{STREAM}"
_STREAM_CREATE: Final = f"$JS.API.STREAM.CREATE.{STREAM}"
_CONSUMER_INFO: Final = f"$JS.API.CONSUMER.INFO.{STREAM}.*"
_CONSUMER_CREATE: Final = f"$JS.API.CONSUMER.CREATE.{STREAM}.*"
_CONSUMER_DELETE: Final = f"$JS.API.CONSUMER.DELETE.{STREAM}.*"
_CONSUMER_NEXT: Final = f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.*"
_STREAM_ACKS: Final = f"$JS.ACK.{STREAM}.>"

# What a worker group's consumer needs: the stream made if missing, the consumer made if
# missing, pulled from, and each message acknowledged.
_CONSUMING: Final = (
    _STREAM_INFO,
    _STREAM_CREATE,
    _CONSUMER_INFO,
    _CONSUMER_CREATE,
    _CONSUMER_NEXT,
    _STREAM_ACKS,
)


def _every_device(channel: str) -> str:
    return device_subject("*", channel)


def _replies(account: ServiceAccount) -> str:
    return f"{inbox_root(account.value)}.>"


SERVICE_GRANTS: Final[dict[ServiceAccount, Grant | None]] = {
    # Pulls the device channels from its group's consumer (NATS), publishes each stored
    # message's ack to the device as core NATS (jetstream.py JetStreamSource.publish), and
    # ends a flooding device's session by MQTT takeover (services/ingest/throttle.py).
    # CONSUMER.DELETE: retiring a worker group's consumer, which nothing else in GALVANI can
    # do on the callout cluster (tests/brokers.py deletes the tests' groups so).
    ServiceAccount.INGEST: Grant(
        name=ServiceAccount.INGEST.value,
        publish=(*_CONSUMING, _CONSUMER_DELETE, _every_device(ACK_CHANNEL)),
        subscribe=(_replies(ServiceAccount.INGEST),),
        connection_types=(STANDARD, MQTT),
    ),
    # Pulls the device channels from its group's consumer (NATS) and publishes config tables
    # retained over MQTT (services/rules/main.py connect_publisher).
    ServiceAccount.RULES: Grant(
        name=ServiceAccount.RULES.value,
        publish=(*_CONSUMING, _every_device(CONFIG_CHANNEL)),
        subscribe=(_replies(ServiceAccount.RULES),),
        connection_types=(STANDARD, MQTT),
    ),
    # Publishes config tables retained over MQTT (rollouts, API pushes: services/api/
    # publisher.py) and ends a decommissioned device's session by takeover; subscribes to
    # nothing and never speaks the NATS protocol.
    ServiceAccount.API: Grant(
        name=ServiceAccount.API.value,
        publish=(_every_device(CONFIG_CHANNEL),),
        subscribe=(),
        connection_types=(MQTT,),
    ),
    # Watches the cluster through the nodes' HTTP monitoring ports (services/maintenance/
    # cluster_watch.py), never through a connection: refused.
    ServiceAccount.MAINTENANCE: None,
}


def service_grant(account: ServiceAccount) -> Grant | None:
    """What ``account`` may do on the cluster (SERVICE_GRANTS); None: it may not log in."""
    return SERVICE_GRANTS[account]


def user_claims(grant: Grant, user_nkey: str) -> dict[str, Any]:
    """The user JWT's claims for ``grant`` (before signing)."""
    nats: dict[str, Any] = {
        "type": jwt.USER_CLAIM,
        "pub": _permission(grant.publish),
        "sub": _permission(grant.subscribe),
        "subs": jwt.NO_LIMIT,
        "data": jwt.NO_LIMIT,
        "payload": jwt.NO_LIMIT,
    }
    if grant.connection_types is not None:
        nats["allowed_connection_types"] = list(grant.connection_types)
    return {"sub": user_nkey, "aud": grant.account, "name": grant.name, "nats": nats}


def _permission(allowed: tuple[str, ...] | None) -> dict[str, list[str]]:
    """A user JWT's ``pub`` or ``sub``: nothing said allows everything, and an empty allow
    list is not relied on to mean nothing, so no subject at all is a deny of every subject."""
    if allowed is None:
        return {}
    if not allowed:
        return {"deny": [">"]}
    return {"allow": list(allowed)}


def respond(
    request: AuthRequest, decision: Decision, issuer: KeyPair, *, now: float | None = None
) -> bytes:
    """The signed authorization response to ``request``."""
    moment = time.time() if now is None else now
    nats: dict[str, Any] = {"type": jwt.AUTHORIZATION_RESPONSE_CLAIM}
    if isinstance(decision, Grant):
        nats["jwt"] = jwt.encode(user_claims(decision, request.user_nkey), issuer, now=moment)
    else:
        nats["error"] = decision.reason
    claims = {
        "sub": request.user_nkey,
        "aud": request.server_id,
        "exp": int(moment) + RESPONSE_TTL_S,
        "nats": nats,
    }
    return jwt.encode(claims, issuer, now=moment).encode()
