"""Farm file validation: every problem named by line and field."""

from __future__ import annotations

import pytest

from rdbroker_broker.farm import FarmError, load_farm, parse_duration

GOOD = """\
pools:
  - name: default
    default: true
    disconnect_timeout: 8h
  - name: Sales
    disconnect_timeout: 2h
servers:
  - address: 10.0.0.11:3389
    pool: default
    weight: 100
    max_sessions: 50
    agent_url: http://10.0.0.11:8088/load
  - address: 10.0.0.12
    pool: sales
"""


def test_the_design_example_loads():
    farm = load_farm(GOOD)
    assert [(p.name, p.is_default, p.disconnect_timeout_s) for p in farm.pools] == [
        ("default", True, 8 * 3600.0),
        ("Sales", False, 2 * 3600.0),
    ]
    first, second = farm.servers
    assert (first.address, first.weight, first.max_sessions, first.agent_url) == (
        "10.0.0.11:3389",
        100,
        50,
        "http://10.0.0.11:8088/load",
    )
    assert (second.address, second.pool, second.weight) == ("10.0.0.12:3389", "Sales", 100)


def test_no_pools_means_one_default_pool():
    farm = load_farm("servers:\n  - address: h1:3389\n")
    assert [(p.name, p.is_default) for p in farm.pools] == [("default", True)]
    assert farm.servers[0].pool == "default"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("servers:\n  - address: h1:3389\n    weight: -1\n", "farm.yaml:3: servers[0].weight"),
        ("servers:\n  - address: h1:3389\n    wieght: 5\n", "farm.yaml:3: servers[0].wieght: unknown field"),
        ("servers:\n  - pool: default\n", "servers[0].address: required"),
        ("servers:\n  - address: 'h1:99999'\n", "farm.yaml:2: servers[0].address: expected host:port"),
        (
            "servers:\n  - address: h1:3389\n  - address: h1:3389\n",
            "farm.yaml:3: servers[1].address: server h1:3389",
        ),
        (
            "servers:\n  - address: h1:3389\n    pool: Nope\n",
            "farm.yaml:3: servers[0].pool: unknown pool 'Nope'",
        ),
        ("servers:\n  - address: h1\n    agent_url: ftp://x\n", "servers[0].agent_url: expected an http"),
        ("pools:\n  - name: a\n  - name: b\n", "exactly one pool must have `default: true` (0 do)"),
        ("pools:\n  - name: a\n    disconnect_timeout: soon\n", "farm.yaml:3: pools[0].disconnect_timeout"),
        ("pools:\n  - name: a\n    default: yes please\n", "pools[0].default: expected true or false"),
        ("pools: 3\n", "farm.yaml:1: pools: expected a list"),
        ("nodes: []\n", "farm.yaml:1: farm.nodes: unknown field"),
        ("servers: [\n", "farm.yaml:2: not valid YAML"),
        ("", "the file is empty"),
    ],
)
def test_errors_name_the_line_and_field(text, expected):
    with pytest.raises(FarmError) as info:
        load_farm(text)
    assert expected in str(info.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(FarmError) as info:
        load_farm("servers:\n  - address: h1\n    weight: x\n  - address: h2\n    max_sessions: -3\n")
    assert len(str(info.value).splitlines()) == 2


@pytest.mark.parametrize(
    ("value", "seconds"), [("8h", 28800.0), ("1h30m", 5400.0), ("90s", 90.0), ("2d", 172800.0), (600, 600.0)]
)
def test_durations(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["", "0s", "h", "8 hours", -5, True])
def test_bad_durations(value):
    assert parse_duration(value) is None
