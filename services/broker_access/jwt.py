"""NATS JWTs (nats-io/jwt v2): what the auth callout reads and writes.

A NATS JWT is ``header.payload.signature``, each part base64url without padding. The header
is ``{"typ":"JWT","alg":"ed25519-nkey"}``; the signature is the issuer's ed25519 signature of
``header.payload`` (the ASCII text), and the issuer is the claims' ``iss``, a public nkey.
Claims v2 keep their kind and version in ``nats.type`` and ``nats.version`` (2).

The server checks our answers with ``jwt.Decode`` (signature by ``iss``, an account key) and
``Validate`` (``exp``/``nbf``); it does not recompute ``jti``, which nats-io/jwt sets to the
base32 SHA-512/256 of the claims; we do the same, so a log line can name a token.
"""

import base64
import binascii
import hashlib
import json
import time
from typing import Any, Final

from services.broker_access.nkeys import KeyPair, NkeyError, Prefix, decode_public, verify

HEADER: Final = {"typ": "JWT", "alg": "ed25519-nkey"}
ALGORITHMS: Final = ("ed25519-nkey", "ed25519")
CLAIMS_VERSION: Final = 2
# nats-io/jwt's MaxTokenSize.
MAX_TOKEN_BYTES: Final = 1024 * 1024

USER_CLAIM: Final = "user"
AUTHORIZATION_REQUEST_CLAIM: Final = "authorization_request"
AUTHORIZATION_RESPONSE_CLAIM: Final = "authorization_response"
NO_LIMIT: Final = -1


class JwtError(ValueError):
    """A token that is not a valid NATS JWT (shape, header, signature or issuer)."""


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _b64decode(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise JwtError("a part of the token is not base64url") from exc


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


# nats-io/jwt's ClaimsData fields, in its struct's order: the JSON its jti hashes.
CLAIMS_DATA_FIELDS: Final = ("aud", "exp", "jti", "iat", "iss", "name", "nbf", "sub")


def jti(claims: dict[str, Any]) -> str:
    """nats-io/jwt's token id: base32 (no padding) of the SHA-512/256 of the claims' common
    fields as Go marshals them (struct order, empty ones left out), ``jti`` itself empty."""
    common = {key: claims[key] for key in CLAIMS_DATA_FIELDS if key != "jti" and claims.get(key)}
    digest = hashlib.new("sha512_256", _json(common)).digest()
    return base64.b32encode(digest).decode().rstrip("=")


def encode(claims: dict[str, Any], issuer: KeyPair, *, now: float | None = None) -> str:
    """Sign ``claims`` (with ``sub`` and a ``nats`` object carrying ``type``) as ``issuer``:
    ``iss``, ``iat``, ``jti`` and ``nats.version`` are set here."""
    if not claims.get("sub"):
        raise JwtError("claims without a subject")
    body = dict(claims)
    body["iss"] = issuer.public_key
    body["iat"] = int(time.time() if now is None else now)
    body["jti"] = jti(body)
    body["nats"] = {**body.get("nats", {}), "version": CLAIMS_VERSION}
    signing_input = f"{_b64encode(_json(HEADER))}.{_b64encode(_json(body))}"
    signature = issuer.sign(signing_input.encode())
    return f"{signing_input}.{_b64encode(signature)}"


def decode(
    token: str, *, issuer_prefix: Prefix | None = None, now: float | None = None
) -> dict[str, Any]:
    """The claims of ``token`` once its header, signature (by its ``iss``, of role
    ``issuer_prefix`` when given) and times (``exp``, ``nbf``) check out."""
    if len(token) > MAX_TOKEN_BYTES:
        raise JwtError("token too large")
    parts = token.split(".")
    if len(parts) != 3:
        raise JwtError("a JWT has three parts")
    try:
        header = json.loads(_b64decode(parts[0]))
        claims = json.loads(_b64decode(parts[1]))
    except json.JSONDecodeError as exc:
        raise JwtError("a part of the token is not JSON") from exc
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise JwtError("header and claims must be JSON objects")
    if str(header.get("typ", "")).upper() != "JWT":
        raise JwtError(f"not a JWT: typ {header.get('typ')!r}")
    if str(header.get("alg", "")).lower() not in ALGORITHMS:
        raise JwtError(f"unexpected algorithm {header.get('alg')!r}")
    issuer = claims.get("iss")
    if not isinstance(issuer, str):
        raise JwtError("no issuer")
    try:
        decode_public(issuer, issuer_prefix)
    except NkeyError as exc:
        raise JwtError(f"bad issuer: {exc}") from exc
    signing_input = f"{parts[0]}.{parts[1]}".encode()
    if not verify(issuer, signing_input, _b64decode(parts[2])):
        raise JwtError("bad signature")
    moment = time.time() if now is None else now
    expires = claims.get("exp")
    if isinstance(expires, int | float) and expires and moment > expires:
        raise JwtError("expired")
    not_before = claims.get("nbf")
    if isinstance(not_before, int | float) and not_before and moment < not_before:
        raise JwtError("not yet valid")
    return claims


def claim_type(claims: dict[str, Any]) -> str:
    """A v2 claim's kind (``nats.type``)."""
    nats = claims.get("nats")
    return str(nats.get("type", "")) if isinstance(nats, dict) else ""
