"""The embedded store's hot path (`db/embedded_sql.py`, `db/inline_sqlite.py`): the Route and the
connection reports in plain sqlite3 calls on the event loop's thread, decided by the domain exactly as
the transactional path decides, and handing anything unusual over to it with nothing written."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from rdbroker_broker import domain as d
from rdbroker_broker.db import embedded_sql, migrate, routing_sql
from rdbroker_broker.db.engine import make_engine
from rdbroker_broker.db.inline_sqlite import Checkpointer, InlineConnection
from rdbroker_broker.db.tables import connections, servers, sessions
from rdbroker_broker.errors import Conflict, NoCapacity, NotFound
from rdbroker_broker.service import BrokerService, Closed, Opened
from rdbroker_broker.store import Store
from tests.integration.broker import test_route_fast_path as fast_path
from tests.integration.broker.conftest import Clock, assert_live_counters_exact, seed, server, settings_for
from tests.integration.broker.test_report_fast_path import reports_match_the_use_case

A, B, C = "10.0.0.1:3389", "10.0.0.2:3389", "10.0.0.3:3389"


async def _service(path: Path, clock: Clock) -> tuple[BrokerService, AsyncEngine]:
    url = f"sqlite:///{path}"
    engine = make_engine(url)
    await migrate.upgrade(engine)
    return BrokerService(Store(engine), settings_for(url), clock), engine


@pytest.fixture
async def sqlite(tmp_path: Path) -> AsyncIterator[tuple[BrokerService, AsyncEngine, Clock]]:
    clock = Clock()
    service, engine = await _service(tmp_path / "rdbroker.db", clock)
    try:
        yield service, engine, clock
    finally:
        await engine.dispose()


def transactional_only(service: BrokerService, monkeypatch: pytest.MonkeyPatch) -> None:
    """Route and reports through the use cases alone (the reference)."""

    async def not_here(*args: Any, **kwargs: Any) -> Any:
        return None

    async def undone(*args: Any, **kwargs: Any) -> bool:
        return False

    monkeypatch.setattr(service.routing.fast, "route", not_here)
    monkeypatch.setattr(service.reports, "_reports_embedded", undone)


def count_transactional_routes(service: BrokerService, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    taken: list[str] = []
    real = service.routing._route

    async def counted(r: Any, request: d.RouteRequest, *args: Any) -> d.RouteDecision:
        taken.append(request.connection_id)
        return await real(r, request, *args)

    monkeypatch.setattr(service.routing, "_route", counted)
    return taken


# --- the same answers and rows as the transactional path ------------------------------------------

STATES = {
    "admin_state": ["enabled"] * 4 + [s.value for s in d.AdminState],
    "health": ["up"] * 4 + [h.value for h in d.Health],
    "agent_state": ["none"] * 4 + [a.value for a in d.AgentState],
}


def random_farm(rng: random.Random) -> list[d.Server]:
    return [
        server(f"10.0.1.{i + 1}:3389", max_sessions=rng.choice([0, 0, 1, 2, 3]))
        for i in range(rng.randint(1, 5))
    ]


async def shape(engine: AsyncEngine, rng: random.Random, clock: Clock) -> None:
    """Every server in a random state, probed at a random time (fresh, stale or never)."""
    async with engine.begin() as conn:
        for (address,) in (await conn.execute(select(servers.c.address).order_by(servers.c.address))).all():
            fresh = rng.choice([None, clock.now - timedelta(seconds=1), clock.now + timedelta(hours=1)])
            values: dict[str, Any] = {name: rng.choice(choices) for name, choices in STATES.items()}
            values |= {
                "weight": rng.choice([100, 100, 0, 50, 200]),
                "load": rng.choice([0, 0, 30, 99, 100, -1]),
            }
            await conn.execute(
                update(servers).where(servers.c.address == address).values(fresh_until=fresh, **values)
            )


def script(rng: random.Random) -> list[tuple[str, str, int]]:
    """(action, user, n): routes of a few users, their reports, and time passing."""
    steps: list[tuple[str, str, int]] = []
    for n in range(rng.randint(4, 16)):
        user = rng.choice(["alice", "Alice", "bob", "CORP\\carol", "carol", "", "dave"])
        steps.append(("route", user, n))
        roll = rng.random()
        if roll < 0.5:
            steps.append(("open-close", user, n))
        elif roll < 0.7:
            steps.append(("open", user, n))
        if rng.random() < 0.15:
            steps.append(("wait", "", rng.choice([30, 4000])))
    return steps


class World:
    def __init__(self, service: BrokerService, clock: Clock) -> None:
        self.service, self.clock = service, clock
        self.answers: list[tuple[Any, ...]] = []
        self.sessions: dict[str, int] = {}  # session id -> the order it first appeared in
        self.session_of: dict[int, str] = {}

    def _label(self, session_id: str) -> int:
        return self.sessions.setdefault(session_id, len(self.sessions))

    async def run(self, step: tuple[str, str, int]) -> None:
        action, user, n = step
        if action == "wait":
            self.clock.advance(n)
            await self.service.sweep()
            return
        if action == "route":
            try:
                decision = await self.service.route(d.RouteRequest(f"c{n}", proxy_id="p", cookie=user))
            except (NoCapacity, NotFound) as exc:
                self.answers.append(("refused", type(exc).__name__, str(exc)))
                return
            self.session_of[n] = decision.session_id
            self.answers.append(
                (decision.server_address, decision.reason, decision.user, self._label(decision.session_id))
            )
            return
        session_id = self.session_of.get(n)
        if session_id is None:
            return
        events: list[Any] = [Opened(session_id, f"c{n}", "p")]
        if action == "open-close":
            events.append(Closed(session_id, f"c{n}", 10, 4096 if n % 2 else 19, 30, "client_closed"))
        errors = await self.service.report_connections(events)
        self.answers.append(tuple(type(e).__name__ if e else "ok" for e in errors))

    async def rows(self, engine: AsyncEngine) -> list[tuple[Any, ...]]:
        async with engine.connect() as conn:
            found = [
                (self._label(row[0]), *row[1:])
                for row in await conn.execute(
                    select(
                        sessions.c.id, sessions.c.user, sessions.c.user_key, sessions.c.account_name,
                        sessions.c.server_address, sessions.c.state, sessions.c.learnt_from,
                        sessions.c.origin_connection_id, sessions.c.connection_id, sessions.c.proxy_id,
                        sessions.c.created_at, sessions.c.updated_at, sessions.c.opened_at,
                        sessions.c.disconnected_at, sessions.c.expires_at, sessions.c.ended_at,
                        sessions.c.end_reason, sessions.c.confirmed,
                    ).order_by(sessions.c.created_at, sessions.c.origin_connection_id)
                )
            ]  # fmt: skip
            found += [
                (*row[:2], self._label(row[2]), *row[3:])
                for row in await conn.execute(select(connections).order_by(connections.c.connection_id))
            ]
            # (A server's created_at and updated_at are the farm's apply, on the wall clock.)
            columns = [c for c in servers.c if c.name not in ("created_at", "updated_at")]
            found += [tuple(row) for row in await conn.execute(select(*columns).order_by(servers.c.address))]
        return found


async def test_route_and_reports_match_the_transactional_path_over_generated_farms(tmp_path, monkeypatch):
    """Two databases built alike, one routed by the embedded hot path and one by the transactional
    path alone, step by step on the same clock: every answer and every row come out the same."""
    rng = random.Random(20261207)
    fast_routes = 0
    for n in range(40):
        seed_value = rng.random()
        clock = Clock()
        worlds = []
        for name in ("fast", "slow"):
            service, engine = await _service(tmp_path / f"{n}-{name}.db", clock)
            await seed(engine, *random_farm(random.Random(seed_value)))
            await shape(engine, random.Random(seed_value), clock)
            worlds.append((World(service, clock), engine))
        (fast, fast_engine), (slow, slow_engine) = worlds
        transactional_only(slow.service, monkeypatch)
        taken = count_transactional_routes(fast.service, monkeypatch)
        try:
            steps = script(random.Random(seed_value))
            for step in steps:
                if step[0] == "wait":  # one clock: advance it once, sweep both
                    clock.advance(step[2])
                    await fast.service.sweep()
                    await slow.service.sweep()
                    continue
                await fast.run(step)
                await slow.run(step)
            assert fast.answers == slow.answers, steps
            fast_rows, slow_rows = await fast.rows(fast_engine), await slow.rows(slow_engine)
            for got, want in zip(fast_rows, slow_rows, strict=False):
                assert got == want, (steps, got, want)
            assert len(fast_rows) == len(slow_rows), steps
            await assert_live_counters_exact(fast_engine)
            fast_routes += sum(1 for s in steps if s[0] == "route") - len(taken)
        finally:
            await fast_engine.dispose()
            await slow_engine.dispose()
    assert fast_routes > 100  # most routes were answered by the hot path


def test_the_placement_rules_equal_the_domain_rules_over_generated_farms(tmp_path):
    """`routing_sql`'s rules spelt for SQLite, over the servers of `test_route_fast_path` (every
    state, values around each threshold, never probed, stale and fresh): `eligible_sql` is
    `domain.takes_new_sessions`, the effective loads are the domain's to the bit, ordering by
    `rank_key_sql` is `domain.rank_for_new_session` in a breadth and in a depth pool, and
    `best_server` is its first server (none when no server takes new sessions)."""

    async def migrated() -> None:
        engine = make_engine(f"sqlite:///{tmp_path / 'rules.db'}")
        await migrate.upgrade(engine)
        await engine.dispose()

    asyncio.run(migrated())
    conn = sqlite3.connect(tmp_path / "rules.db", isolation_level=None)
    conn.execute(
        "INSERT INTO pools (name, name_key, is_default, disconnect_timeout_s, domain, upn_suffixes,"
        " honor_routing_tokens, placement, created_at, updated_at)"
        " SELECT 'default', 'default', 1, 3600, '', '', 1, 'breadth', '2026-01-01', '2026-01-01'"
        " WHERE NOT EXISTS (SELECT 1 FROM pools WHERE name = 'default')"
    )
    now = fast_path.NOW
    at = {"now": embedded_sql.stamp(now)}
    checked = 0

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(rows=fast_path.servers_strategy)
    def check(rows: list[tuple[Any, ...]]) -> None:
        nonlocal checked
        conn.execute("DELETE FROM servers")
        for i, (admin, health, agent, weight, load, max_s, live, placed, held, fresh) in enumerate(rows):
            fresh_until = fast_path.FRESH_UNTIL[fresh]
            conn.execute(
                "INSERT INTO servers (address, pool, weight, max_sessions, admin_state, health,"
                " health_detail, agent_state, agent_detail, load, placements_since_report, live_sessions,"
                " held_sessions, fresh_until, agent_url, sessions_url, power, created_at, updated_at)"
                " VALUES (?, 'default', ?, ?, ?, ?, '', ?, '', ?, ?, ?, ?, ?, '', '', 'on', '2026-01-01',"
                " '2026-01-01')",
                (
                    fast_path._address(i), weight, max_s, admin, health, agent, load, placed, live, held,
                    None if fresh_until is None else embedded_sql.stamp(fresh_until),
                ),
            )  # fmt: skip
        columns = ", ".join(f"v.{name}" for name in routing_sql.RANK_FIELDS)
        table = [
            d.as_seen_at(embedded_sql._server(row), now)
            for row in conn.execute(f"SELECT {columns} FROM servers v")
        ]
        sqlite = routing_sql.SQLITE
        eligible = f"SELECT address FROM servers v WHERE {routing_sql.eligible_sql('v', sqlite)}"
        assert {r[0] for r in conn.execute(eligible, at)} == {
            s.address for s in table if d.takes_new_sessions(s)
        }
        loads = dict(
            conn.execute(f"SELECT address, {routing_sql.effective_load_sql('v', sqlite)} FROM servers v", at)
        )
        assert loads == {s.address: d.effective_load(s) for s in table}  # equal floats, to the bit
        for placement in d.Placement:
            order = {**at, "order": routing_sql.sqlite_order(placement)}
            ranked_sql = [
                r[0]
                for r in conn.execute(f"{eligible} ORDER BY {routing_sql.rank_key_sql('v', sqlite)}", order)
            ]
            ranked = [s.address for s in d.rank_for_new_session(table, placement=placement)]
            assert ranked_sql == ranked, placement
            best = embedded_sql.best_server(conn, d.Pool("default", placement=placement), now)
            assert (best.address if best else None) == (ranked[0] if ranked else None)
        checked += 1

    try:
        check()
    finally:
        conn.close()
    assert checked >= 20


async def test_reports_apply_as_the_use_case_does_on_sqlite(sqlite):
    service, engine, clock = sqlite
    await reports_match_the_use_case(engine, service, clock)


# --- the hot path answers the common cases, and hands over the rest ----------------------------


async def test_new_placements_and_reconnects_take_the_hot_path(sqlite, monkeypatch):
    service, engine, _clock = sqlite
    await seed(engine, server(A), server(B))
    taken = count_transactional_routes(service, monkeypatch)
    first = await service.route(d.RouteRequest("c1", proxy_id="p", cookie="alice"))
    nobody = await service.route(d.RouteRequest("c2", proxy_id="p"))
    assert (first.reason, nobody.reason) == (d.RouteReason.NEW, d.RouteReason.NO_IDENTITY)
    again = await service.route(d.RouteRequest("c3", proxy_id="p", cookie="ALICE"))
    assert (again.reason, again.session_id) == (d.RouteReason.RECONNECT, first.session_id)
    assert taken == []
    assert await service.report_connections([Opened(first.session_id, "c1", "p")]) == [None]
    await assert_live_counters_exact(engine)


async def test_a_repeated_route_gets_its_first_answer_and_writes_nothing(sqlite):
    service, engine, _ = sqlite
    await seed(engine, server(A), server(B))
    first = await service.route(d.RouteRequest("c1", proxy_id="p", cookie="alice"))
    # Between the two tries another server becomes the better one: the retry still gets its answer.
    await service.route(d.RouteRequest("c2", proxy_id="p", cookie="bob"))
    assert await service.route(d.RouteRequest("c1", proxy_id="p", cookie="alice")) == first
    async with engine.connect() as conn:
        count = (await conn.execute(select(sessions.c.id).where(sessions.c.user == "alice"))).all()
    assert len(count) == 1


async def test_what_the_hot_path_cannot_answer_goes_to_the_transactional_path(sqlite, monkeypatch):
    """An expired session (ended, then the user placed anew), a server that takes no reconnects,
    no server at all (the reason in the refusal), an unknown pool (NotFound), and another spelling
    of an account with a live session (found by the account rules)."""
    service, engine, clock = sqlite
    await seed(
        engine,
        server(A, max_sessions=1),
        server(B, max_sessions=1),
        pools=(d.Pool("default", True, 60.0, domain="CORP"),),
    )
    taken = count_transactional_routes(service, monkeypatch)
    # The first Route learns the pool's account settings (a key depends on them): transactional.
    first = await service.route(d.RouteRequest("c1", proxy_id="p", cookie="alice"))
    await service.report_connections(
        [Opened(first.session_id, "c1", "p"), Closed(first.session_id, "c1", 0, 9000, 5, "")]
    )
    clock.advance(61)  # past the pool's disconnect timeout, not yet swept
    moved = await service.route(d.RouteRequest("c2", proxy_id="p", cookie="alice"))
    assert moved.reason is d.RouteReason.NEW
    assert moved.session_id != first.session_id
    assert taken == ["c1", "c2"]
    same = await service.route(d.RouteRequest("c3", proxy_id="p", cookie="CORP\\alice"))
    assert (same.reason, same.session_id) == (d.RouteReason.RECONNECT, moved.session_id)
    await service.route(d.RouteRequest("c4", proxy_id="p", cookie="bob"))
    with pytest.raises(NoCapacity, match="can take a new session"):
        await service.route(d.RouteRequest("c5", proxy_id="p", cookie="carol"))
    with pytest.raises(NotFound, match="nosuch"):
        await service.route(d.RouteRequest("c6", proxy_id="p", cookie="carol", pool="nosuch"))
    await assert_live_counters_exact(engine)


async def test_an_ended_session_is_revived_unless_its_user_has_a_newer_one(sqlite, monkeypatch):
    """An open for a session that ended meanwhile revives it in the hot path, unless its user has
    a newer live session: that event is refused as the use case refuses it, writing nothing, and the
    rest of the batch applies."""
    service, engine, _ = sqlite
    await seed(engine, server(A))
    alice = await service.route(d.RouteRequest("c1", proxy_id="p", cookie="alice"))
    bob = await service.route(d.RouteRequest("c2", proxy_id="p", cookie="bob"))
    await service.end_session(alice.session_id)
    await service.end_session(bob.session_id)
    newer = await service.route(d.RouteRequest("c3", proxy_id="p", cookie="bob"))
    monkeypatch.setattr(service.reports, "_reports_in_one", None)  # the hot path alone must answer
    errors = await service.report_connections(
        [Opened(alice.session_id, "c1", "p"), Opened(bob.session_id, "c2", "p"), Opened("nosuch", "c9", "p")]
    )
    assert errors[0] is None
    assert isinstance(errors[1], Conflict)
    assert "newer session" in str(errors[1])
    assert isinstance(errors[2], NotFound)
    states = {s.session_id: s.state for s in await service.lookup_user_sessions("alice")}
    states |= {s.session_id: s.state for s in await service.lookup_user_sessions("bob")}
    assert states[alice.session_id] is d.SessionState.ACTIVE
    assert states[newer.session_id] is d.SessionState.PENDING
    assert bob.session_id not in states or states[bob.session_id] is d.SessionState.ENDED
    async with engine.connect() as conn:
        opened_at = (
            await conn.execute(select(connections.c.opened_at).where(connections.c.connection_id == "c2"))
        ).scalar()
    assert opened_at is None  # the refused event wrote nothing
    await assert_live_counters_exact(engine)


async def test_a_batch_with_an_event_for_the_use_case_is_undone_and_applied_by_it(sqlite, monkeypatch):
    """A close for a session whose pool is not found by its stored name is the use case's (it
    resolves the pool case-insensitively, or takes the defaults): the hot path's transaction is
    undone, nothing of it remains, and the batch applies as the use cases."""
    service, engine, clock = sqlite
    await seed(engine, server(A))
    kim = await service.route(d.RouteRequest("c1", proxy_id="p", cookie="kim"))
    lee = await service.route(d.RouteRequest("c2", proxy_id="p", cookie="lee"))
    await service.report_connections([Opened(kim.session_id, "c1", "p"), Opened(lee.session_id, "c2", "p")])
    async with engine.begin() as conn:
        await conn.execute(update(sessions).where(sessions.c.id == kim.session_id).values(pool="DEFAULT"))
    undone: list[bool] = []
    real = service.reports._reports_embedded

    async def watched(*args: Any) -> bool:
        undone.append(not await real(*args))
        return not undone[-1]

    monkeypatch.setattr(service.reports, "_reports_embedded", watched)
    errors = await service.report_connections(
        [Closed(lee.session_id, "c2", 10, 6308, 30, ""), Closed(kim.session_id, "c1", 10, 6308, 30, "")]
    )
    assert errors == [None, None]
    assert undone == [True]
    for session_id in (kim.session_id, lee.session_id):
        async with engine.connect() as conn:
            row = (
                await conn.execute(
                    select(sessions.c.state, sessions.c.expires_at).where(sessions.c.id == session_id)
                )
            ).one()
        assert row.state == "disconnected"
        assert row.expires_at == clock.now + timedelta(seconds=3600)
    await assert_live_counters_exact(engine)


# --- on the loop's thread, without re-preparing, checkpoints off the loop ---------------------------


async def test_statements_run_on_the_event_loops_thread_and_are_not_prepared_again(sqlite):
    """No worker thread per statement; and a Route runs no PRAGMA (switching the isolation level
    did, and a PRAGMA makes SQLite prepare every cached statement again)."""
    service, engine, _ = sqlite
    await seed(engine, server(A))
    async with engine.connect() as conn:
        driver = (await conn.get_raw_connection()).driver_connection
        assert isinstance(driver, InlineConnection)
        driver.sqlite.create_function("thread_ident", 0, threading.get_ident)
        assert (await conn.exec_driver_sql("SELECT thread_ident()")).scalar() == threading.get_ident()
        seen: list[str] = []
        driver.sqlite.set_trace_callback(seen.append)
    try:
        decision = await service.route(d.RouteRequest("c1", proxy_id="p", cookie="alice"))
        await service.route(d.RouteRequest("c2", proxy_id="p", cookie="alice"))
        await service.report_connections([Opened(decision.session_id, "c2", "p")])
    finally:
        driver.sqlite.set_trace_callback(None)
    assert seen
    assert not [s for s in seen if "PRAGMA" in s.upper()]


async def test_no_use_of_the_store_lets_the_loop_turn_while_it_holds_the_connection(sqlite):
    """SQLite's gate has one slot and its statements run in place: a holder that let the event loop
    turn would keep every Route waiting for a turn of the loop, which lasts hundreds of milliseconds
    under a storm of thousands of connections (each queued Route handed on one per turn, the rest
    past their deadlines). SQLAlchemy's own connection exit runs its close in a task of its own:
    the store closes in place instead. Transactions, reads, Routes and reports alike."""
    service, engine, _ = sqlite
    await seed(engine, server(A))
    store = service.store
    loop = asyncio.get_running_loop()
    turned: list[str] = []
    real_slot = store.gate.slot

    @contextlib.asynccontextmanager
    async def watched_slot() -> AsyncIterator[None]:
        async with real_slot():
            handle = loop.call_soon(turned.append, "a holder let the loop turn")
            try:
                yield
            finally:
                handle.cancel()

    store.gate.slot = watched_slot  # type: ignore[method-assign]
    decision = await service.route(d.RouteRequest("c1", proxy_id="p", cookie="alice"))
    await service.route(d.RouteRequest("c2", proxy_id="p", cookie="bob"))
    await service.report_connections([Opened(decision.session_id, "c1", "p")])
    await service.sweep()
    await service.lookup_user_sessions("alice")
    async with store.transaction() as r:
        assert await r.servers.get(A) is not None
    assert turned == []


def test_the_hot_path_reads_the_live_session_indexes(tmp_path):
    """The context read and the account probes use the partial live-session indexes (SQLite uses
    one only when the query's terms imply its WHERE)."""

    async def migrated() -> None:
        engine = make_engine(f"sqlite:///{tmp_path / 'plan.db'}")
        await migrate.upgrade(engine)
        await engine.dispose()

    asyncio.run(migrated())
    conn = sqlite3.connect(tmp_path / "plan.db")
    plans = {
        name: " ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params))
        for name, sql, params in (
            ("context", embedded_sql.CONTEXT_NAMED, {"key": "k", "pool_key": "p"}),
            ("keys", embedded_sql.KEY_IN_RANGE, ("p", "a", "b")),
            ("names", embedded_sql.NAME_IN_RANGE, ("p", "a", "b")),
            ("newer", embedded_sql._NEWER_LIVE, ("s",)),
        )
    }
    conn.close()
    assert "uq_sessions_live_user" in plans["newer"], plans["newer"]
    assert "uq_sessions_live_user" in plans["context"]
    assert "uq_sessions_live_user" in plans["keys"]
    assert "ix_sessions_live_account" in plans["names"]


def test_the_checkpoint_thread_keeps_the_log_short_under_steady_writes(tmp_path):
    """A writer that never checkpoints and never pauses: the thread's passive checkpoints cannot
    finish, and past the bound it restarts the log; once the writes stop it is emptied."""
    path = tmp_path / "wal.db"
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.execute("CREATE TABLE t (x BLOB)")
    checkpointer = Checkpointer(str(path), interval_s=0.02, max_frames=64)
    checkpointer.start()
    wal = tmp_path / "wal.db-wal"
    frames: list[int] = []  # the log's length after each burst of writes, in pages
    try:
        for _ in range(30):  # over about half a second: the thread takes many rounds meanwhile
            for _ in range(100):
                writer.execute("INSERT INTO t VALUES (randomblob(3000))")  # ~3 pages each
            frames.append(wal.stat().st_size // 4096)
            time.sleep(0.02)
    finally:
        checkpointer.stop_soon()
        assert checkpointer._thread is not None
        checkpointer._thread.join(10)
    # Never checkpointed, the log would hold all ~9,000 pages written by the end.
    assert max(frames) < 9000 // 2, frames
    assert any(b < a for a, b in itertools.pairwise(frames)), frames  # emptied meanwhile
    assert wal.stat().st_size == 0
    assert writer.execute("SELECT count(*) FROM t").fetchone() == (3000,)
    writer.close()


async def test_the_hot_path_finds_a_new_connection_after_the_pool_closed_its_own(sqlite):
    """The hot path keeps the pool's one connection at hand; when the pool closes it (disposed,
    invalidated) the call goes the transactional way and the next takes the pool's new one."""
    service, engine, _ = sqlite
    await seed(engine, server(A))
    first = await service.route(d.RouteRequest("c1", proxy_id="p", cookie="alice"))
    await engine.dispose()
    again = await service.route(d.RouteRequest("c2", proxy_id="p", cookie="alice"))
    assert (again.reason, again.session_id) == (d.RouteReason.RECONNECT, first.session_id)
    third = await service.route(d.RouteRequest("c3", proxy_id="p", cookie="bob"))
    assert third.reason is d.RouteReason.NEW
    assert await service.report_connections([Opened(third.session_id, "c3", "p")]) == [None]
    await assert_live_counters_exact(engine)


async def test_sessions_that_expire_together_end_in_small_batches(sqlite, monkeypatch):
    """On SQLite a statement holds the event loop: the sweep ends expired sessions a batch at a time
    (every one of them, and it counts them all)."""
    from rdbroker_broker.service import sweeping

    service, engine, clock = sqlite
    await seed(engine, server(A), server(B))
    for n in range(5):
        await service.route(d.RouteRequest(f"c{n}", proxy_id="p", cookie=f"user{n}"))
    monkeypatch.setattr(sweeping, "SQLITE_EXPIRE_BATCH", 2)
    batches: list[int] = []
    real = service.run_tx

    async def counted(work: Any) -> Any:
        result = await real(work)
        if isinstance(result, int):
            batches.append(result)
        return result

    monkeypatch.setattr(service, "run_tx", counted)
    clock.advance(service.settings.pending_timeout_s + 1)
    counts = await service.sweep()
    assert counts["expired"] == 5
    assert batches[:3] == [2, 2, 1]
    assert not [
        s for n in range(5) for s in await service.lookup_user_sessions(f"user{n}") if s.is_live_at(clock.now)
    ]
    await assert_live_counters_exact(engine)
