"""Bearer tokens: the header check, token files (rotation, half-written rewrites), and the errors."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from rdbroker_common.bearer import TokenError, TokenFile, Tokens, check_token

A = "a" * 20
B = "b" * 24  # rotated tokens differ in length: a rewrite within one mtime tick still shows


def replace(path: Path, text: str) -> None:
    """Write as an operator's tooling does: a new file renamed over the old one."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


@pytest.mark.parametrize(
    ("header", "accepted"),
    [
        (f"Bearer {A}", True),
        (f"bearer {A}", True),  # the scheme is case-insensitive (RFC 6750)
        (f"  Bearer   {A}  ", True),
        (None, False),
        ("", False),
        ("Bearer", False),
        ("Bearer ", False),
        (f"Basic {A}", False),
        (f"Bearer {A}x", False),
        (f"Bearer {A[:-1]}", False),
        (f"Bearer {A.upper()}", False),
        ("Bearer caf\udcc3", False),  # undecodable bytes from the wire do not raise
    ],
)
def test_the_header_check(header: str | None, accepted: bool) -> None:
    assert Tokens(fixed=A).accepts(header) is accepted


def test_a_file_with_several_tokens_accepts_each_and_a_client_sends_the_first(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"# rotating: new first\n{B}\n\n  {A}  \n")
    tokens = Tokens(file=TokenFile(path))
    assert tokens.accepts(f"Bearer {A}")
    assert tokens.accepts(f"Bearer {B}")
    assert not tokens.accepts("Bearer # rotating: new first")
    assert tokens.header() == f"Bearer {B}"


def test_a_changed_file_is_read_again(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(A)
    tokens = Tokens(file=TokenFile(path))
    assert tokens.accepts(f"Bearer {A}")
    replace(path, B + "\n")
    assert tokens.accepts(f"Bearer {B}")
    assert not tokens.accepts(f"Bearer {A}")


@pytest.mark.parametrize("broken", ["", "# only a comment\n", "two words\n", None])
def test_a_rewrite_that_cannot_be_used_keeps_the_previous_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, broken: str | None
) -> None:
    path = tmp_path / "token"
    path.write_text(A)
    tokens = Tokens(file=TokenFile(path))
    if broken is None:
        path.unlink()
    else:
        replace(path, broken)
    with caplog.at_level(logging.WARNING, logger="rdbroker_common.bearer"):
        assert tokens.accepts(f"Bearer {A}")
        assert tokens.accepts(f"Bearer {A}")
    assert len(caplog.records) == 1  # once per change of the file, not per request
    assert "keeping the previous token" in caplog.text
    assert A not in caplog.text
    replace(path, B)
    assert tokens.accepts(f"Bearer {B}")


def test_errors_name_the_setting_never_the_token(tmp_path: Path) -> None:
    with pytest.raises(TokenError, match="at least 16 characters") as short:
        check_token("s3cr3t", "RDBROKER_AGENT_TOKEN", min_length=16)
    assert "s3cr3t" not in str(short.value)
    with pytest.raises(TokenError, match="visible ASCII") as spaced:
        check_token("two secret words", "X")
    assert "secret" not in str(spaced.value)
    path = tmp_path / "token"
    path.write_text("short\n")
    with pytest.raises(TokenError, match="token file") as in_file:
        TokenFile(path, min_length=16)
    assert "short" not in str(in_file.value).replace(str(path), "")
    with pytest.raises(TokenError, match="cannot read"):
        TokenFile(tmp_path / "missing")


def test_configured_takes_one_source() -> None:
    names = ("RDBROKER_X_TOKEN", "--x-token-file")
    assert Tokens.configured("", None, names=names) is None
    assert Tokens.configured("  ", "", names=names) is None
    tokens = Tokens.configured(A, None, names=names)
    assert tokens is not None
    assert tokens.accepts(f"Bearer {A}")
    with pytest.raises(TokenError, match="set RDBROKER_X_TOKEN or --x-token-file, not both"):
        Tokens.configured(A, "/etc/token", names=names)
