"""The routing policy of DESIGN §4, case by case, on a real PostgreSQL."""

from __future__ import annotations

import pytest

from rdbroker_broker import domain as d
from rdbroker_broker.errors import InvalidInput, NoCapacity, NotFound, PermissionDenied, Unavailable
from rdbroker_broker.probing import ProbeService
from rdbroker_rdp.fakeserver import FakeRdpServer
from tests.integration.broker.conftest import assert_live_counters_exact, seed, server

A, B, C = "10.0.0.1:3389", "10.0.0.2:3389", "10.0.0.3:3389"
_n = iter(range(1_000_000))


def req(cookie: str = "", **kw) -> d.RouteRequest:
    return d.RouteRequest(
        connection_id=kw.pop("connection_id", f"conn-{next(_n)}"), proxy_id="p1", cookie=cookie, **kw
    )


async def probe(probes: ProbeService, address: str, **kw) -> None:
    assert await probes.claim_targets("h1", 60_000)
    result = d.ProbeResult(
        address=address,
        health=kw.pop("health", d.Health.UP),
        rdp_ok=True,
        rdp_detail="neg_rsp",
        load=kw.pop("load", -1),
        agent_state=kw.pop("agent_state", d.AgentState.NONE),
        agent_detail="",
    )
    assert await probes.report_results("h1", [result]) == []


async def test_new_session_then_reconnect_case_insensitively(service, engine):
    await seed(engine, server(A), server(B))
    first = await service.route(req("CORP\\Alice"))
    assert first.reason is d.RouteReason.NEW
    again = await service.route(req("corp\\alice"))
    assert again.reason is d.RouteReason.RECONNECT
    assert (again.server_address, again.session_id) == (first.server_address, first.session_id)


async def test_reconnect_to_a_disconnected_session(service, engine):
    await seed(engine, server(A), server(B))
    first = await service.route(req("bob", connection_id="c1"))
    await service.connection_opened(first.session_id, "c1", "p1")
    await service.connection_closed(
        first.session_id, "c1", bytes_from_server=6308, end_reason="client_closed"
    )
    [session] = await service.lookup_user_sessions("bob")
    assert session.state is d.SessionState.DISCONNECTED
    again = await service.route(req("bob"))
    assert again.reason is d.RouteReason.RECONNECT
    assert again.server_address == first.server_address


async def test_logon_storm_spreads_over_servers(service, engine):
    await seed(engine, server(A, max_sessions=50), server(B, max_sessions=50), server(C, max_sessions=50))
    placed = [(await service.route(req(f"user{i}"))).server_address for i in range(30)]
    assert {placed.count(s) for s in (A, B, C)} == {10}


async def test_load_reports_and_weights_decide(service, engine, probes):
    await seed(engine, server(A, weight=100), server(B, weight=300))
    await probe(probes, A, load=20)
    await probe(probes, B, load=30)  # 30/300 < 20/100
    assert (await service.route(req("u1"))).server_address == B


async def test_a_new_load_report_counts_the_placements_it_cannot_show_yet(service, engine, probes, clock):
    await seed(engine, server(A, max_sessions=10), server(B, max_sessions=10))
    await probe(probes, A, load=0)
    await probe(probes, B, load=15)
    assert (await service.route(req("u1"))).server_address == A  # 0 + 10 placed
    assert (await service.route(req("u2"))).server_address == A  # 10 + 10 = 20 > 15 next time
    assert (await service.route(req("u3"))).server_address == B
    await probe(probes, A, load=0)  # sampled within the logon lag: u1, u2 may not be in it yet
    [a, b] = await service.list_servers()
    assert (a.placements_since_report, b.placements_since_report) == (2, 1)
    assert (await service.route(req("u4"))).server_address == A  # 0 + 20 < 15 + 10
    clock.advance(31)
    await probe(probes, B, load=15)  # sampled past the logon lag: u3 shows in it
    assert (await service.route(req("u5"))).server_address == B  # 15 < 0 + 30


async def test_draining_server_takes_reconnects_but_no_new_sessions(service, engine):
    await seed(engine, server(A), server(B))
    first = await service.route(req("carol"))
    await service.set_server_state(first.server_address, d.AdminState.DRAINING)
    assert (await service.route(req("carol"))).server_address == first.server_address
    other = B if first.server_address == A else A
    placed = [(await service.route(req(f"n{i}"))).server_address for i in range(3)]
    assert placed == [other] * 3


