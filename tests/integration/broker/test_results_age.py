"""Health results that age (a stale result reads as none) and load reports that keep counting the
placements they cannot show yet, on a real PostgreSQL, on both Route paths."""

from __future__ import annotations

from datetime import timedelta

import pytest

from rdbroker_broker import domain as d
from rdbroker_broker.errors import NoCapacity
from rdbroker_broker.probing import ProbeService
from rdbroker_broker.service import BrokerService
from tests.integration.broker.conftest import Clock, assert_live_counters_exact, seed, server

A, B = "10.0.0.1:3389", "10.0.0.2:3389"
STALE_AFTER_MS = 5_000
_n = iter(range(1_000_000))


def req(cookie: str) -> d.RouteRequest:
    return d.RouteRequest(connection_id=f"conn-{next(_n)}", proxy_id="p1", cookie=cookie)


def pool(**kw: object) -> tuple[d.Pool, ...]:
    return (d.Pool("default", True, 3600.0, **kw),)  # type: ignore[arg-type]


@pytest.fixture(params=["fast", "transactional"])
def routes(request: pytest.FixtureRequest, service: BrokerService, monkeypatch: pytest.MonkeyPatch):
    """The service, routing on PostgreSQL's one-statement path or on the transactional one only."""
    if request.param == "transactional":

        async def no_fast_path(*args: object) -> None:
            return None

        monkeypatch.setattr(service.routing.fast, "route", no_fast_path)
    return service


async def report(probes: ProbeService, address: str, **kw) -> None:
    assert await probes.claim_targets("h1", 60_000)
    result = d.ProbeResult(
        address=address,
        health=kw.pop("health", d.Health.UP),
        rdp_ok=True,
        rdp_detail="neg_rsp",
        load=kw.pop("load", -1),
        agent_state=kw.pop("agent_state", d.AgentState.NONE),
        agent_detail="",
        probed_at=kw.pop("probed_at", None),
    )
    assert await probes.report_results("h1", [result]) == []


async def stored(service: BrokerService, address: str) -> d.Server:
    return {s.address: s for s in await service.list_servers()}[address]


# --- D: results that age -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "stale_after_s"),
    [
        ({"stale_after_ms": STALE_AFTER_MS}, 5.0),
        ({}, 3 * 2.0 + 10.0),  # three of the broker's probe intervals (2 s) plus its lease (10 s)
        ({"probe_interval_ms": 500}, 3 * 0.5 + 10.0),  # the pool's probe interval
    ],
)
async def test_a_result_counts_for_stale_after(service, engine, probes, clock, settings, stale_after_s):
    await seed(engine, server(A), pools=pool(**settings))
    await report(probes, A, health=d.Health.DOWN)
    down = await stored(service, A)
    assert down.probed_at == clock.now
    assert down.fresh_until == clock.now + timedelta(seconds=stale_after_s)
    # The sample's own time counts, never one ahead of the broker's clock.
    await report(probes, A, probed_at=clock.now - timedelta(seconds=1))
    assert (await stored(service, A)).fresh_until == clock.now + timedelta(seconds=stale_after_s - 1)
    await report(probes, A, probed_at=clock.now + timedelta(hours=1))
    assert (await stored(service, A)).fresh_until == clock.now + timedelta(seconds=stale_after_s)


async def test_a_down_server_nobody_probes_any_more_becomes_routable(routes, engine, probes, clock: Clock):
    """Its replicas died: after stale_after its health reads unknown, as for a server never probed,
    so it takes new users and reconnects again; until then the result holds."""
    await seed(engine, server(A), server(B), pools=pool(stale_after_ms=STALE_AFTER_MS))
    alice = await routes.route(req("alice"))
    assert alice.server_address == A  # both unknown and empty: address order
    await report(probes, A, health=d.Health.DOWN)
    await report(probes, B)
    placed = [(await routes.route(req(f"n{i}"))).server_address for i in range(3)]
    assert placed == [B] * 3  # fresh results are used

    clock.advance(STALE_AFTER_MS / 1000 - 0.001)  # B's result is as old as A's
    assert (await routes.route(req("still"))).server_address == B
    clock.advance(0.001)  # both results are stale now: A (1 session) beats B (4)
    again = await routes.route(req("alice"))
    assert (again.reason, again.server_address, again.session_id) == (
        d.RouteReason.RECONNECT,
        A,
        alice.session_id,
    )
    assert (await routes.route(req("later"))).server_address == A
    await assert_live_counters_exact(engine)


async def test_a_full_server_is_used_again_once_its_load_is_stale(routes, engine, probes, clock: Clock):
    await seed(engine, server(A), server(B), pools=pool(stale_after_ms=STALE_AFTER_MS))
    await report(probes, A, load=100, agent_state=d.AgentState.UP)
    await report(probes, B, load=40, agent_state=d.AgentState.UP)
    assert [(await routes.route(req(f"n{i}"))).server_address for i in range(3)] == [B] * 3

    clock.advance(STALE_AFTER_MS / 1000)
    # No load figure counts any more: session counts stand in (A has none, B three).
    assert (await routes.route(req("later"))).server_address == A
    # A fresh report counts again.
    await report(probes, A, load=100, agent_state=d.AgentState.UP)
    await report(probes, B, load=40, agent_state=d.AgentState.UP)
    assert (await routes.route(req("after"))).server_address == B


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"health": d.Health.DOWN}, "1 down"),
        ({"agent_state": d.AgentState.DOWN}, "1 down"),
        ({"agent_state": d.AgentState.DRAIN}, "1 draining"),
        ({"agent_state": d.AgentState.MAINT}, "1 maintenance"),
        ({"load": 100}, "1 full"),
    ],
)
async def test_a_stale_result_closes_no_server(routes, engine, probes, clock: Clock, kw, reason):
    await seed(engine, server(A), pools=pool(stale_after_ms=STALE_AFTER_MS))
    await report(probes, A, **kw)
    with pytest.raises(NoCapacity, match=reason):
        await routes.route(req("y"))
    clock.advance(STALE_AFTER_MS / 1000)
    assert (await routes.route(req("y"))).server_address == A


