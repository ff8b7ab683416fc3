"""NATS nkeys: ed25519 keys in NATS's text form (nats-io/nkeys strkey.go).

A public key is base32 (RFC 4648, no padding) of one prefix byte naming the key's role, the
32-byte ed25519 public key and a CRC-16/XMODEM of both, little-endian: an account's reads
``A...``, a user's ``U...``, a server's ``N...``. A seed is base32 of two bytes (the seed
prefix 18<<3 merged with the role's prefix so that it reads ``SA...``, ``SU...``), the 32-byte
ed25519 seed and the CRC. CRC-16/XMODEM (polynomial 0x1021, initial value 0) is
``binascii.crc_hqx(data, 0)``.
"""

import base64
import binascii
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

SEED_PREFIX: Final = 18 << 3
KEY_BYTES: Final = 32


class Prefix(IntEnum):
    """The role byte of a public key (nkeys' PrefixByte*)."""

    OPERATOR = 14 << 3
    SERVER = 13 << 3
    CLUSTER = 2 << 3
    ACCOUNT = 0
    USER = 20 << 3


class NkeyError(ValueError):
    """Not a valid nkey of the expected kind."""


def _b32encode(raw: bytes) -> str:
    return base64.b32encode(raw).decode().rstrip("=")


def _b32decode(text: str) -> bytes:
    try:
        return base64.b32decode(text + "=" * (-len(text) % 8))
    except (binascii.Error, ValueError) as exc:
        raise NkeyError(f"not base32: {text[:8]}...") from exc


def _checksummed(raw: bytes) -> bytes:
    return raw + binascii.crc_hqx(raw, 0).to_bytes(2, "little")


def _verified(text: str) -> bytes:
    raw = _b32decode(text)
    if len(raw) < 4:
        raise NkeyError("too short for an nkey")
    body, crc = raw[:-2], raw[-2:]
    if binascii.crc_hqx(body, 0).to_bytes(2, "little") != crc:
        raise NkeyError("bad nkey checksum")
    return body


def encode_public(prefix: Prefix, key: bytes) -> str:
    """The text form of a raw ed25519 public key in role ``prefix``."""
    if len(key) != KEY_BYTES:
        raise NkeyError("an ed25519 public key is 32 bytes")
    return _b32encode(_checksummed(bytes([prefix]) + key))


def decode_public(text: str, expected: Prefix | None = None) -> tuple[Prefix, bytes]:
    """The role and raw ed25519 key of a public nkey (of role ``expected`` when given)."""
    body = _verified(text)
    if len(body) != 1 + KEY_BYTES:
        raise NkeyError("a public nkey holds 33 bytes")
    try:
        prefix = Prefix(body[0])
    except ValueError as exc:
        raise NkeyError(f"unknown nkey prefix byte {body[0]}") from exc
    if expected is not None and prefix is not expected:
        raise NkeyError(f"a {prefix.name.lower()} key where a {expected.name.lower()} key was due")
    return prefix, body[1:]


def is_public(text: str, expected: Prefix) -> bool:
    """Whether ``text`` is a valid public nkey of role ``expected``."""
    try:
        decode_public(text, expected)
    except NkeyError:
        return False
    return True


def encode_seed(prefix: Prefix, seed: bytes) -> str:
    """The text form (``S<role>...``) of a 32-byte ed25519 seed in role ``prefix``."""
    if len(seed) != KEY_BYTES:
        raise NkeyError("an ed25519 seed is 32 bytes")
    head = bytes([SEED_PREFIX | (prefix >> 5), (prefix & 31) << 3])
    return _b32encode(_checksummed(head + seed))


def decode_seed(text: str) -> tuple[Prefix, bytes]:
    """The role and 32-byte ed25519 seed of a seed nkey."""
    body = _verified(text)
    if len(body) != 2 + KEY_BYTES:
        raise NkeyError("a seed nkey holds 34 bytes")
    if body[0] & 0b11111000 != SEED_PREFIX:
        raise NkeyError("not a seed")
    role = ((body[0] & 0b111) << 5) | (body[1] >> 3)
    try:
        return Prefix(role), body[2:]
    except ValueError as exc:
        raise NkeyError(f"unknown seed role byte {role}") from exc


@dataclass(frozen=True)
class KeyPair:
    """An ed25519 key pair in one nkey role."""

    prefix: Prefix
    private: Ed25519PrivateKey

    @classmethod
    def create(cls, prefix: Prefix) -> "KeyPair":
        """A new random key pair."""
        return cls(prefix, Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, text: str) -> "KeyPair":
        """The key pair of a seed (``SA...``, ``SU...``)."""
        prefix, seed = decode_seed(text.strip())
        return cls(prefix, Ed25519PrivateKey.from_private_bytes(seed))

    @property
    def seed(self) -> str:
        """The seed's text form (a secret)."""
        raw = self.private.private_bytes_raw()
        return encode_seed(self.prefix, raw)

    @property
    def public_key(self) -> str:
        """The public key's text form."""
        raw = self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return encode_public(self.prefix, raw)

    def sign(self, data: bytes) -> bytes:
        """The 64-byte ed25519 signature of ``data``."""
        return self.private.sign(data)


def verify(public_key: str, data: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``public_key``'s signature of ``data``."""
    try:
        _, raw = decode_public(public_key)
        Ed25519PublicKey.from_public_bytes(raw).verify(signature, data)
    except (NkeyError, InvalidSignature):
        return False
    return True