async def test_maintenance_and_down_servers_take_nothing(service, engine, probes):
    await seed(engine, server(A), server(B))
    first = await service.route(req("dave"))
    other = B if first.server_address == A else A
    await service.set_server_state(first.server_address, d.AdminState.MAINTENANCE)
    moved = await service.route(req("dave"))
    assert moved.reason is d.RouteReason.NEW
    assert moved.server_address == other
    await service.set_server_state(first.server_address, d.AdminState.ENABLED)
    await probe(probes, other, health=d.Health.DOWN)
    back = await service.route(req("dave"))
    assert back.reason is d.RouteReason.NEW
    assert back.server_address == first.server_address
    ended = [
        s
        for s in await service.lookup_user_sessions("dave", include_ended=True)
        if s.state is d.SessionState.ENDED
    ]
    assert {s.end_reason for s in ended} == {"server_maintenance", "server_down"}


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"health": d.Health.DOWN}, "down"),
        ({"agent_state": d.AgentState.DOWN}, "down"),
        ({"agent_state": d.AgentState.DRAIN}, "draining"),
        ({"agent_state": d.AgentState.MAINT}, "maintenance"),
        ({"load": 100}, "full"),
    ],
)
async def test_probe_results_can_close_a_server(service, engine, probes, kw, reason):
    await seed(engine, server(A))
    assert (await service.route(req("x"))).server_address == A  # unknown health: routable
    await probe(probes, A, **kw)
    with pytest.raises(NoCapacity, match=reason):
        await service.route(req("y"))


async def test_session_limit(service, engine):
    await seed(engine, server(A, max_sessions=2), server(B, max_sessions=1))
    placed = [(await service.route(req(f"u{i}"))).server_address for i in range(3)]
    assert sorted(placed) == [A, A, B]
    with pytest.raises(NoCapacity, match="full"):
        await service.route(req("u4"))
    assert (await service.route(req("u0"))).reason is d.RouteReason.RECONNECT  # full still reconnects


async def test_pending_expires_and_disconnected_expires_after_pool_timeout(service, engine, clock):
    await seed(engine, server(A), server(B), pools=(d.Pool("default", True, 600.0),))
    pending = await service.route(req("erin"))
    clock.advance(service.settings.pending_timeout_s + 1)
    assert (await service.sweep())["expired"] == 1
    [s] = await service.lookup_user_sessions("erin", include_ended=True)
    assert (s.state, s.end_reason) == (d.SessionState.ENDED, "pending_expired")

    routed = await service.route(req("erin", connection_id="c9"))
    assert routed.reason is d.RouteReason.NEW
    assert routed.session_id != pending.session_id
    await service.connection_opened(routed.session_id, "c9", "p1")
    await service.connection_closed(
        routed.session_id, "c9", bytes_from_server=6308, end_reason="client_closed"
    )
    clock.advance(599)
    assert (await service.route(req("erin"))).reason is d.RouteReason.RECONNECT
    clock.advance(2)
    # Expired but not yet swept: Route itself refuses the stale session.
    fresh = await service.route(req("erin"))
    await assert_live_counters_exact(engine)
    assert fresh.reason is d.RouteReason.NEW
    assert fresh.session_id != routed.session_id


async def test_no_identity_is_placed_without_affinity(service, engine):
    await seed(engine, server(A), server(B))
    first = await service.route(req(""))
    second = await service.route(req(""))
    assert first.reason is second.reason is d.RouteReason.NO_IDENTITY
    assert first.session_id != second.session_id
    assert first.server_address != second.server_address


async def test_preconnection_blob_is_an_identity(service, engine):
    await seed(engine, server(A), server(B))
    first = await service.route(req(preconnection_blob=b"vm-42"))
    again = await service.route(req(preconnection_blob=b"VM-42"))
    assert first.reason is d.RouteReason.NEW
    assert again.reason is d.RouteReason.RECONNECT


