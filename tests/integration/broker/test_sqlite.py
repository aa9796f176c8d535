"""The same code on the embedded SQLite default: routing, leases, expiry, and the process itself."""

from __future__ import annotations

import sqlite3
from datetime import timedelta

import grpc
import pytest
from sqlalchemy import event

from rdbroker_broker import accounts
from rdbroker_broker import domain as d
from rdbroker_broker.db import migrate
from rdbroker_broker.db.engine import make_engine
from rdbroker_broker.db.repositories import SessionRepository
from rdbroker_broker.errors import NoCapacity
from rdbroker_broker.probing import ProbeService
from rdbroker_broker.service import BrokerService
from rdbroker_broker.store import Store
from rdbroker_proto.v1 import broker_pb2 as pb
from rdbroker_proto.v1 import broker_pb2_grpc
from tests.integration.broker.conftest import Clock, assert_live_counters_exact, seed, server, settings_for
from tests.integration.broker.processes import broker_process
from tests.support.rdp_host import LOGON_BYTES

A, B = "10.0.0.1:3389", "10.0.0.2:3389"


@pytest.fixture
async def sqlite_service(tmp_path):
    url = f"sqlite+aiosqlite:///{tmp_path / 'rdbroker.db'}"
    engine = make_engine(url)
    await migrate.upgrade(engine)
    clock = Clock()
    try:
        yield BrokerService(Store(engine), settings_for(url), clock), engine, clock
    finally:
        await engine.dispose()


async def test_routing_on_sqlite(sqlite_service):
    service, engine, clock = sqlite_service
    await seed(engine, server(A, max_sessions=1), server(B, max_sessions=1))
    first = await service.route(d.RouteRequest("c1", proxy_id="p", cookie="Alice"))
    assert first.reason is d.RouteReason.NEW
    assert await service.route(d.RouteRequest("c1", proxy_id="p", cookie="Alice")) == first
    again = await service.route(d.RouteRequest("c2", proxy_id="p", cookie="alice"))
    assert (again.reason, again.session_id) == (d.RouteReason.RECONNECT, first.session_id)
    second = await service.route(d.RouteRequest("c3", proxy_id="p", cookie="bob"))
    assert second.server_address != first.server_address
    with pytest.raises(NoCapacity):
        await service.route(d.RouteRequest("c4", proxy_id="p", cookie="carol"))

    await service.connection_opened(first.session_id, "c1", "p")
    clock.advance(6)
    await service.proxy_heartbeat("p", 1, ["c1"])  # lists c1: nothing to disconnect
    assert {s.state for s in await service.lookup_user_sessions("alice")} == {d.SessionState.ACTIVE}
    await service.connection_closed(
        first.session_id, "c1", bytes_from_server=6308, end_reason="client_closed"
    )
    [session] = await service.lookup_user_sessions("ALICE")
    assert session.state is d.SessionState.DISCONNECTED
    assert session.expires_at is not None
    assert session.expires_at.tzinfo is not None
    clock.advance(3601)
    assert (await service.sweep())["expired"] == 2  # alice's disconnect timeout, bob's pending
    await assert_live_counters_exact(engine)


async def test_leases_and_results_on_sqlite(sqlite_service):
    service, engine, _ = sqlite_service
    await seed(engine, server(A), server(B))
    probes = ProbeService(service)
    assert {s.address for s in await probes.claim_targets("r1", 10_000)} == {A, B}
    result = d.ProbeResult(A, d.Health.DOWN, False, "timeout", -1, d.AgentState.NONE, "")
    assert await probes.report_results("r1", [result]) == []
    placed = await service.route(d.RouteRequest("c1", cookie="u"))
    assert placed.server_address == B


async def test_session_lists_confirm_follow_and_end_on_sqlite(sqlite_service):
    service, engine, clock = sqlite_service
    await seed(engine, server(A))
    probes = ProbeService(service)
    await probes.claim_targets("r1", 3_600_000)
    mine = await service.route(d.RouteRequest("c1", proxy_id="p", cookie="CORP\\ann"))
    await service.connection_opened(mine.session_id, "c1", "p")
    claim = await service.route(d.RouteRequest("c2", proxy_id="p", cookie="never"))
    await service.connection_opened(claim.session_id, "c2", "p")
    clock.advance(d.Pool("").logon_lag_s + 1)  # past the logon: a list then says disconnected
    listed_at = clock.now
    await probes.report_sessions("r1", A, [d.ReportedSession("ann", d.SessionState.DISCONNECTED)])
    [ann] = await service.lookup_user_sessions("CORP\\ann")
    assert (ann.state, ann.confirmed) == (d.SessionState.DISCONNECTED, True)
    await service.connection_closed(claim.session_id, "c2", bytes_from_server=LOGON_BYTES)
    clock.advance(1)
    # A list older than the last change undoes nothing.
    listed = [d.ReportedSession("ann", d.SessionState.ACTIVE)]
    assert (
        await probes.report_sessions("r1", A, [], False, listed_at - timedelta(seconds=1))
        == d.ReconcileCounts()
    )
    assert await probes.report_sessions("r1", A, listed) == d.ReconcileCounts()
    [ann] = await service.lookup_user_sessions("CORP\\ann")
    assert ann.state is d.SessionState.ACTIVE
    clock.advance(service.settings.pending_timeout_s + 120)
    counts = await probes.report_sessions("r1", A, [])
    assert (counts.ended, counts.unconfirmed) == (2, 1)
    await assert_live_counters_exact(engine)


