"""The backend's Ed25519 mode-table signing key: created on first run, kept owner-only.

Devices hold the public key and refuse any table it did not sign (protocol.md, config).
The private key lives in the data directory as PKCS#8 PEM with mode 0600; the public key is
what ``GET /v1/config-signing-key`` serves and what a device is provisioned with.
"""

import base64
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from services.common.errors import GalvaniError
from services.common.protocol import canonical_json

KEY_FILE = "config-signing-key.pem"


class SigningKeyError(GalvaniError):
    """The signing key file exists but cannot be used; the message says why."""


def load_or_create_key(directory: Path) -> Ed25519PrivateKey:
    """The key in ``directory``, created (0600, atomically) if there is none."""
    path = directory / KEY_FILE
    if path.exists():
        return _load(path)
    directory.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    # A temporary name of its own (mkstemp: 0600, unique), so two processes creating the key
    # at once (API and rules on a fresh data directory) cannot clobber each other's file.
    fd, name = tempfile.mkstemp(dir=directory, prefix=".config-signing-key-", suffix=".tmp")
    tmp = Path(name)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    try:
        os.link(tmp, path)  # fails if another process created it meanwhile: use theirs
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return _load(path)


def _load(path: Path) -> Ed25519PrivateKey:
    if path.stat().st_mode & 0o077:
        raise SigningKeyError(f"{path} is readable by others; chmod 600 it")
    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except ValueError as exc:
        raise SigningKeyError(f"{path} is not a PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path} is not an Ed25519 key")
    return key


def public_key_bytes(key: Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key devices hold."""
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def public_key_b64(key: Ed25519PrivateKey) -> str:
    """The public key as devices are provisioned with it: raw bytes, base64."""
    return base64.b64encode(public_key_bytes(key)).decode("ascii")


def sign_table(table: Mapping[str, object], key: Ed25519PrivateKey) -> dict[str, object]:
    """``table`` with its ``sig``: Ed25519 over the canonical JSON of the rest."""
    unsigned = {name: value for name, value in table.items() if name != "sig"}
    signature = key.sign(canonical_json(unsigned))
    return {**unsigned, "sig": base64.b64encode(signature).decode("ascii")}
