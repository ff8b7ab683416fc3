"""The callout's issuer account key: made once, kept in an owner-only seed file.

Its public key (``A...``) goes into every node's ``auth_callout.issuer``; the seed stays with
the responders, which sign every answer with it. Whoever holds the seed can log anyone in, so
it is written 0600 and never logged.
"""

import os
from pathlib import Path

from services.broker_access.nkeys import KeyPair, Prefix


def ensure_issuer(path: Path) -> KeyPair:
    """The issuer key pair in ``path``, made (mode 0600) when the file does not exist."""
    if path.is_file():
        pair = KeyPair.from_seed(path.read_text())
        if pair.prefix is not Prefix.ACCOUNT:
            raise ValueError(f"{path} holds a {pair.prefix.name.lower()} seed, not an account's")
        return pair
    pair = KeyPair.create(Prefix.ACCOUNT)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as seed:
        seed.write(pair.seed + "\n")
    return pair


def load_issuer(path: Path) -> KeyPair:
    """The issuer key pair in ``path`` (which must exist)."""
    pair = KeyPair.from_seed(path.read_text())
    if pair.prefix is not Prefix.ACCOUNT:
        raise ValueError(f"{path} holds a {pair.prefix.name.lower()} seed, not an account's")
    return pair
