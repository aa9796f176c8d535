"""The agent's TOML config: the example loads, and every mistake gets a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from rdbroker_agent.config import AgentConfig, load_config, parse_config
from rdbroker_agent.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[3] / "services" / "agent" / "agent.example.toml"


def test_example_config_loads() -> None:
    config = load_config(EXAMPLE)
    assert [(c.kind, c.weight, c.full_scale) for c in config.counters] == [
        ("cpu", 2.0, 90.0),
        ("memory", 1.0, 95.0),
        ("sessions", 1.0, 40.0),
    ]
    assert config.max_sessions == 40
    assert config.drain_file == EXAMPLE.parent / "drain"
    assert config.token_file == EXAMPLE.parent / "agent.token"
    assert (config.tls_cert, config.tls_key, config.tls_ca) == (None, None, None)
    assert config.on_counter_error == "skip"
    assert config.sessions.kind == "psutil"


def test_minimal_config_defaults() -> None:
    config = parse_config({"counters": [{"kind": "cpu"}]})
    assert config == AgentConfig(counters=config.counters)
    (cpu,) = config.counters
    assert (cpu.name, cpu.weight, cpu.full_scale) == ("cpu", 1.0, 100.0)


def test_command_counter_and_command_sessions() -> None:
    config = parse_config(
        {
            "counters": [{"name": "gpu", "kind": "command", "command": ["gpu", "--pct"], "full_scale": 80}],
            "sessions": {"source": "command", "command": ["sessions.ps1"]},
            "on_counter_error": "down",
        }
    )
    assert config.counters[0].command == ("gpu", "--pct")
    assert config.sessions.command == ("sessions.ps1",)
    assert config.on_counter_error == "down"


def test_xrdp_sessions() -> None:
    config = parse_config({"counters": [{"kind": "cpu"}], "sessions": {"source": "xrdp"}})
    assert config.sessions.kind == "xrdp"
    assert config.sessions.command == ()


CPU = {"counters": [{"kind": "cpu"}]}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, r"at least one \[\[counters\]\]"),
        ({"counters": []}, r"at least one \[\[counters\]\]"),
        (
            {"counters": [{"kind": "disk"}]},
            r"counters\[0\]\.kind must be one of cpu, memory, sessions",
        ),
        ({"counters": [{"kind": "cpu", "wieght": 2}]}, r"unknown key\(s\) in counters\[0\]: wieght"),
        ({**CPU, "max_session": 3}, r"unknown key\(s\) in top level: max_session"),
        ({"counters": [{"kind": "cpu", "weight": 0}]}, r"counters\[0\]\.weight must be > 0"),
        ({"counters": [{"kind": "cpu", "weight": "2"}]}, r"counters\[0\]\.weight must be a number"),
        ({"counters": [{"kind": "cpu", "weight": True}]}, r"counters\[0\]\.weight must be a number"),
        ({"counters": [{"kind": "cpu", "full_scale": -5}]}, r"full_scale must be > 0"),
        ({"counters": [{"kind": "sessions"}]}, r"full_scale is needed for kind 'sessions'"),
        ({"counters": [{"kind": "command"}]}, r"counters\[0\]\.command must be a non-empty list of strings"),
        ({"counters": [{"kind": "command", "command": "gpu --pct"}]}, r"must be a non-empty list of strings"),
        ({"counters": [{"kind": "cpu", "command": ["x"]}]}, r"command is only for kind 'command'"),
        ({"counters": [{"kind": "cpu"}, {"kind": "cpu"}]}, r"counter names must be unique"),
        ({**CPU, "max_sessions": 0}, r"max_sessions must be a whole number >= 1"),
        ({**CPU, "max_sessions": 2.5}, r"max_sessions must be a whole number"),
        ({**CPU, "drain": "yes"}, r"drain must be true or false"),
        ({**CPU, "drain_file": ""}, r"drain_file must be a non-empty path"),
        (
            {**CPU, "on_counter_error": "ignore"},
            r"on_counter_error must be 'skip' or 'down'",
        ),
        ({**CPU, "command_timeout_s": 0}, r"command_timeout_s must be in \(0, 300\]"),
        (
            {**CPU, "sessions": {"source": "wmi"}},
            r"sessions\.source must be 'psutil', 'xrdp' or 'command', not 'wmi'",
        ),
        ({**CPU, "sessions": {"source": "command"}}, r"sessions\.command must be"),
        (
            {**CPU, "sessions": {"command": ["x"]}},
            r"needs sessions\.source = 'command'",
        ),
        (
            {**CPU, "sessions": {"source": "xrdp", "command": ["x"]}},
            r"needs sessions\.source = 'command'",
        ),
    ],
)
def test_bad_config(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read"):
        load_config(tmp_path / "nope.toml")


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("counters = [\n")
    with pytest.raises(ConfigError, match=r"agent\.toml: not valid TOML"):
        load_config(path)


def test_invalid_value_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[[counters]]\nkind = "cpu"\nweight = -1\n')
    with pytest.raises(ConfigError, match=r"agent\.toml: counters\[0\]\.weight must be > 0"):
        load_config(path)


def test_absolute_drain_file_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(f'drain_file = "{(tmp_path / "x" / "drain").as_posix()}"\n[[counters]]\nkind = "cpu"\n')
    assert load_config(path).drain_file == tmp_path / "x" / "drain"
