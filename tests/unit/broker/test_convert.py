"""The gRPC messages carry what REST shows: a session's `confirmed`, a server's held sessions, the time
of its last health result, and a stale result as HEALTH_STATE_UNKNOWN with `stale` set."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from rdbroker_broker import domain as d
from rdbroker_broker.rpc import convert
from rdbroker_proto.v1 import broker_pb2 as pb

NOW = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)
PROBED = NOW - timedelta(minutes=2)


def probed_server(fresh_until: datetime | None) -> d.Server:
    return d.Server(
        address="10.0.0.1:3389",
        pool="default",
        health=d.Health.DOWN,
        agent_state=d.AgentState.UP,
        load=40,
        live_sessions=3,
        held_sessions=2,
        probed_at=PROBED,
        fresh_until=fresh_until,
    )


def test_a_stale_result_reads_unknown_and_says_when_it_was() -> None:
    msg = convert.server(probed_server(NOW - timedelta(seconds=1)), NOW)
    assert (msg.health, msg.load, msg.stale) == (pb.HEALTH_STATE_UNKNOWN, -1, True)
    assert msg.probed_at.ToDatetime(tzinfo=UTC) == PROBED
    assert (msg.live_sessions, msg.held_sessions) == (3, 2)


def test_a_fresh_result_is_shown_as_it_is() -> None:
    msg = convert.server(probed_server(NOW + timedelta(seconds=1)), NOW)
    assert (msg.health, msg.load, msg.stale) == (pb.HEALTH_STATE_DOWN, 40, False)


def test_a_server_never_probed_has_no_probed_at() -> None:
    msg = convert.server(d.Server(address="10.0.0.2:3389", pool="default"), NOW)
    assert (msg.HasField("probed_at"), msg.stale, msg.health) == (False, False, pb.HEALTH_STATE_UNKNOWN)


def test_sessions_carry_confirmed() -> None:
    base = d.Session("s1", "alice", "default", "10.0.0.1:3389", d.SessionState.ACTIVE, NOW, NOW)
    assert convert.session(base).confirmed is False
    assert convert.session(d.Session(**{**base.__dict__, "confirmed": True})).confirmed is True


def test_a_server_carries_its_power_state() -> None:
    for state, wire in convert.POWER.items():
        msg = convert.server(d.Server(address="10.0.0.2:3389", pool="default", power=state), NOW)
        assert msg.power == wire
    assert set(convert.POWER.values()) == set(pb.PowerState.values()) - {pb.POWER_STATE_UNSPECIFIED}
