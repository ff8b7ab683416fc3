"""Secrets Galvani must use again, kept encrypted at rest: a webhook channel's signing secret.

An API key is only ever compared, so its digest is enough (``api_keys.py``). A channel's
secret is different: the dispatcher signs every delivery with it (HMAC-SHA256), so it must be
recoverable, and is stored encrypted with Fernet (AES-128-CBC and HMAC-SHA256, authenticated:
a changed ciphertext fails to decrypt rather than decrypting to something else). A copy of
the database alone (a backup, a replica, a leaked dump) then holds no usable secret.

The key is a file, ``<data_dir>/secrets/notify-secret-key`` by default, created 0600 by
whichever process needs it first (the API on the first channel; the dispatcher shares it).
It holds one Fernet key per line: the first encrypts, every one decrypts, so a key can be
rotated by putting a new one first and re-encrypting at leisure.
"""

import base64
import os
import secrets
import tempfile
from pathlib import Path
from typing import Final

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from services.common.errors import GalvaniError

KEY_FILE: Final = "notify-secret-key"
WEBHOOK_SECRET_PREFIX = "whsec_"  # noqa: S105 (a prefix, not a secret)
WEBHOOK_SECRET_BYTES: Final = 32


class SecretBoxError(GalvaniError):
    """The key file cannot be used, or a ciphertext does not decrypt with it."""


def new_webhook_secret() -> str:
    """A new channel secret: ``whsec_`` and 32 random bytes, base64url without padding. The
    whole string (prefix included, UTF-8) is the HMAC key, as Stripe's are."""
    raw = secrets.token_bytes(WEBHOOK_SECRET_BYTES)
    return WEBHOOK_SECRET_PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class SecretBox:
    """Encrypts and decrypts secrets with the installation's notify key(s)."""

    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise SecretBoxError("no key to encrypt secrets with")
        self._fernet = MultiFernet([Fernet(key) for key in keys])

    @classmethod
    def from_file(cls, path: Path) -> "SecretBox":
        """The box with the keys in ``path``, created (one new key, 0600, atomically) if it
        does not exist."""
        if not path.exists():
            _create(path)
        if path.stat().st_mode & 0o077:
            raise SecretBoxError(f"{path} is readable by others; chmod 600 it")
        lines = [line.strip() for line in path.read_bytes().splitlines() if line.strip()]
        try:
            return cls(lines)
        except ValueError:
            raise SecretBoxError(
                f"{path} must hold Fernet keys (32 url-safe base64-encoded bytes), one a line"
            ) from None

    def encrypt(self, secret: str) -> bytes:
        """``secret`` encrypted with the first key."""
        return self._fernet.encrypt(secret.encode())

    def decrypt(self, ciphertext: bytes) -> str:
        """The secret in ``ciphertext``, decrypted with whichever key made it."""
        try:
            return self._fernet.decrypt(bytes(ciphertext)).decode()
        except InvalidToken:
            raise SecretBoxError(
                "a secret does not decrypt with the notify key(s): the key file was replaced "
                "or the ciphertext altered"
            ) from None


def _create(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # A temporary name of its own (mkstemp: 0600, unique), linked into place: two processes
    # creating the key at once (the API and the dispatcher on a fresh data directory) end up
    # with the same one, whoever links first.
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    tmp = Path(name)
    with os.fdopen(fd, "wb") as handle:
        handle.write(Fernet.generate_key() + b"\n")
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