async def test_a_stale_result_of_a_full_farm_says_so(routes, engine, probes, clock: Clock):
    """Why nothing takes a user is said of the servers as routing sees them: a stale `down` is not
    down, a server at its session limit is full whatever its last result said."""
    await seed(engine, server(A, max_sessions=1), pools=pool(stale_after_ms=STALE_AFTER_MS))
    await routes.route(req("first"))
    await report(probes, A, health=d.Health.DOWN)
    with pytest.raises(NoCapacity, match=r"\(1 down\)"):
        await routes.route(req("y"))
    clock.advance(STALE_AFTER_MS / 1000)
    with pytest.raises(NoCapacity, match=r"\(1 full\)"):
        await routes.route(req("y"))


# --- E: load reports keep counting the placements they cannot show yet -------------------------


async def test_a_load_report_keeps_counting_recent_placements(routes, engine, probes, clock: Clock):
    """Placements made after a report's sample time less the pool's logon lag count on top of its
    load: the users just placed are not in the agent's figure yet. Older ones are."""
    await seed(engine, server(A, max_sessions=10), server(B, max_sessions=10), pools=pool(logon_lag_s=30))
    await report(probes, A, load=0, agent_state=d.AgentState.UP)
    await report(probes, B, load=15, agent_state=d.AgentState.UP)
    assert (await routes.route(req("u1"))).server_address == A  # 0 + 10 after
    assert (await routes.route(req("u2"))).server_address == A  # 10 + 10 = 20 after
    assert (await routes.route(req("u3"))).server_address == B  # 15 + 10 = 25 after
    clock.advance(5)
    await report(probes, B, load=15, agent_state=d.AgentState.UP)  # u3 is not in that figure yet
    assert (await stored(routes, B)).placements_since_report == 1
    assert (await routes.route(req("u4"))).server_address == A  # 20 < 25
    clock.advance(30)
    # Sampled 30 s after u1..u4: their logons are in these figures.
    await report(probes, A, load=30, agent_state=d.AgentState.UP)
    await report(probes, B, load=25, agent_state=d.AgentState.UP)
    assert [(await stored(routes, s)).placements_since_report for s in (A, B)] == [0, 0]
    assert (await routes.route(req("u5"))).server_address == B
    await assert_live_counters_exact(engine)


async def test_a_report_sampled_before_placements_counts_them_all(service, engine, probes, clock: Clock):
    """The window runs from the sample time (the replica's), not the time the report arrives."""
    await seed(engine, server(A), pools=pool(logon_lag_s=10))
    sampled = clock.now
    for i in range(3):
        clock.advance(4)
        await service.route(req(f"u{i}"))  # at +4, +8, +12 s
    clock.advance(8)  # the report arrives at +20 s
    await report(probes, A, load=50, probed_at=sampled + timedelta(seconds=15))
    assert (await stored(service, A)).placements_since_report == 2  # after +5 s
    await report(probes, A, load=50, probed_at=sampled)
    assert (await stored(service, A)).placements_since_report == 3


async def test_claims_that_never_were_sessions_do_not_count(service, engine, probes, clock: Clock):
    """A placement whose connection never reached the server (closed before open, connect failed,
    expired pending) or carried nothing (`abandoned`) never shows in a load: a report leaves it out.
    A session that opened and closed normally still counts (its logon may be on its way)."""
    await seed(engine, server(A), pools=pool(logon_lag_s=30))
    kept = await service.route(d.RouteRequest(connection_id="c-kept", cookie="kept"))
    await service.connection_opened(kept.session_id, "c-kept", "p1")
    await service.connection_closed(
        kept.session_id, "c-kept", bytes_from_server=6308, end_reason="client_closed"
    )  # a logon's worth of bytes: fewer would end it as junk
    pending = await service.route(req("pending"))
    early = await service.route(d.RouteRequest(connection_id="c-early", cookie="early"))
    await service.connection_closed(early.session_id, "c-early", end_reason="client_closed_early")
    failed = await service.route(d.RouteRequest(connection_id="c-failed", cookie="failed"))
    await service.connection_closed(failed.session_id, "c-failed", end_reason="connect_failed")
    junk = await service.route(d.RouteRequest(connection_id="c-junk", cookie="junk"))
    await service.connection_opened(junk.session_id, "c-junk", "p1")
    await service.end_session(junk.session_id, "abandoned")
    logged_off = await service.route(d.RouteRequest(connection_id="c-off", cookie="off"))
    await service.connection_opened(logged_off.session_id, "c-off", "p1")
    await service.end_session(logged_off.session_id, "logged_off")
    assert (await stored(service, A)).placements_since_report == 6  # the trigger counts every one

    await report(probes, A, load=10)
    assert (await stored(service, A)).placements_since_report == 3  # kept, pending, logged_off
    assert pending.server_address == A
    await assert_live_counters_exact(engine)


async def test_a_result_without_load_keeps_the_count(service, engine, probes):
    await seed(engine, server(A))
    await report(probes, A, load=20)
    await service.route(req("u1"))
    await report(probes, A, load=-1)  # the agent did not answer: nothing new to recount against
    assert (await stored(service, A)).placements_since_report == 1
