"""The agent is the truth for its server: listed users are confirmed and take the listed state, proxy-made
sessions included; an unlisted confirmed session is logged off at the next list; a claim the agent never
lists ends `unconfirmed` once its connection has been closed for `confirm_timeout_s`. Changes the list
could not show (after `listed_at`) are never undone by it."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from rdbroker_broker import domain as d
from rdbroker_broker import metrics
from rdbroker_broker.db.repositories import session_from_row
from rdbroker_broker.db.tables import sessions
from rdbroker_broker.errors import InvalidInput
from rdbroker_proto.v1 import broker_pb2 as pb
from tests.integration.broker.conftest import assert_live_counters_exact, seed, server
from tests.support.rdp_host import LOGON_BYTES

A = "10.0.7.1:3389"
ACTIVE, DISCONNECTED = d.SessionState.ACTIVE, d.SessionState.DISCONNECTED
POOL = d.Pool("default", True, 3600.0, confirm_timeout_s=60.0, sessions_interval_ms=750)


@pytest.fixture
def ended_counts(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    seen: list[tuple[str, int]] = []
    original = metrics.record_reconcile_ended

    def spy(reason: str, count: int) -> None:
        if count:
            seen.append((reason, count))
        original(reason, count)

    monkeypatch.setattr(metrics, "record_reconcile_ended", spy)
    return seen


@pytest.fixture
async def farm(engine, probes):
    await seed(engine, server(A, max_sessions=10), pools=(POOL,))
    await probes.claim_targets("r1", 3_600_000)


async def opened(service, connection_id: str, user: str) -> d.RouteDecision:
    routed = await service.route(d.RouteRequest(connection_id, proxy_id="p1", cookie=user))
    await service.connection_opened(routed.session_id, connection_id, "p1")
    return routed


async def report(probes, listed: list[tuple[str, d.SessionState]], *, listed_at=None, omits=False):
    items = [d.ReportedSession(user, state) for user, state in listed]
    return await probes.report_sessions("r1", A, items, omits, listed_at)


async def session_of(service, session_id: str) -> d.Session:
    """The row as stored (ended sessions included)."""
    async with service.store.engine.connect() as conn:
        row = (await conn.execute(select(sessions).where(sessions.c.id == session_id))).one()
    return session_from_row(row)


async def held(service) -> tuple[int, int]:
    [a] = await service.list_servers()
    return a.live_sessions, a.held_sessions


async def test_a_listed_claim_is_confirmed_and_holds_capacity_while_disconnected(
    farm, probes, service, engine, clock
):
    mine = await opened(service, "c1", "alice")
    other = await opened(service, "c2", "bob")  # never listed: stays a claim
    assert not (await session_of(service, mine.session_id)).confirmed
    clock.advance(1)
    counts = await report(probes, [("alice", ACTIVE)])
    assert counts == d.ReconcileCounts()
    assert (await session_of(service, mine.session_id)).confirmed
    assert not (await session_of(service, other.session_id)).confirmed
    assert await held(service) == (2, 2)  # both connections are open

    clock.advance(1)
    await service.connection_closed(mine.session_id, "c1", bytes_from_server=LOGON_BYTES)
    await service.connection_closed(other.session_id, "c2", bytes_from_server=LOGON_BYTES)
    # Both are live (the users come back to them); only the confirmed one holds capacity.
    assert await held(service) == (2, 1)
    await assert_live_counters_exact(engine)


async def test_sessions_learnt_from_the_agent_are_confirmed(farm, probes, service):
    counts = await report(probes, [("carol", DISCONNECTED)])
    assert counts.recorded == 1
    [learnt] = await service.lookup_user_sessions("carol")
    assert (learnt.state, learnt.confirmed) == (DISCONNECTED, True)
    assert await held(service) == (1, 1)


async def test_a_closed_claim_ends_unconfirmed_after_confirm_timeout_and_not_before(
    farm, probes, service, engine, clock, ended_counts
):
    claim = await opened(service, "c1", "mallory")
    clock.advance(5)
    await service.connection_closed(claim.session_id, "c1", bytes_from_server=LOGON_BYTES)
    closed_at = clock.now

    clock.advance(POOL.confirm_timeout_s - 1)
    assert (await report(probes, [("someone", ACTIVE)])).ended == 0
    # A list taken within the timeout is judged by when it was taken, not when it arrives.
    clock.advance(100)
    within = closed_at + timedelta(seconds=POOL.confirm_timeout_s - 1)
    assert (await report(probes, [("someone", ACTIVE)], listed_at=within)).ended == 0
    assert (await session_of(service, claim.session_id)).state is DISCONNECTED
    assert ended_counts == []

    counts = await report(probes, [("someone", ACTIVE)])
    assert (counts.ended, counts.unconfirmed) == (1, 1)
    ended = await session_of(service, claim.session_id)
    assert (ended.state, ended.end_reason) == (d.SessionState.ENDED, "unconfirmed")
    assert ended_counts == [("unconfirmed", 1)]
    await assert_live_counters_exact(engine)


async def test_a_claim_whose_connection_is_open_is_never_ended_by_a_list_lacking_it(
    farm, probes, service, clock
):
    claim = await opened(service, "c1", "slowlogon")
    routing = await service.route(d.RouteRequest("c2", proxy_id="p1", cookie="routing"))  # pending
    for _ in range(3):
        clock.advance(POOL.confirm_timeout_s * 2)
        counts = await report(probes, [("someone", ACTIVE)])
        assert counts.ended == 0
    assert (await session_of(service, claim.session_id)).state is ACTIVE
    assert (await session_of(service, claim.session_id)).confirmed is False
    # The pending one expires on its own timer (pending_timeout_s, the sweep), never for the list.
    assert (await session_of(service, routing.session_id)).state is d.SessionState.PENDING


async def test_a_logoff_of_a_confirmed_proxy_made_session_ends_it_at_the_next_list(
    farm, probes, service, engine, clock, ended_counts
):
    mine = await opened(service, "c1", "CORP\\alice")
    clock.advance(1)
    await report(probes, [("alice", ACTIVE)])  # quser's bare name confirms it
    clock.advance(1)
    await service.connection_closed(mine.session_id, "c1", bytes_from_server=LOGON_BYTES)
    clock.advance(0.5)  # the user logs off on the server half a second after disconnecting
    counts = await report(probes, [])
    assert (counts.ended, counts.unconfirmed) == (1, 0)
    ended = await session_of(service, mine.session_id)
    assert (ended.state, ended.end_reason) == (d.SessionState.ENDED, "logged_off")
    assert ended_counts == [("logged_off", 1)]
    # The next logon is a new placement, not a reconnect to the dead session.
    again = await service.route(d.RouteRequest("c2", proxy_id="p1", cookie="CORP\\alice"))
    assert again.reason is d.RouteReason.NEW
    await assert_live_counters_exact(engine)


async def test_an_active_confirmed_session_the_server_no_longer_lists_is_ended(farm, probes, service, clock):
    mine = await opened(service, "c1", "dave")
    clock.advance(1)
    await report(probes, [("dave", ACTIVE)])
    clock.advance(1)
    assert (await report(probes, [])).ended == 1
    assert (await session_of(service, mine.session_id)).end_reason == "logged_off"


async def test_proxy_made_sessions_follow_the_agents_state(farm, probes, service, engine, clock):
    mine = await opened(service, "c1", "erin")
    clock.advance(POOL.logon_lag_s + 1)  # past the logon: see the next test
    await report(probes, [("erin", DISCONNECTED)])  # the server says the user is not attached
    now = await session_of(service, mine.session_id)
    assert (now.state, now.confirmed) == (DISCONNECTED, True)
    assert now.expires_at == clock.now + timedelta(seconds=POOL.disconnect_timeout_s)
    assert await held(service) == (1, 1)

    clock.advance(1)
    await report(probes, [("erin", ACTIVE)])
    now = await session_of(service, mine.session_id)
    assert (now.state, now.expires_at) == (ACTIVE, None)
    await assert_live_counters_exact(engine)


async def test_a_connection_still_logging_on_is_not_called_disconnected(farm, probes, service, clock):
    """The server attaches a desktop only once TLS and the logon are done (about a second on xrdp):
    a list taken meanwhile calls the session disconnected while the proxy splices its connection.
    Within the pool's logon lag of that connection's opening the session stays active; then the
    server's word wins. A session whose connection is closed follows the list at once."""
    mine = await opened(service, "c1", "hank")
    clock.advance(1)
    await report(probes, [("hank", DISCONNECTED)])
    now = await session_of(service, mine.session_id)
    assert (now.state, now.confirmed) == (ACTIVE, True)
    clock.advance(POOL.logon_lag_s)
    await report(probes, [("hank", DISCONNECTED)])  # still not attached: the server is right
    assert (await session_of(service, mine.session_id)).state is DISCONNECTED

    other = await opened(service, "c2", "ivy")
    clock.advance(1)
    await report(probes, [("hank", DISCONNECTED), ("ivy", ACTIVE)])
    await service.connection_closed(other.session_id, "c2", bytes_from_server=LOGON_BYTES)
    clock.advance(1)
    await report(probes, [("hank", DISCONNECTED), ("ivy", ACTIVE)])  # attached without a proxy
    clock.advance(1)
    await report(probes, [("hank", DISCONNECTED), ("ivy", DISCONNECTED)])
    assert (await session_of(service, other.session_id)).state is DISCONNECTED