async def test_token_routes_to_a_registered_server_only(service, engine):
    await seed(engine, server("10.0.0.5:3389"), server(B))
    decision = await service.route(req(routing_token="83886090.15629.0000"))
    assert (decision.reason, decision.server_address) == (d.RouteReason.TOKEN, "10.0.0.5:3389")
    with pytest.raises(PermissionDenied, match=r"172\.31\.249\.216:3389"):
        await service.route(req(routing_token="3640205228.15629.0000"))


async def test_token_to_a_server_in_maintenance_falls_back_to_policy(service, engine):
    await seed(engine, server("10.0.0.5:3389"), server(B))
    await service.set_server_state("10.0.0.5:3389", d.AdminState.MAINTENANCE)
    decision = await service.route(req("frank", routing_token="83886090.15629.0000"))
    assert (decision.reason, decision.server_address) == (d.RouteReason.NEW, B)


async def test_route_is_idempotent_on_connection_id(service, engine):
    await seed(engine, server(A), server(B))
    first = await service.route(req("gina", connection_id="same"))
    again = await service.route(req("gina", connection_id="same"))
    assert again == first
    assert len(await service.lookup_user_sessions("gina", include_ended=True)) == 1
    anon = await service.route(req("", connection_id="anon"))
    assert await service.route(req("", connection_id="anon")) == anon


async def test_retry_after_a_failed_new_placement_moves_and_cleans_up(service, engine):
    await seed(engine, server(A), server(B))
    first = await service.route(req("hank", connection_id="cx"))
    retry = await service.route(
        req("hank", connection_id="cx", attempt=1, failed_server_address=first.server_address)
    )
    assert retry.reason is d.RouteReason.NEW
    assert retry.server_address != first.server_address
    states = {s.session_id: s.state for s in await service.lookup_user_sessions("hank", include_ended=True)}
    assert states == {first.session_id: d.SessionState.ENDED, retry.session_id: d.SessionState.PENDING}


async def test_retry_after_a_failed_reconnect_is_unavailable_while_the_server_answers(
    service, engine, probes
):
    # The proxy could not reach the session's server, but the broker's probe can: not moved.
    async with FakeRdpServer() as a, FakeRdpServer() as b:
        await seed(engine, server(a.address), server(b.address))
        first = await service.route(req("ivy"))
        again = await service.route(req("ivy", connection_id="cy"))
        with pytest.raises(Unavailable, match="not moving"):
            await service.route(
                req("ivy", connection_id="cy", attempt=1, failed_server_address=again.server_address)
            )
        assert sum(s.accepted for s in (a, b)) == 1  # one probe: one handshake, then closed
        [kept] = await service.lookup_user_sessions("ivy")
        assert kept.session_id == first.session_id
        await probe(probes, first.server_address, health=d.Health.DOWN)
        moved = await service.route(
            req("ivy", connection_id="cy", attempt=2, failed_server_address=again.server_address)
        )
        assert moved.reason is d.RouteReason.NEW
        assert moved.server_address != first.server_address
        assert sum(s.accepted for s in (a, b)) == 1  # marked down already: no probe


async def test_unknown_pool_and_missing_default(service, engine):
    with pytest.raises(NotFound, match="no default pool"):
        await service.route(req("x"))
    await seed(engine, server(A), pools=(d.Pool("default", True, 60.0), d.Pool("Sales", False, 60.0)))
    with pytest.raises(NotFound, match="unknown pool 'Nope'"):
        await service.route(req("x", pool="Nope"))
    with pytest.raises(NoCapacity, match="no servers"):
        await service.route(req("x", pool="sales"))  # pools match case-insensitively


@pytest.mark.parametrize(
    "bad",
    [
        req("x" * 300),
        req("a\r\nb"),
        req("ok", routing_token="1.0.0000"),
        req("ok", routing_token="99999999999.1.0"),
        req("ok", pool="x" * 200),
        d.RouteRequest(connection_id=""),
    ],
)
async def test_malformed_input_is_invalid(service, engine, bad):
    await seed(engine, server(A))
    with pytest.raises(InvalidInput):
        await service.route(bad)


async def test_opaque_token_is_tolerated(service, engine):
    await seed(engine, server(A))
    decision = await service.route(req("jo", routing_token="vendor:opaque"))
    assert decision.reason is d.RouteReason.NEW
