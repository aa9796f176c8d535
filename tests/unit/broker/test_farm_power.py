"""A pool's `power:` hooks in the farm file: read with their defaults, every bad value refused on its line."""

from __future__ import annotations

import pytest

from rdbroker_broker.farm import FarmError, load_farm, show_power
from rdbroker_broker.power_rules import PoolPower


def farm(power: str, *, max_sessions: str = "max_sessions: 5") -> str:
    return f"""\
pools:
  - name: lab
    default: true
    power:
{power}
servers:
  - {{address: 10.0.0.1, {max_sessions}}}
"""


FULL = """\
      start: {url: "https://hooks.example/start?code=k3y", min_free_sessions: 10, timeout: 5m}
      stop: {url: "https://hooks.example/stop", idle_for: 30m, keep_running: 2, timeout: 2m}
      start_wait: 45s"""


def test_every_setting_is_read() -> None:
    parsed = load_farm(farm(FULL))
    assert parsed.power == {
        "lab": PoolPower(
            "lab",
            start_url="https://hooks.example/start?code=k3y",
            min_free_sessions=10,
            start_timeout_s=300.0,
            start_wait_s=45.0,
            stop_url="https://hooks.example/stop",
            idle_for_s=1800.0,
            keep_running=2,
            stop_timeout_s=120.0,
        )
    }
    # The plan line leaves out the query (it may hold a key).
    assert show_power(parsed.power["lab"]) == (
        "start https://hooks.example/start below 10 free sessions, users wait 45s; "
        "stop https://hooks.example/stop after 30m idle, keeping 2"
    )


def test_defaults_and_a_loopback_http_receiver() -> None:
    parsed = load_farm(farm("      start: {url: 'http://127.0.0.1:9000/start', min_free_sessions: 1}"))
    assert parsed.power["lab"] == PoolPower(
        "lab", start_url="http://127.0.0.1:9000/start", min_free_sessions=1
    )
    assert parsed.power["lab"].start_wait_s == 20.0


def test_a_pool_without_power_has_none() -> None:
    assert load_farm("pools: [{name: lab}]\n").power == {}


@pytest.mark.parametrize(
    ("power", "where", "message"),
    [
        (
            "      start: {url: 'http://hooks.example/start', min_free_sessions: 1}",
            "pools[0].power.start.url",
            "plain http:// only to a loopback address",
        ),
        ("      start: {url: 'ftp://x/start', min_free_sessions: 1}", "pools[0].power.start.url", "https://"),
        (
            "      start: {url: 'https://u:p@hooks.example/', min_free_sessions: 1}",
            "pools[0].power.start.url",
            "no credentials in the URL",
        ),
        (
            "      start: {url: 'https://h/', min_free_sessions: 0}",
            "pools[0].power.start.min_free_sessions",
            "expected an integer from 1 to",
        ),
        (
            "      start: {url: 'https://h/', min_free_sessions: ten}",
            "pools[0].power.start.min_free_sessions",
            "expected an integer",
        ),
        ("      start: {url: 'https://h/'}", "pools[0].power.start.min_free_sessions", "required"),
        ("      start: {min_free_sessions: 2}", "pools[0].power.start.url", "required"),
        (
            "      start: {url: 'https://h/', min_free_sessions: 1, timeout: soon}",
            "pools[0].power.start.timeout",
            "expected a duration like 30s or 30m",
        ),
        (
            "      stop: {url: 'https://h/', idle_for: 30 minutes, keep_running: 1}",
            "pools[0].power.stop.idle_for",
            "expected a duration",
        ),
        (
            "      stop: {url: 'https://h/', idle_for: 0s, keep_running: 1}",
            "pools[0].power.stop.idle_for",
            "expected a duration",
        ),
        (
            "      stop: {url: 'https://h/', idle_for: 30m, keep_running: -1}",
            "pools[0].power.stop.keep_running",
            "expected an integer from 0",
        ),
        (
            "      stop: {url: 'https://h/', idle_for: 30m}",
            "pools[0].power.stop.keep_running",
            "must keep at least 1 server running",
        ),
        (
            "      start: {url: 'https://h/', min_free_sessions: 1}\n      start_wait: 10m",
            "pools[0].power.start_wait",
            "1s to 5m",
        ),
        (
            "      stop: {url: 'https://h/', idle_for: 30m, keep_running: 1}\n      start_wait: 10s",
            "pools[0].power.start_wait",
            "needs a `start` hook",
        ),
        ("      wake: {url: 'https://h/'}", "pools[0].power.wake", "unknown field"),
        ("      {}", "pools[0].power", "expected a `start` hook, a `stop` hook or both"),
    ],
)
def test_bad_settings_are_refused_on_their_line(power: str, where: str, message: str) -> None:
    with pytest.raises(FarmError) as refused:
        load_farm(farm(power), "farm.yaml")
    text = str(refused.value)
    assert f": {where}: " in text
    assert message in text
    assert text.startswith("farm.yaml:5") or text.startswith("farm.yaml:6")


def test_a_start_hook_needs_a_limit_on_every_server_of_its_pool() -> None:
    power = "      start: {url: 'https://h/', min_free_sessions: 1}"
    with pytest.raises(
        FarmError, match=r"farm.yaml:7: servers\[0\].max_sessions: pool 'lab' has a power start hook"
    ):
        load_farm(farm(power, max_sessions="weight: 100"), "farm.yaml")
    # A stop hook alone counts no capacity: no limit needed.
    load_farm(
        farm("      stop: {url: 'https://h/', idle_for: 30m, keep_running: 1}", max_sessions="weight: 1")
    )
