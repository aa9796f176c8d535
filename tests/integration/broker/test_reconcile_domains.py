"""Reconciliation against quser-shaped lists (bare names), lists omitting disconnected sessions, and
truncated-cookie ambiguity counted at reconciliation and at Route."""

from __future__ import annotations

import pytest

from rdbroker_broker import domain as d
from rdbroker_broker import metrics
from rdbroker_broker.probing import ProbeService
from rdbroker_proto.v1 import broker_pb2 as pb
from tests.integration.broker.conftest import seed, server

A = "10.0.4.1:3389"


@pytest.fixture
def ambiguous(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    seen: list[tuple[str, int]] = []
    monkeypatch.setattr(
        metrics, "record_truncated_ambiguous", lambda where, count=1: seen.append((where, count))
    )
    return seen


async def open_session(service, connection_id: str, cookie: str) -> d.RouteDecision:
    routed = await service.route(d.RouteRequest(connection_id, cookie=cookie))
    await service.connection_opened(routed.session_id, connection_id, "p1")
    return routed


async def reconcile(probes, reported: list[tuple[str, d.SessionState]], omits_disconnected: bool = False):
    items = [d.ReportedSession(u, s) for u, s in reported]
    return await probes.report_sessions("r1", A, items, omits_disconnected)


@pytest.mark.parametrize("cookie", ["CORP\\alice", "CORP\\alic"])
async def test_a_bare_quser_name_keeps_the_domain_users_session(probes, service, engine, clock, cookie):
    await seed(engine, server(A))
    await probes.claim_targets("r1", 60_000)
    routed = await open_session(service, "c1", cookie)
    clock.advance(service.settings.pending_timeout_s + 1)

    counts = await reconcile(probes, [("alice", d.SessionState.ACTIVE)])
    assert (counts.ended, counts.recorded, counts.ambiguous) == (0, 0, 0)
    assert counts.linked == (1 if cookie == "CORP\\alic" else 0)
    [kept] = await service.lookup_user_sessions("CORP\\alice")
    assert (kept.session_id, kept.state) == (routed.session_id, d.SessionState.ACTIVE)
    assert kept.user == "CORP\\alice"  # a linked truncated cookie takes the cookie's domain
    # The full cookie and the truncated one both come back to it.
    for i, again_cookie in enumerate(("CORP\\alice", "CORP\\alic")):
        again = await service.route(d.RouteRequest(f"c{i + 2}", cookie=again_cookie))
        assert (again.reason, again.session_id) == (d.RouteReason.RECONNECT, routed.session_id)
    # A second identical report changes nothing.
    counts = await reconcile(probes, [("alice", d.SessionState.ACTIVE)])
    assert (counts.ended, counts.recorded, counts.linked) == (0, 0, 0)


async def test_a_bare_name_from_another_user_still_ends_the_session(probes, service, engine, clock):
    await seed(engine, server(A))
    await probes.claim_targets("r1", 60_000)
    await open_session(service, "c1", "CORP\\alice")
    clock.advance(1)
    await reconcile(probes, [("alice", d.SessionState.ACTIVE)])  # confirmed: the server had it
    clock.advance(1)
    counts = await reconcile(probes, [("bob", d.SessionState.ACTIVE)])
    assert (counts.ended, counts.recorded) == (1, 1)
    [ended] = await service.lookup_user_sessions("CORP\\alice", include_ended=True)
    assert ended.end_reason == "logged_off"


async def test_two_bare_names_matching_a_truncated_cookie_are_ambiguous(
    probes, service, engine, clock, ambiguous
):
    await seed(engine, server(A))
    await probes.claim_targets("r1", 60_000)
    routed = await open_session(service, "c1", "CORP\\anna")
    clock.advance(60)
    counts = await reconcile(
        probes, [("annabeth", d.SessionState.ACTIVE), ("annabel", d.SessionState.ACTIVE)]
    )
    assert (counts.ambiguous, counts.linked, counts.ended) == (1, 0, 0)
    assert ambiguous == [("reconcile", 1)]
    [kept] = await service.lookup_user_sessions("CORP\\anna")
    assert (kept.session_id, kept.state) == (routed.session_id, d.SessionState.ACTIVE)


async def test_a_list_omitting_disconnected_sessions_does_not_end_them(probes, service, engine, clock):
    await seed(engine, server(A))
    await probes.claim_targets("r1", 60_000)
    away = await open_session(service, "c1", "CORP\\away")
    await service.connection_closed(away.session_id, "c1", bytes_from_server=6308)
    gone = await open_session(service, "c2", "CORP\\gone")
    clock.advance(1)
    # Both confirmed by a complete list (claims would be kept: an open one, a fresh closed one).
    listed = [("away", d.SessionState.DISCONNECTED), ("gone", d.SessionState.ACTIVE)]
    assert (await reconcile(probes, listed)).ended == 0
    clock.advance(1)

    counts = await reconcile(probes, [], omits_disconnected=True)
    assert counts.ended == 1  # the active session the list does not show is ended
    [ended] = await service.lookup_user_sessions("CORP\\gone", include_ended=True)
    assert (ended.session_id, ended.end_reason) == (gone.session_id, "logged_off")
    [kept] = await service.lookup_user_sessions("CORP\\away")
    assert kept.state is d.SessionState.DISCONNECTED

    counts = await reconcile(probes, [])  # a complete list ends it
    assert counts.ended == 1
    assert await service.lookup_user_sessions("CORP\\away") == []


async def test_route_counts_a_truncated_cookie_matching_two_linked_users(service, engine, clock, ambiguous):
    await seed(engine, server(A))
    first = await open_session(service, "c1", "CORP\\annabeth")
    second = await open_session(service, "c2", "CORP\\annabel")
    clock.advance(60)
    routed = await service.route(d.RouteRequest("c3", cookie="CORP\\anna"))
    assert routed.reason is d.RouteReason.NEW
    assert routed.session_id not in (first.session_id, second.session_id)
    assert ambiguous == [("route", 1)]


async def test_omits_disconnected_travels_on_the_wire(broker, engine, monkeypatch):
    seen: list[bool] = []
    original = ProbeService.report_sessions

    async def spy(self, replica_id, address, reported, omits_disconnected=False, listed_at=None):
        seen.append(omits_disconnected)
        return await original(self, replica_id, address, reported, omits_disconnected, listed_at)

    monkeypatch.setattr(ProbeService, "report_sessions", spy)
    await seed(engine, server(A))
    await broker.stub.ClaimProbeTargets(pb.ClaimProbeTargetsRequest(replica_id="r1", lease_ms=60_000))
    for omits in (True, False):
        await broker.stub.ReportServerSessions(
            pb.ReportServerSessionsRequest(replica_id="r1", address=A, omits_disconnected=omits)
        )
    assert seen == [True, False]
