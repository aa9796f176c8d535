"""The bearer token proxies and health replicas send the broker: from the environment or a file that is
re-read when it changes (written as Kubernetes updates a Secret volume)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from rdbroker_common.broker_token import BrokerToken


def test_no_token_sends_nothing() -> None:
    token = BrokerToken()
    assert token.metadata() == ()
    assert not token.configured


def test_a_token_goes_into_the_authorization_metadata() -> None:
    assert BrokerToken(" s3cret\n").metadata() == (("authorization", "Bearer s3cret"),)


@pytest.mark.parametrize("bad", ["two words", "tab\there", "caf\u00e9", "bell\x07"])
def test_a_token_is_one_printable_ascii_word(bad: str) -> None:
    with pytest.raises(ValueError, match="RDBROKER_BROKER_TOKEN: a token is one word"):
        BrokerToken(bad)


def test_a_token_and_a_file_together_are_refused(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("a")
    with pytest.raises(ValueError, match="not both"):
        BrokerToken("b", str(tmp_path / "token"))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read"),
        ("", "is empty"),
        ("  \n", "is empty"),
        ("a b\n", "one word"),
        ("x" * 5000, "longer"),
    ],
)
def test_a_file_without_a_token_is_a_start_up_error(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=f"--broker-token-file.*{message}"):
        BrokerToken(file=str(path))


def test_a_rotated_file_is_picked_up_at_the_next_look(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (first / "token").write_text("one\n")
    (second / "token").write_text("two\n")
    (secret / "..data").symlink_to(first)
    (secret / "token").symlink_to(secret / "..data" / "token")
    token = BrokerToken(file=str(secret / "token"), interval_s=0)
    assert token.metadata() == (("authorization", "Bearer one"),)

    # Kubernetes swaps the `..data` link in one rename.
    (secret / "..tmp").symlink_to(second)
    os.replace(secret / "..tmp", secret / "..data")
    assert token.metadata() == (("authorization", "Bearer two"),)

    # A file that empties or vanishes (a rotation half done) keeps the last token.
    with caplog.at_level(logging.WARNING, logger="rdbroker_common.broker_token"):
        (second / "token").write_text("")
        assert token.metadata() == (("authorization", "Bearer two"),)
        (second / "token").unlink()
        assert token.metadata() == (("authorization", "Bearer two"),)
    assert "keeping the previous one" in caplog.text
    (second / "token").write_text("three")
    assert token.metadata() == (("authorization", "Bearer three"),)


def test_the_file_is_looked_at_at_most_every_interval(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("one")
    token = BrokerToken(file=str(path), interval_s=3600)
    path.write_text("two!")
    for _ in range(3):
        assert token.metadata() == (("authorization", "Bearer one"),)  # no stat per call
    token._next = 0.0  # the interval has passed
    assert token.metadata() == (("authorization", "Bearer two!"),)
