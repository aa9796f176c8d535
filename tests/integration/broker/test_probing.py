"""Probe leases, probe results, reconciliation with servers' session lists, and silent proxies."""

from __future__ import annotations

import pytest

from rdbroker_broker import domain as d
from rdbroker_broker.errors import InvalidInput, PermissionDenied
from tests.integration.broker.conftest import assert_live_counters_exact, seed, server

SERVERS = [f"10.0.2.{i}:3389" for i in range(1, 6)]
A = SERVERS[0]


def addresses(targets) -> set[str]:
    return {s.address for s in targets}


async def test_leases_share_the_farm_and_a_dead_replicas_servers_are_reclaimed(probes, engine, clock):
    await seed(engine, *(server(a) for a in SERVERS))
    first = addresses(await probes.claim_targets("r1", 10_000))
    assert first == set(SERVERS)  # alone: everything

    assert addresses(await probes.claim_targets("r2", 10_000)) == set()  # r1 still holds them all
    kept = addresses(await probes.claim_targets("r1", 10_000))  # r1 gives back beyond its fair share
    assert len(kept) == 3
    second = addresses(await probes.claim_targets("r2", 10_000))
    assert len(second) == 2
    assert kept.isdisjoint(second)

    clock.advance(5)
    assert addresses(await probes.claim_targets("r2", 10_000)) == second  # renewed
    clock.advance(6)  # r1 has not renewed for 11 s: its leases and its share are gone
    assert addresses(await probes.claim_targets("r2", 10_000)) == set(SERVERS)


async def test_results_are_taken_only_from_the_lease_holder(probes, service, engine):
    await seed(engine, server(A))
    await probes.claim_targets("r1", 10_000)
    result = d.ProbeResult(A, d.Health.DOWN, False, "timeout", -1, d.AgentState.NONE, "")
    assert await probes.report_results("r2", [result]) == [A]
    assert await probes.report_results(
        "r1", [result, d.ProbeResult("9.9.9.9:3389", d.Health.UP, True, "", 1, d.AgentState.UP, "")]
    ) == ["9.9.9.9:3389"]
    [stored] = await service.list_servers()
    assert (stored.health, stored.health_detail) == (d.Health.DOWN, "timeout")
    assert stored.health_changed_at is not None


async def test_bad_replica_id_is_invalid(probes):
    with pytest.raises(InvalidInput):
        await probes.claim_targets("", 10_000)
    with pytest.raises(InvalidInput):
        await probes.claim_targets("r1", 29)


async def reconcile(probes, reported: list[tuple[str, d.SessionState]]):
    return await probes.report_sessions("r1", A, [d.ReportedSession(u, s) for u, s in reported])


async def test_reconciliation_ends_logged_off_users_and_records_unknown_ones(probes, service, engine, clock):
    await seed(engine, server(A))
    await probes.claim_targets("r1", 60_000)
    gone = await service.route(d.RouteRequest("c1", cookie="gone"))
    await service.connection_opened(gone.session_id, "c1", "p1")
    stays = await service.route(d.RouteRequest("c2", cookie="CORP\\stays"))
    await service.connection_opened(stays.session_id, "c2", "p1")
    clock.advance(1)
    # The server lists both: they are confirmed sessions now, no longer claims.
    confirmed = await reconcile(
        probes, [("gone", d.SessionState.ACTIVE), ("corp\\STAYS", d.SessionState.ACTIVE)]
    )
    assert confirmed == d.ReconcileCounts()
    clock.advance(1)

    counts = await reconcile(
        probes, [("corp\\STAYS", d.SessionState.ACTIVE), ("CORP\\new", d.SessionState.DISCONNECTED)]
    )
    assert (counts.ended, counts.recorded, counts.linked) == (1, 1, 0)
    [ended] = await service.lookup_user_sessions("gone", include_ended=True)
    assert (ended.state, ended.end_reason) == (d.SessionState.ENDED, "logged_off")
    [learnt] = await service.lookup_user_sessions("corp\\new")
    assert (learnt.server_address, learnt.state) == (A, d.SessionState.DISCONNECTED)
    # The recorded session now steers the user back to their server.
    assert (await service.route(d.RouteRequest("c3", cookie="CORP\\New"))).reason is d.RouteReason.RECONNECT
    # A second identical report changes nothing.
    again = await reconcile(
        probes, [("corp\\STAYS", d.SessionState.ACTIVE), ("CORP\\new", d.SessionState.DISCONNECTED)]
    )
    assert again == d.ReconcileCounts()
    await assert_live_counters_exact(engine)


async def test_a_logon_in_progress_is_not_ended(probes, service, engine):
    await seed(engine, server(A))
    await probes.claim_targets("r1", 60_000)
    await service.route(d.RouteRequest("c1", cookie="fresh"))
    assert (await reconcile(probes, [])).ended == 0