async def test_results_age_and_load_reports_recount_on_sqlite(sqlite_service):
    service, engine, clock = sqlite_service
    await seed(engine, server(A), server(B), pools=(d.Pool("default", True, 3600.0, stale_after_ms=5000),))
    probes = ProbeService(service)
    await probes.claim_targets("r1", 60_000)
    down = d.ProbeResult(A, d.Health.DOWN, False, "timeout", -1, d.AgentState.NONE, "")
    assert await probes.report_results("r1", [down]) == []
    assert (await service.route(d.RouteRequest("c1", cookie="u1"))).server_address == B
    clock.advance(5)  # A's result is stale: A reads unknown, and has fewer sessions
    assert (await service.route(d.RouteRequest("c2", cookie="u2"))).server_address == A
    clock.advance(10)
    await service.route(d.RouteRequest("c3", cookie="u3"))  # on A: 1 session each, address order
    loaded = d.ProbeResult(A, d.Health.UP, True, "", 10, d.AgentState.UP, "")
    assert await probes.report_results("r1", [loaded]) == []
    [a, _] = await service.list_servers()
    assert a.placements_since_report == 2  # u2 and u3, placed within the 30 s logon lag
    assert a.fresh_until == clock.now + timedelta(seconds=5)


async def test_the_broker_process_on_sqlite(tmp_path):
    url = f"sqlite+aiosqlite:///{tmp_path / 'rdbroker.db'}"
    async with broker_process(url) as (grpc_port, _):
        engine = make_engine(url)
        try:
            await seed(engine, server(A))
        finally:
            await engine.dispose()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = broker_pb2_grpc.BrokerStub(channel)
            answer = await stub.Route(pb.RouteRequest(connection_id="c1", cookie="zed"), timeout=30)
            assert (answer.server_address, answer.reason) == (A, pb.ROUTE_REASON_NEW)


async def test_sqlite_pragmas_in_effect(sqlite_service):
    """WAL, synchronous=NORMAL (no fsync per commit: docs/broker.md says what a power loss costs),
    foreign keys, a busy timeout, and no checkpoint by the connection itself (they run on a thread
    of their own: the statements run on the event loop's), read back from the engine's connection."""
    _, engine, _ = sqlite_service
    async with engine.connect() as conn:
        values = {
            name: (await conn.exec_driver_sql(f"PRAGMA {name}")).scalar()
            for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout", "wal_autocheckpoint")
        }
    assert values == {
        "journal_mode": "wal",
        "synchronous": 1,
        "foreign_keys": 1,
        "busy_timeout": 1000,
        "wal_autocheckpoint": 0,
    }


async def test_heartbeat_listing_thousands_of_connections_on_sqlite(sqlite_service):
    """`up` holding 5,000 idle connections lists all their ids in each heartbeat. SQLite builds older
    than 3.32 (and builds configured lower) allow 999 bound parameters per statement: the list is
    one parameter, whatever its length."""
    service, engine, clock = sqlite_service
    async with engine.connect() as conn:
        driver = (await conn.get_raw_connection()).driver_connection
        driver.sqlite.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
    await seed(engine, server(A), server(B))
    kept = await service.route(d.RouteRequest("c1", proxy_id="p", cookie="alice"))
    lost = await service.route(d.RouteRequest("c2", proxy_id="p", cookie="bob"))
    await service.connection_opened(kept.session_id, "c1", "p")
    await service.connection_opened(lost.session_id, "c2", "p")
    clock.advance(6)
    listed = ["c1", *(f"idle-{i}" for i in range(4999))]  # c2's close report was lost
    await service.proxy_heartbeat("p", len(listed), listed)
    states = {s.user: s.state for s in await service.lookup_user_sessions("alice")}
    states |= {s.user: s.state for s in await service.lookup_user_sessions("bob")}
    assert states == {"alice": d.SessionState.ACTIVE, "bob": d.SessionState.DISCONNECTED}
    # Listed again (the close was never reported: the connection is open after all): active again.
    await service.proxy_heartbeat("p", len(listed) + 1, [*listed, "c2"])
    [bob] = await service.lookup_user_sessions("bob")
    assert bob.state is d.SessionState.ACTIVE
    await assert_live_counters_exact(engine)


async def test_account_probes_use_the_live_indexes_on_sqlite(sqlite_service):
    """A new placement's account probes (`live_in_ranges`) search the partial live-session indexes
    by range, not every live session by state: SQLite's plan, read back."""
    _, engine, _ = sqlite_service
    plans: list[str] = []

    def explain(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if "user_key >=" in statement or "account_name >=" in statement:
            cursor.execute(f"EXPLAIN QUERY PLAN {statement}", parameters)
            plans.extend(row[3] for row in cursor.fetchall())

    event.listen(engine.sync_engine, "before_cursor_execute", explain)
    try:
        async with engine.connect() as conn:
            for user in ("CORP\\alice", "alice", "alice@corp.example"):
                probes = accounts.probes(accounts.resolve(user))
                assert probes is not None
                await SessionRepository(conn).live_in_ranges("default", probes)
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", explain)
    assert plans
    assert all("uq_sessions_live_user" in p or "ix_sessions_live_account" in p for p in plans), plans
