"""Flags over RDBROKER_* environment over defaults, one rule for every service."""

from __future__ import annotations

import argparse

import pytest
from pydantic import Field, SecretStr, ValidationError

from rdbroker_common.flags import add_settings_flags, parse_settings, settings_from
from rdbroker_common.settings import ServiceSettings


class Example(ServiceSettings):
    listen: str = "127.0.0.1:1"
    timeout_s: float = Field(default=5.0, gt=0, description="how long to wait")
    migrate: bool = False
    stream: bool = True
    admin_token: SecretStr = SecretStr("")


def parse(argv: list[str]) -> Example:
    return parse_settings(Example, argv, prog="x", description="x", env_only=("admin_token",))


def test_defaults_then_environment_then_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse([]).timeout_s == 5.0
    monkeypatch.setenv("RDBROKER_TIMEOUT_S", "7")
    monkeypatch.setenv("RDBROKER_LISTEN", "127.0.0.1:2")
    from_env = parse([])
    assert (from_env.timeout_s, from_env.listen) == (7.0, "127.0.0.1:2")
    from_flags = parse(["--timeout-s", "9", "--migrate"])
    assert (from_flags.timeout_s, from_flags.listen, from_flags.migrate) == (9.0, "127.0.0.1:2", True)


def test_a_setting_on_by_default_is_turned_off_by_its_no_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse([]).stream is True
    assert parse(["--no-stream"]).stream is False
    monkeypatch.setenv("RDBROKER_STREAM", "false")
    assert parse([]).stream is False
    assert parse(["--stream"]).stream is True  # the flag wins over the environment
    with pytest.raises(SystemExit):
        parse(["--no-migrate"])  # off by default: no such flag


def test_a_bad_value_is_a_validation_error_naming_the_field() -> None:
    with pytest.raises(ValidationError, match="timeout_s"):
        parse(["--timeout-s", "-1"])


def test_unknown_flags_and_env_only_fields_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit) as exited:
        parse(["--no-such-flag", "1"])
    assert exited.value.code == 2
    with pytest.raises(SystemExit):
        parse(["--admin-token", "s3cret"])  # credentials never on a command line
    monkeypatch.setenv("RDBROKER_ADMIN_TOKEN", "s3cret")
    assert parse([]).admin_token.get_secret_value() == "s3cret"


def test_a_subset_of_flags_with_help_naming_the_variable() -> None:
    parser = argparse.ArgumentParser(prog="x")
    add_settings_flags(parser, Example, only=("timeout_s",))
    help_text = parser.format_help()
    assert "--timeout-s" in help_text
    assert "RDBROKER_TIMEOUT_S" in help_text
    assert "how long to wait" in help_text
    assert "--listen" not in help_text
    assert settings_from(Example, parser.parse_args(["--timeout-s", "3"])).timeout_s == 3.0