async def test_a_reconnect_opened_after_the_list_was_taken_is_not_flipped(farm, probes, service, clock):
    first = await opened(service, "c1", "frank")
    clock.advance(1)
    await report(probes, [("frank", ACTIVE)])
    clock.advance(1)
    await service.connection_closed(first.session_id, "c1", bytes_from_server=LOGON_BYTES)
    clock.advance(1)
    await report(probes, [("frank", DISCONNECTED)])
    clock.advance(5)
    listed_at = clock.now  # the agent's list is taken here: the session is disconnected on the server
    clock.advance(0.2)
    again = await opened(service, "c2", "frank")  # the user reconnects before that list arrives
    assert (again.reason, again.session_id) == (d.RouteReason.RECONNECT, first.session_id)
    clock.advance(0.2)

    counts = await report(probes, [("frank", DISCONNECTED)], listed_at=listed_at)
    assert counts == d.ReconcileCounts()
    assert (await session_of(service, first.session_id)).state is ACTIVE
    # Nor does a list from before the reconnect that lacks the user end it.
    assert (await report(probes, [], listed_at=listed_at)).ended == 0
    assert (await session_of(service, first.session_id)).state is ACTIVE
    # A list taken after the reconnect decides, once past the logon (the previous test).
    clock.advance(POOL.logon_lag_s + 1)
    await report(probes, [("frank", DISCONNECTED)])
    assert (await session_of(service, first.session_id)).state is DISCONNECTED


