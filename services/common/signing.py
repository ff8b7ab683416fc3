"""The backend's Ed25519 mode-table signing keys: created on first run, kept owner-only.

Devices hold the public keys they trust and refuse any table none of them signed (protocol.md,
config). The private keys live in the key directory as PKCS#8 PEM with mode 0600:

- ``config-signing-key.pem``, the current key: every table is signed with it;
- ``config-signing-key.next.pem``, during a rotation only: the next key, published (``GET
  /v1/config-signing-key``) so devices trust it before any table is signed with it.

A table names the key that signed it (``kid``, :func:`key_id` of the public key), so a device
trusting two keys checks the one named. Rotating (docs/protocol.md, "Signing keys"):
``python -m services.common.signing next`` creates the next key; once every device trusts it,
``python -m services.common.signing promote`` makes it current (the old one is kept, renamed
``config-signing-key.<kid>.retired.pem``), and the services are restarted to sign with it.
"""

import argparse
import base64
import hashlib
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
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
NEXT_KEY_FILE = "config-signing-key.next.pem"


class SigningKeyError(GalvaniError):
    """The signing key file exists but cannot be used; the message says why."""


def load_or_create_key(directory: Path, name: str = KEY_FILE) -> Ed25519PrivateKey:
    """The key ``name`` (by default the current one) in ``directory``, created (0600,
    atomically) if there is none."""
    path = directory / name
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


def key_id(key: Ed25519PrivateKey) -> str:
    """The key's ``kid``: the first 16 hex digits of the SHA-256 of its raw public key.

    Derived from the key, so a device computes the same id from the keys it trusts.
    """
    return hashlib.sha256(public_key_bytes(key)).hexdigest()[:16]


def load_next_key(directory: Path) -> Ed25519PrivateKey | None:
    """The next key, while a rotation is under way; None otherwise."""
    path = directory / NEXT_KEY_FILE
    return _load(path) if path.exists() else None


def promote_next_key(directory: Path) -> Path:
    """Make the next key the current one; the old current key is kept, renamed retired.

    The path the old key was moved to. Services sign with the key they loaded at start, so
    they are restarted after this.
    """
    next_path = directory / NEXT_KEY_FILE
    if not next_path.exists():
        raise SigningKeyError(f"no next key in {directory}: create one first (next)")
    current = _load(directory / KEY_FILE)
    _load(next_path)  # refuse a next key that could not sign
    retired = directory / f"config-signing-key.{key_id(current)}.retired.pem"
    if not retired.exists():  # a promote interrupted after this step has kept it already
        os.link(directory / KEY_FILE, retired)
    # rename(2) replaces the current key atomically: a reader sees the old key or the new one.
    os.replace(next_path, directory / KEY_FILE)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return retired


def sign_table(
    table: Mapping[str, object], key: Ed25519PrivateKey, *, device: str, brand: str
) -> dict[str, object]:
    """``table`` bound to ``device`` of ``brand`` and signed by ``key``: ``device``, ``brand``
    and ``kid`` added, and ``sig``, Ed25519 over the canonical JSON of the rest.

    The device binding is what keeps a table signed for one device from applying on another.
    """
    unsigned = {name: value for name, value in table.items() if name != "sig"}
    unsigned.update(device=device, brand=brand, kid=key_id(key))
    signature = key.sign(canonical_json(unsigned))
    return {**unsigned, "sig": base64.b64encode(signature).decode("ascii")}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m services.common.signing {show,next,promote} --key-dir DIR``."""
    parser = argparse.ArgumentParser(
        prog="python -m services.common.signing",
        description="Show and rotate the mode-table signing keys (docs/protocol.md).",
    )
    parser.add_argument("action", choices=["show", "next", "promote"])
    parser.add_argument("--key-dir", type=Path, required=True, help="e.g. <data dir>/secrets")
    args = parser.parse_args(argv)
    directory: Path = args.key_dir
    try:
        if args.action == "next":
            load_or_create_key(directory, NEXT_KEY_FILE)
        elif args.action == "promote":
            print(f"retired the old key to {promote_next_key(directory)}", file=sys.stderr)
        keys = [("current", load_or_create_key(directory)), ("next", load_next_key(directory))]
    except SigningKeyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for role, key in keys:
        if key is not None:
            print(f"{role}\t{key_id(key)}\t{public_key_b64(key)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
