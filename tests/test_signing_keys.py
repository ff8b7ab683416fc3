"""The signing-key rotation commands (``python -m services.common.signing``) on real files."""

import base64
import hashlib
import stat
from pathlib import Path

import pytest

from services.common.signing import (
    KEY_FILE,
    NEXT_KEY_FILE,
    SigningKeyError,
    key_id,
    load_next_key,
    load_or_create_key,
    main,
    promote_next_key,
    public_key_b64,
)


def test_next_then_promote_signs_with_the_next_key_and_keeps_the_old_one_retired(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = load_or_create_key(tmp_path)
    assert load_next_key(tmp_path) is None
    assert main(["next", "--key-dir", str(tmp_path)]) == 0
    upcoming = load_next_key(tmp_path)
    assert upcoming is not None
    assert stat.S_IMODE((tmp_path / NEXT_KEY_FILE).stat().st_mode) == 0o600
    listed = capsys.readouterr().out.splitlines()
    assert listed == [
        f"current\t{key_id(old)}\t{public_key_b64(old)}",
        f"next\t{key_id(upcoming)}\t{public_key_b64(upcoming)}",
    ]

    retired = promote_next_key(tmp_path)
    assert retired.name == f"config-signing-key.{key_id(old)}.retired.pem"
    assert public_key_b64(load_or_create_key(tmp_path)) == public_key_b64(upcoming)
    assert public_key_b64(load_or_create_key(tmp_path, retired.name)) == public_key_b64(old)
    assert load_next_key(tmp_path) is None
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600


def test_promote_without_a_next_key_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    current = public_key_b64(load_or_create_key(tmp_path))
    with pytest.raises(SigningKeyError):
        promote_next_key(tmp_path)
    assert main(["promote", "--key-dir", str(tmp_path)]) == 1
    assert public_key_b64(load_or_create_key(tmp_path)) == current


def test_kid_is_the_start_of_the_sha256_of_the_raw_public_key(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path)
    raw = base64.b64decode(public_key_b64(key))
    assert key_id(key) == hashlib.sha256(raw).hexdigest()[:16]