async def test_truncated_cookie_is_linked_to_the_full_name(probes, service, engine, clock):
    await seed(engine, server(A))
    await probes.claim_targets("r1", 60_000)
    routed = await service.route(d.RouteRequest("c1", cookie="FTBCO\\A70"))
    await service.connection_opened(routed.session_id, "c1", "p1")
    clock.advance(60)
    counts = await reconcile(probes, [("FTBCO\\A7006799", d.SessionState.ACTIVE)])
    assert (counts.linked, counts.ended, counts.recorded) == (1, 0, 0)
    [linked] = await service.lookup_user_sessions("ftbco\\a7006799")
    assert linked.session_id == routed.session_id
    # mstsc keeps sending the truncated cookie: it still reaches the linked session.
    again = await service.route(d.RouteRequest("c2", cookie="FTBCO\\A70"))
    assert (again.reason, again.session_id) == (d.RouteReason.RECONNECT, routed.session_id)


async def test_ambiguous_truncated_cookie_is_kept_and_counted(probes, service, engine, clock):
    await seed(engine, server(A))
    await probes.claim_targets("r1", 60_000)
    routed = await service.route(d.RouteRequest("c1", cookie="CORP\\anna"))
    await service.connection_opened(routed.session_id, "c1", "p1")
    clock.advance(60)
    counts = await reconcile(
        probes, [("CORP\\annabeth", d.SessionState.ACTIVE), ("CORP\\annabel", d.SessionState.ACTIVE)]
    )
    assert (counts.ambiguous, counts.linked, counts.ended) == (1, 0, 0)
    assert probes.ambiguous_total == 1
    [kept] = await service.lookup_user_sessions("CORP\\anna")
    assert kept.state is d.SessionState.ACTIVE


async def test_session_reports_need_the_lease(probes, engine):
    await seed(engine, server(A))
    with pytest.raises(PermissionDenied):
        await reconcile(probes, [])


async def test_silent_proxy_sessions_become_disconnected(service, engine, clock):
    await seed(engine, server(A), server("10.0.2.9:3389"))
    await service.proxy_heartbeat("p-alive", 1)
    await service.proxy_heartbeat("p-dead", 1)
    alive = await service.route(d.RouteRequest("c1", proxy_id="p-alive", cookie="u1"))
    dead = await service.route(d.RouteRequest("c2", proxy_id="p-dead", cookie="u2"))
    await service.connection_opened(alive.session_id, "c1", "p-alive")
    await service.connection_opened(dead.session_id, "c2", "p-dead")

    clock.advance(10)
    await service.proxy_heartbeat("p-alive", 1)
    assert (await service.sweep())["disconnected"] == 0  # 10 s < 3 intervals of 5 s
    clock.advance(6)
    await service.proxy_heartbeat("p-alive", 1)
    assert (await service.sweep())["disconnected"] == 1
    [s1] = await service.lookup_user_sessions("u1")
    [s2] = await service.lookup_user_sessions("u2")
    assert (s1.state, s2.state) == (d.SessionState.ACTIVE, d.SessionState.DISCONNECTED)
    # The user keeps their server when they come back through another proxy.
    back = await service.route(d.RouteRequest("c3", proxy_id="p-alive", cookie="U2"))
    assert (back.reason, back.server_address) == (d.RouteReason.RECONNECT, dead.server_address)
    assert (await service.sweep())["disconnected"] == 0  # idempotent


async def test_heartbeat_listing_connections_disconnects_sessions_whose_close_was_lost(
    service, engine, clock
):
    await seed(engine, server(A))
    kept = await service.route(d.RouteRequest("c1", proxy_id="p1", cookie="u1"))
    lost = await service.route(d.RouteRequest("c2", proxy_id="p1", cookie="u2"))
    await service.connection_opened(kept.session_id, "c1", "p1")
    await service.connection_opened(lost.session_id, "c2", "p1")
    await service.proxy_heartbeat("p1", 1, ["c1"])  # just opened: not judged yet
    assert {s.state for s in await service.lookup_user_sessions("u2")} == {d.SessionState.ACTIVE}
    clock.advance(6)
    await service.proxy_heartbeat("p1", 2, ["c1"])  # an incomplete list judges nothing
    assert {s.state for s in await service.lookup_user_sessions("u2")} == {d.SessionState.ACTIVE}
    await service.proxy_heartbeat("p1", 1, ["c1"])
    assert {s.state for s in await service.lookup_user_sessions("u2")} == {d.SessionState.DISCONNECTED}
    assert {s.state for s in await service.lookup_user_sessions("u1")} == {d.SessionState.ACTIVE}


async def test_a_heartbeat_may_list_many_connections(service, engine, clock):
    await seed(engine, server(A))
    routed = await service.route(d.RouteRequest("keep", proxy_id="p1", cookie="u1"))
    await service.connection_opened(routed.session_id, "keep", "p1")
    clock.advance(6)
    ids = ["keep", *(f"other-{i}" for i in range(29_999))]
    await service.proxy_heartbeat("p1", len(ids), ids)
    assert {s.state for s in await service.lookup_user_sessions("u1")} == {d.SessionState.ACTIVE}
    with pytest.raises(InvalidInput, match="too many connection_ids"):
        await service.proxy_heartbeat("p1", 30_001, [*ids, "x", "y"])
