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
    (None: everything) and connection types (None: any)."""

    name: str
    publish: tuple[str, ...] | None
    subscribe: tuple[str, ...] | None
    connection_types: tuple[str, ...] | None
    account: str = APP_ACCOUNT


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


def service_grant(account: str) -> Grant:
    """A backend service account: every subject of GALVANI (device traffic, JetStream's API,
    configs), any client id, NATS or MQTT."""
    return Grant(name=account, publish=None, subscribe=None, connection_types=None)


def user_claims(grant: Grant, user_nkey: str) -> dict[str, Any]:
    """The user JWT's claims for ``grant`` (before signing)."""
    nats: dict[str, Any] = {
        "type": jwt.USER_CLAIM,
        "pub": {} if grant.publish is None else {"allow": list(grant.publish)},
        "sub": {} if grant.subscribe is None else {"allow": list(grant.subscribe)},
        "subs": jwt.NO_LIMIT,
        "data": jwt.NO_LIMIT,
        "payload": jwt.NO_LIMIT,
    }
    if grant.connection_types is not None:
        nats["allowed_connection_types"] = list(grant.connection_types)
    return {"sub": user_nkey, "aud": grant.account, "name": grant.name, "nats": nats}


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
