"""Capacity on demand's pure rules, case by case, and the hooks' signature."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from rdbroker_broker import domain as d
from rdbroker_broker import power_rules as rules
from rdbroker_broker.power_hooks import HookClient
from rdbroker_common import power as signing

NOW = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
LATER = NOW + timedelta(hours=1)
ON, STARTING, STOPPING, OFF = d.PowerState


def item(
    address: str = "a:3389",
    power: d.PowerState = ON,
    *,
    health: d.Health = d.Health.UP,
    probed_at: datetime | None = NOW,
    changed_at: datetime | None = None,
    deadline: datetime | None = None,
    drained: bool = False,
    idle_since: datetime | None = None,
    **server: object,
) -> rules.PowerServer:
    s = d.Server(address, "p", health=health, probed_at=probed_at, fresh_until=LATER, power=power, **server)  # type: ignore[arg-type]
    return rules.PowerServer(s, changed_at, deadline, drained, idle_since)


START = rules.PoolPower("p", start_url="https://h/start", min_free_sessions=3)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (item(power=ON, health=d.Health.DOWN), OFF),  # no probe reaches it
        (item(power=ON), None),
        (item(power=ON, health=d.Health.UNKNOWN), None),
        (item(power=STARTING, health=d.Health.UP, changed_at=NOW - timedelta(seconds=1)), ON),
        (item(power=STARTING, health=d.Health.UP, changed_at=NOW), None),  # a result from before the start
        (item(power=STARTING, health=d.Health.DOWN, deadline=NOW + timedelta(minutes=1)), None),
        (item(power=STARTING, health=d.Health.DOWN, deadline=NOW), OFF),  # given up
        (item(power=STOPPING, health=d.Health.DOWN, changed_at=NOW - timedelta(seconds=1)), OFF),
        (item(power=STOPPING, health=d.Health.UP, deadline=NOW + timedelta(minutes=1)), None),
        (item(power=STOPPING, health=d.Health.UP, deadline=NOW), ON),  # the stop did not stop it
        (item(power=OFF, health=d.Health.UP, changed_at=NOW - timedelta(seconds=1)), ON),  # back by itself
        (item(power=OFF, health=d.Health.DOWN), None),
    ],
)
def test_what_the_probes_say_of_power(given: rules.PowerServer, expected: d.PowerState | None) -> None:
    assert rules.observed(given, NOW) == expected


def test_a_stale_result_says_nothing() -> None:
    stale = item(power=ON, health=d.Health.DOWN)
    assert rules.observed(stale, LATER + timedelta(seconds=1)) is None


def test_start_below_the_minimum_only() -> None:
    on = item("a:1", max_sessions=5, held_sessions=2)  # 3 free
    off = item("b:1", OFF, health=d.Health.DOWN, max_sessions=5)
    assert rules.to_start([on, off], START, NOW) is None
    busier = item("a:1", max_sessions=5, held_sessions=3)  # 2 free
    assert rules.to_start([busier, off], START, NOW) == off


def test_a_server_being_started_counts_for_what_it_will_offer() -> None:
    full = item("a:1", max_sessions=5, held_sessions=5)
    starting = item("b:1", STARTING, health=d.Health.DOWN, max_sessions=5)
    off = item("c:1", OFF, health=d.Health.DOWN, max_sessions=5)
    assert rules.to_start([full, starting, off], START, NOW) is None
    small = item("b:1", STARTING, health=d.Health.DOWN, max_sessions=2)
    assert rules.to_start([full, small, off], START, NOW) == off


def test_which_stopped_server_starts() -> None:
    full = item("a:1", max_sessions=1, held_sessions=1)
    maintenance = item("b:1", OFF, max_sessions=5, admin_state=d.AdminState.MAINTENANCE)
    drained_by_operator = item("c:1", OFF, max_sessions=5, admin_state=d.AdminState.DRAINING)
    drained_by_loop = item("d:1", OFF, max_sessions=5, admin_state=d.AdminState.DRAINING, drained=True)
    failed_lately = item("e:1", OFF, max_sessions=5, changed_at=NOW)
    never = item("f:1", OFF, max_sessions=5, weight=0)
    servers = [full, maintenance, drained_by_operator, failed_lately, drained_by_loop, never]
    assert rules.to_start(servers, START, NOW) == drained_by_loop


def test_no_start_hook_no_start() -> None:
    power = rules.PoolPower("p", stop_url="https://h/stop", idle_for_s=60, keep_running=1)
    assert rules.to_start([item("b:1", OFF, health=d.Health.DOWN)], power, NOW) is None


STOP = rules.PoolPower("p", stop_url="https://h/stop", idle_for_s=1800, keep_running=1)


def test_stop_the_server_idle_longest_beyond_keep_running() -> None:
    long_idle = item("b:1", idle_since=NOW - timedelta(hours=2))
    idle = item("c:1", idle_since=NOW - timedelta(hours=1))
    busy = item("a:1", live_sessions=1)
    assert rules.to_stop([busy, idle, long_idle], STOP, NOW) == long_idle
    assert rules.to_stop([idle], STOP, NOW) is None  # keep_running 1
    lately = item("c:1", idle_since=NOW - timedelta(minutes=29))
    assert rules.to_stop([busy, lately], STOP, NOW) is None
    drained = item("c:1", idle_since=NOW - timedelta(hours=1), admin_state=d.AdminState.DRAINING)
    assert rules.to_stop([busy, drained], STOP, NOW) is None  # the operator's: left alone


def test_no_stop_that_would_fall_below_the_start_minimum() -> None:
    both = rules.PoolPower(
        "p",
        start_url="https://h/s",
        min_free_sessions=4,
        stop_url="https://h/t",
        idle_for_s=60,
        keep_running=0,
    )
    idle = [item(f"{n}:1", max_sessions=2, idle_since=NOW - timedelta(hours=1)) for n in "abc"]
    assert rules.to_stop(idle, both, NOW) == idle[0]  # 6 free -> 4
    assert rules.to_stop(idle[:2], both, NOW) is None  # 4 free -> 2: below the minimum


def test_a_user_waits_only_for_a_start_under_way_or_to_come() -> None:
    power = rules.PoolPower("p", start_url="https://h/s", min_free_sessions=1, start_wait_s=30)
    full = item("a:1", max_sessions=1, held_sessions=1)
    assert rules.start_wait([full, item("b:1", STARTING)], power) == 30
    assert rules.start_wait([full, item("b:1", OFF, health=d.Health.DOWN)], power) == 30
    assert rules.start_wait([full], power) == 0
    assert rules.start_wait([full, item("b:1", OFF)], None) == 0


def test_the_signature_is_checked_as_documented() -> None:
    client = HookClient("s" * 32, clock=lambda: 1_765_000_000)
    body, headers = client.request({"action": "start", "server": "10.0.0.1:3389"}, "d1")
    assert body == b'{"action":"start","server":"10.0.0.1:3389"}'
    assert headers[signing.TIMESTAMP_HEADER] == "1765000000"
    import hashlib
    import hmac

    expected = hmac.new(b"s" * 32, b"1765000000." + body, hashlib.sha256).hexdigest()
    assert headers[signing.SIGNATURE_HEADER] == f"sha256={expected}"
    good = (headers[signing.TIMESTAMP_HEADER], headers[signing.SIGNATURE_HEADER])
    assert signing.verify(b"s" * 32, body, *good, now=1_765_000_100) == ""
    assert signing.verify(b"t" * 32, body, *good, now=1_765_000_100) == "bad signature"
    assert signing.verify(b"s" * 32, body + b" ", *good, now=1_765_000_100) == "bad signature"
    assert "replay" in signing.verify(b"s" * 32, body, *good, now=1_765_000_400)
    assert "missing" in signing.verify(b"s" * 32, body, None, good[1], now=1_765_000_000)


@pytest.mark.parametrize(
    ("metadata", "seconds"),
    [
        ((("rdbroker-start-wait-ms", "20000"),), 20.0),
        ((("other", "1"),), 0.0),
        ((("rdbroker-start-wait-ms", "lots"),), 0.0),
        ((("rdbroker-start-wait-ms", "99999999"),), signing.MAX_START_WAIT_S),
        (None, 0.0),
    ],
)
def test_a_broker_asks_the_proxy_to_hold_a_bounded_time(metadata: object, seconds: float) -> None:
    assert signing.start_wait_s(metadata) == seconds  # type: ignore[arg-type]
