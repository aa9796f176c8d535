"""The keyed hash of user names in logs: HMAC-SHA256 with the deployment's key, never a bare hash."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from rdbroker_common import loghash

KEY = b"0123456789abcdef-deployment-key"


def test_the_same_key_hashes_the_same_in_every_instance() -> None:
    assert loghash.LogHasher(KEY)("CORP\\alice") == loghash.LogHasher(KEY)("CORP\\alice")


def test_another_key_or_name_hashes_otherwise() -> None:
    hashed = loghash.LogHasher(KEY)("alice")
    assert loghash.LogHasher(KEY + b"2")("alice") != hashed
    assert loghash.LogHasher(KEY)("alicf") != hashed


def test_the_hash_names_its_scheme_and_is_not_the_bare_sha256() -> None:
    hashed = loghash.LogHasher(KEY)("alice")
    assert hashed.startswith("hmac:")
    digits = hashed.removeprefix("hmac:")
    assert len(digits) == 32
    int(digits, 16)
    assert digits not in hashlib.sha256(b"alice").hexdigest()


def test_without_a_key_one_random_key_per_process() -> None:
    here = [loghash.LogHasher()("alice"), loghash.LogHasher()("alice")]
    assert here[0] == here[1]
    assert loghash.LogHasher().ephemeral
    assert not loghash.LogHasher(KEY).ephemeral
    code = "from rdbroker_common.loghash import LogHasher; print(LogHasher()('alice'))"
    elsewhere = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert elsewhere.stdout.strip() != here[0]


def test_a_short_key_is_refused_and_the_key_never_shows() -> None:
    with pytest.raises(ValueError, match="at least 16"):
        loghash.LogHasher(b"short")
    assert KEY.decode() not in repr(loghash.LogHasher(KEY))


def test_the_key_comes_from_the_environment_or_a_file(tmp_path: Path) -> None:
    assert loghash.load_key("", "") is None
    assert loghash.load_key("from-env", "") == b"from-env"
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY + b"\n")
    assert loghash.load_key("", str(key_file)) == KEY
    with pytest.raises(ValueError, match="not both"):
        loghash.load_key("from-env", str(key_file))
    key_file.write_bytes(b"\n")
    with pytest.raises(ValueError, match="is empty"):
        loghash.load_key("", str(key_file))
    with pytest.raises(FileNotFoundError):
        loghash.load_key("", str(tmp_path / "missing"))