async def test_a_close_after_the_list_is_not_undone_by_it(farm, probes, service, clock):
    mine = await opened(service, "c1", "gina")
    clock.advance(1)
    await report(probes, [("gina", ACTIVE)])
    clock.advance(1)
    listed_at = clock.now
    clock.advance(0.1)
    await service.connection_closed(mine.session_id, "c1", bytes_from_server=LOGON_BYTES)
    clock.advance(0.1)
    assert await report(probes, [("gina", ACTIVE)], listed_at=listed_at) == d.ReconcileCounts()
    assert (await session_of(service, mine.session_id)).state is DISCONNECTED


async def test_lists_omitting_disconnected_sessions_prove_nothing_about_them(farm, probes, service, clock):
    away = await opened(service, "c1", "hank")
    clock.advance(1)
    await report(probes, [("hank", ACTIVE)])
    clock.advance(1)
    await service.connection_closed(away.session_id, "c1", bytes_from_server=LOGON_BYTES)
    claim = await opened(service, "c2", "ivan")
    clock.advance(1)
    await service.connection_closed(claim.session_id, "c2", bytes_from_server=LOGON_BYTES)
    clock.advance(POOL.confirm_timeout_s * 2)

    # psutil cannot see disconnected sessions: neither the confirmed one nor the old claim ends, and
    # its "active" cannot be told from disconnected, so a listed disconnected session stays so.
    assert (await report(probes, [], omits=True)).ended == 0
    assert (await report(probes, [("hank", ACTIVE)], omits=True)).ended == 0
    assert (await session_of(service, away.session_id)).state is DISCONNECTED
    assert (await session_of(service, claim.session_id)).state is DISCONNECTED

    counts = await report(probes, [])  # a complete list decides
    assert (counts.ended, counts.unconfirmed) == (2, 1)
    assert (await session_of(service, away.session_id)).end_reason == "logged_off"
    assert (await session_of(service, claim.session_id)).end_reason == "unconfirmed"


async def test_listed_at_bounds(farm, probes, service, clock):
    mine = await opened(service, "c1", "judy")
    clock.advance(1)
    await report(probes, [("judy", ACTIVE)])
    clock.advance(1)
    # A replica clock ahead of the broker's: the list counts as taken when it arrives.
    assert (await report(probes, [], listed_at=clock.now + timedelta(hours=1))).ended == 1
    assert (await session_of(service, mine.session_id)).end_reason == "logged_off"
    with pytest.raises(InvalidInput, match=r"listed_at .* is more than 1:00:00 old"):
        await report(probes, [], listed_at=clock.now - timedelta(hours=2))


async def test_targets_carry_the_sessions_interval(engine, probes, service):
    other = d.Pool("other", sessions_interval_ms=0)
    await seed(engine, server(A), server("10.0.7.2:3389", pool="other"), pools=(POOL, other))
    targets = {t.address: t for t in await probes.claim_targets("r1", 60_000)}
    assert targets[A].sessions_interval_ms == 750  # the pool's
    assert targets["10.0.7.2:3389"].sessions_interval_ms == service.settings.sessions_interval_ms == 5000


async def test_listed_at_and_the_interval_travel_on_the_wire(broker, engine, monkeypatch):
    from rdbroker_broker.probing import ProbeService

    seen = []
    original = ProbeService.report_sessions

    async def spy(self, replica_id, address, reported, omits_disconnected=False, listed_at=None):
        seen.append(listed_at)
        return await original(self, replica_id, address, reported, omits_disconnected, listed_at)

    monkeypatch.setattr(ProbeService, "report_sessions", spy)
    await seed(engine, server(A), pools=(POOL,))
    claimed = await broker.stub.ClaimProbeTargets(
        pb.ClaimProbeTargetsRequest(replica_id="r1", lease_ms=60_000)
    )
    assert [t.sessions_interval_ms for t in claimed.targets] == [750]
    request = pb.ReportServerSessionsRequest(replica_id="r1", address=A)
    await broker.stub.ReportServerSessions(request)
    request.listed_at.FromSeconds(1_800_000_000)
    await broker.stub.ReportServerSessions(request)
    assert seen[0] is None
    assert seen[1] is not None
    assert seen[1].timestamp() == 1_800_000_000


async def test_a_reconnect_committed_while_the_list_is_applied_is_not_ended(
    farm, probes, service, clock, monkeypatch
):
    from rdbroker_broker.db.repositories import SessionRepository

    first = await opened(service, "c1", "kim")
    clock.advance(1)
    await report(probes, [("kim", ACTIVE)])
    clock.advance(1)
    await service.connection_closed(first.session_id, "c1", bytes_from_server=LOGON_BYTES)
    clock.advance(1)
    listed_at = clock.now  # kim is logged off on the server when the list is taken
    clock.advance(0.1)
    original = SessionRepository.live_on_server

    async def read_then_reconnect(self, address):
        rows = await original(self, address)  # the snapshot the rules are applied to
        again = await service.route(d.RouteRequest("c2", proxy_id="p1", cookie="kim"))
        await service.connection_opened(again.session_id, "c2", "p1")  # committed meanwhile
        return rows

    monkeypatch.setattr(SessionRepository, "live_on_server", read_then_reconnect)
    counts = await report(probes, [], listed_at=listed_at)
    assert counts.ended == 0  # the write re-checks the row: the reconnect is newer than the list
    assert (await session_of(service, first.session_id)).state is ACTIVE


async def test_the_agents_state_is_not_undone_by_proxy_heartbeats(farm, probes, service, clock):
    """A session the agent calls active while the proxy has no connection for it stays active through
    the proxy's heartbeats; one the agent calls disconnected is not revived by a heartbeat listing its
    old connection (the agent, not the proxy, is the truth for its server)."""
    mine = await opened(service, "c1", "alice")
    clock.advance(1)
    await report(probes, [("alice", ACTIVE)])
    await service.connection_closed(mine.session_id, "c1", bytes_from_server=LOGON_BYTES)
    clock.advance(1)
    await report(probes, [("alice", ACTIVE)])  # attached on the server without this proxy
    assert (await session_of(service, mine.session_id)).state is ACTIVE
    clock.advance(service.settings.heartbeat_interval_s * 2)
    await service.proxy_heartbeat("p1", 0, [])  # a complete list without c1
    assert (await session_of(service, mine.session_id)).state is ACTIVE

    theirs = await opened(service, "c2", "bob")
    clock.advance(POOL.logon_lag_s + 1)  # past the logon
    await report(probes, [("alice", ACTIVE), ("bob", DISCONNECTED)])
    assert (await session_of(service, theirs.session_id)).state is DISCONNECTED
    clock.advance(1)
    await service.proxy_heartbeat("p1", 1, ["c2"])  # the proxy still splices c2
    assert (await session_of(service, theirs.session_id)).state is DISCONNECTED
