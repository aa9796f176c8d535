"""The raw-psycopg Route hot path on PostgreSQL (`db/routing_sql.py`): one routing policy with the
domain rules, and a clean hand-over to the transactional path when it cannot answer."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from rdbroker_broker import domain as d
from rdbroker_broker.db import routing_sql
from rdbroker_broker.db.engine import make_engine
from rdbroker_broker.db.repositories import ServerRepository, new_session_id
from rdbroker_broker.db.tables import sessions
from rdbroker_broker.errors import NoCapacity
from rdbroker_broker.service import BrokerService
from rdbroker_broker.store import Store
from tests.integration.broker.conftest import Clock, assert_live_counters_exact, seed, server, settings_for

A, B = "10.0.0.1:3389", "10.0.0.2:3389"
NOW = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)

# Servers in every state the columns allow, with values around each threshold.
servers_strategy = st.lists(
    st.builds(
        lambda admin, health, agent, weight, load, max_sessions, live, placements, held, fresh: (
            admin, health, agent, weight, load, max_sessions, live, placements, held, fresh
        ),
        # Every state, the eligible ones more often (ranking needs several eligible servers).
        st.sampled_from(["enabled"] * 4 + [s.value for s in d.AdminState]),
        st.sampled_from(["up"] * 4 + [h.value for h in d.Health]),
        st.sampled_from(["none"] * 4 + [a.value for a in d.AgentState]),
        # Common values often, so that effective loads tie and the tie breaks are exercised.
        st.one_of(st.just(100), st.integers(-1, 300)),  # weight
        st.one_of(st.just(0), st.integers(-1, 101)),  # load
        st.integers(0, 5),  # max_sessions
        st.integers(0, 6),  # live_sessions
        st.one_of(st.just(0), st.integers(0, 6)),  # placements_since_report
        st.integers(0, 6),  # held_sessions (independent of live_sessions: closed claims hold none)
        st.integers(0, 3),  # fresh_until: FRESH_UNTIL[i] (never probed, stale, stale at NOW, fresh)
    ),
    min_size=1,
    max_size=12,
)  # fmt: skip


EXPIRIES = [None, NOW - timedelta(seconds=1), NOW, NOW + timedelta(seconds=1)]
FRESH_UNTIL = EXPIRIES  # a result is stale from its fresh_until on
sessions_strategy = st.lists(
    st.tuples(st.sampled_from(["pending", "active", "disconnected"]), st.integers(0, len(EXPIRIES) - 1)),
    max_size=12,
)


def _replace_farm(
    conn: psycopg.Connection, rows: list[tuple[object, ...]], sessions: list[tuple[str, int]]
) -> None:
    """Servers from `rows`, and on server i a live session of user `u{i}` (state, expiry index)."""
    conn.execute("DELETE FROM connections")
    conn.execute("DELETE FROM sessions")
    conn.execute("DELETE FROM servers")
    for i, (admin, health, agent, weight, load, max_s, live, placed, held, fresh) in enumerate(rows):
        conn.execute(
            "INSERT INTO servers (address, pool, weight, max_sessions, admin_state, health, health_detail,"
            " agent_state, agent_detail, load, placements_since_report, live_sessions, held_sessions,"
            " fresh_until, agent_url, sessions_url, created_at, updated_at)"
            " VALUES (%s, 'default', %s, %s, %s, %s, '', %s, '', %s, %s, %s, %s, %s, '', '', now(), now())",
            (_address(i), weight, max_s, admin, health, agent, load, placed, live, held, FRESH_UNTIL[fresh]),
        )
    for i, (state, expiry) in enumerate(sessions[: len(rows)]):
        conn.execute(
            'INSERT INTO sessions (id, pool, "user", user_key, server_address, state, learnt_from,'
            " client_address, created_at, updated_at, expires_at, end_reason)"
            " VALUES (%s, 'default', %s, %s, %s, %s, 'route', '', now(), now(), %s, '')",
            (f"s{i}", f"U{i}", f"u{i}", _address(i), state, EXPIRIES[expiry]),
        )


# Names whose order differs between code points (Python) and a linguistic collation.
NAMES = ["10.0.0.9", "10.0.0.10", "10.0.0.1", "rdsh-a", "rdsh-B", "RDSH-c", "rdsh_a", "rdsh-a2", "Rdsh-b",
         "10.0.1.0", "rdsh.a", "rdsha"]  # fmt: skip


def _address(i: int) -> str:
    return f"{NAMES[i]}:3389"


def _context(
    conn: psycopg.Connection,
    user_key: str | None,
    connection_id: str,
    *,
    place: bool = False,
    wait: bool = False,
) -> tuple[object, ...]:
    """The context statement's row; with `place`, the placing one (with `wait`, its variant that
    queues for a locked server), rolled back (the farm stays)."""
    params: dict[str, object] = {
        "user_key": user_key,
        "now": NOW,
        "connection_id": connection_id,
        "attempt": 0,
        "proxy_id": "p1",
        "client_address": "",
        "domain": "",
        "upn_suffixes": "",
    }
    if not place:
        row = conn.execute(routing_sql.CONTEXT_DEFAULT, params).fetchone()
        assert row is not None
        return tuple(row)
    user = user_key or ""
    params |= {
        "session_id": new_session_id(),
        "user": user,
        "account_name": user or None,
        "session_proxy_id": "p1",
        "expires_at": NOW + timedelta(seconds=30),
        "reason": "new" if user else "no_identity",
    }
    with conn.transaction(force_rollback=True):
        statement = routing_sql.CONTEXT_PLACE_WAIT_DEFAULT if wait else routing_sql.CONTEXT_PLACE_DEFAULT
        row = conn.execute(statement, params).fetchone()
    assert row is not None
    return tuple(row)


async def test_sql_rules_and_placement_equal_the_domain_rules(engine, pg_database_url):
    """Over generated farms, in a breadth pool and in a depth pool: `eligible_sql` is
    `domain.takes_new_sessions`; ordering by `rank_key_sql` is `domain.rank_for_new_session` for the
    pool's placement, so the placing statement places a new user (with or without identity) where
    `domain.choose_server` would, and nowhere when it finds none; the context statements store a
    reconnect answer exactly when `Session.is_live_at` and `domain.takes_reconnects` say so, and never
    place a user who has a live session. Every rule applies to the servers as seen at the statement's
    time (`domain.as_seen_at`: a stale health result reads as none), among servers never probed, stale
    and fresh."""
    await seed(engine, server(A))
    checked = 0

    with psycopg.connect(pg_database_url, autocommit=True) as conn:
        # A database whose default collation is linguistic: the ranking's address order must not
        # follow it (Python compares code points).
        conn.execute('ALTER TABLE servers ALTER COLUMN address TYPE varchar(255) COLLATE "en-x-icu"')

        @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(rows=servers_strategy, sessions=sessions_strategy)
        def check(rows: list[tuple[object, ...]], sessions: list[tuple[str, int]]) -> None:
            nonlocal checked
            _replace_farm(conn, rows, sessions)
            stored = _servers_from_table(conn)
            table = [d.as_seen_at(s, NOW) for s in stored]
            at = {"now": NOW}
            eligible = f"SELECT address FROM servers c WHERE {routing_sql.eligible_sql('c')}"
            assert {r[0] for r in conn.execute(eligible, at)} == {
                s.address for s in table if d.takes_new_sessions(s)
            }
            ranking = f"servers c, {routing_sql.rank_values_sql('c')}"
            loads: dict[str, float] = dict(
                conn.execute(f"SELECT address, {routing_sql.effective_load_sql('c')} FROM {ranking}", at)
            )
            assert loads == {s.address: d.effective_load(s) for s in table}  # equal floats, to the bit
            for placement in d.Placement:
                conn.execute("UPDATE pools SET placement = %s", (placement.value,))
                ranked_sql = [
                    r[0]
                    for r in conn.execute(
                        f"SELECT address FROM {ranking} WHERE {routing_sql.eligible_sql('c')}"
                        f" ORDER BY {routing_sql.rank_key_sql('c')}",
                        at,
                    )
                ]
                ranked = [s.address for s in d.rank_for_new_session(table, placement=placement)]
                assert ranked_sql == ranked, placement
                # The one-statement placement takes the domain's choice (nothing locked here), and
                # so does its variant that queues for a locked server.
                best = ranked[0] if ranked else None
                for wait in (False, True):
                    assert _context(conn, "nobody", "c-none", place=True, wait=wait)[-2:] == (False, best)
                    assert _context(conn, None, "c-anon", place=True, wait=wait)[-2:] == (False, best)
            by_address = {s.address: s for s in table}
            for i, (state, expiry) in enumerate(sessions[: len(rows)]):
                expires = EXPIRIES[expiry]
                live = expires is None or expires > NOW
                takes = live and d.takes_reconnects(by_address[_address(i)])
                assert _context(conn, f"u{i}", f"c{i}")[-2:] == (takes, None), (state, expiry)
                assert _context(conn, f"u{i}", f"p{i}", place=True)[-2:] == (takes, None), (state, expiry)
            checked += 1

        check()
    assert checked >= 20


def _servers_from_table(conn: psycopg.Connection) -> list[d.Server]:
    """Every server as ranking reads it, column by column (as `ServerRepository.list` maps them)."""
    rows = conn.execute(
        "SELECT address, pool, weight, max_sessions, admin_state, health, agent_state, load,"
        " placements_since_report, live_sessions, held_sessions, fresh_until"
        " FROM servers WHERE pool = 'default'"
    ).fetchall()
    return [routing_sql._server(r) for r in rows]


async def test_the_live_server_matches_the_repository(engine, service):
    """The context statement reads every field the domain's rules read of the live session's
    server, as the SQLAlchemy repository maps them."""
    await seed(engine, server(A, weight=50, max_sessions=4), server(B, max_sessions=0))
    first = await service.route(d.RouteRequest(connection_id="c1", cookie="alice"))
    async with service.store.raw_autocommit() as conn:
        found = await routing_sql.route_context(conn, d.RouteRequest(connection_id="c2"), "alice", NOW)
    assert found is not None
    assert found.live is not None
    assert found.live.session_id == first.session_id
    assert found.answered
    assert found.placed is None
    async with engine.connect() as conn_sa:
        listed = await ServerRepository(conn_sa).list("default")
    fields = ("address", "pool", "weight", "max_sessions", "admin_state", "health", "agent_state", "load",
              "placements_since_report", "live_sessions", "held_sessions", "fresh_until")  # fmt: skip
    [expected] = [s for s in listed if s.address == first.server_address]
    assert [getattr(found.server, f) for f in fields] == [getattr(expected, f) for f in fields]


async def _placed_at_once(
    pg_database_url: str, clock: Clock, users: list[str]
) -> list[d.RouteDecision | BaseException]:
    """Route every user at once, alternately through two broker replicas (each its own pool)."""
    engines = [make_engine(pg_database_url, pool_size=30) for _ in range(2)]
    replicas = [BrokerService(Store(e), settings_for(pg_database_url), clock) for e in engines]
    try:
        return await asyncio.gather(
            *(
                replicas[u % 2].route(d.RouteRequest(connection_id=f"c{u}", cookie=user))
                for u, user in enumerate(users)
            ),
            return_exceptions=True,
        )
    finally:
        for e in engines:
            await e.dispose()


async def test_concurrent_placements_never_exceed_a_limit(engine, pg_database_url, clock):
    """Two replicas place 60 new users at once on 4 servers of 5 sessions: exactly 20 are placed,
    none over a limit (the locked row is re-checked), the rest are refused (RESOURCE_EXHAUSTED)."""
    await seed(engine, *(server(f"10.0.3.{i}:3389", max_sessions=5) for i in range(1, 5)))
    results = await _placed_at_once(pg_database_url, clock, [f"user{u}" for u in range(60)])
    placed = [r for r in results if isinstance(r, d.RouteDecision)]
    assert all(isinstance(r, NoCapacity) for r in results if not isinstance(r, d.RouteDecision)), results
    assert len(placed) == 20
    assert {r.reason for r in placed} == {d.RouteReason.NEW}
    assert Counter(r.server_address for r in placed) == {f"10.0.3.{i}:3389": 5 for i in range(1, 5)}
    await assert_live_counters_exact(engine)


async def test_a_burst_of_placements_spreads_evenly(engine, pg_database_url, clock):
    """200 new users at once through two replicas on 4 equal servers: placements that find every
    server held take turns and look again before they queue for one, so none piles onto the server
    that was best when many of them looked (queued at once: 40/44/56/60; through the transactional
    path: 38/38/39/85)."""
    await seed(engine, *(server(f"10.0.3.{i}:3389") for i in range(1, 5)))
    results = await _placed_at_once(pg_database_url, clock, [f"user{u:05d}" for u in range(200)])
    assert all(isinstance(r, d.RouteDecision) for r in results), results
    spread = Counter(r.server_address for r in results if isinstance(r, d.RouteDecision))
    assert all(45 <= n <= 55 for n in spread.values()), spread
    await assert_live_counters_exact(engine)


async def test_a_truncated_cookie_takes_the_transactional_path(engine, service):
    """A 9-character cookie with no live session of its own may name a session linked to the full
    user name: the placing statement must not place it, the transactional path reconnects it."""
    await seed(engine, server(A), server(B))
    linked = await service.route(d.RouteRequest(connection_id="c1", cookie="FTBCO\\A7006799"))
    again = await service.route(d.RouteRequest(connection_id="c2", cookie="FTBCO\\A70"))
    assert (again.reason, again.session_id) == (d.RouteReason.RECONNECT, linked.session_id)


async def test_a_repeated_connection_id_gets_its_first_answer(engine, service):
    await seed(engine, server(A), server(B))
    first = await service.route(d.RouteRequest(connection_id="same", cookie="alice"))
    again = await service.route(d.RouteRequest(connection_id="same", cookie="alice"))
    assert again == first
    assert first.reason is d.RouteReason.NEW
    async with service.store.raw_autocommit() as conn:
        cur = await conn.execute("SELECT count(*) FROM sessions")
        assert await cur.fetchone() == (1,)
    await assert_live_counters_exact(engine)


async def test_a_repeated_placement_gets_its_first_answer(engine, service):
    """Without identity nothing links the two calls but the connection id: the repeated placing
    statement fails whole on the answer's key (no second session), the transactional path answers
    what the first call stored."""
    await seed(engine, server(A), server(B))
    first = await service.route(d.RouteRequest(connection_id="same"))
    again = await service.route(d.RouteRequest(connection_id="same"))
    assert again == first
    assert first.reason is d.RouteReason.NO_IDENTITY
    async with service.store.raw_autocommit() as conn:
        cur = await conn.execute("SELECT count(*) FROM sessions")
        assert await cur.fetchone() == (1,)
        cur = await conn.execute("SELECT placements_since_report FROM servers ORDER BY address")
        assert sorted(r[0] for r in await cur.fetchall()) == [0, 1]
    await assert_live_counters_exact(engine)


def _transactional_routes(service: BrokerService, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The connection ids the transactional path routes from now on."""
    taken: list[str] = []
    real_route = service.routing._route

    async def counted(r, request, *args):
        taken.append(request.connection_id)
        return await real_route(r, request, *args)

    monkeypatch.setattr(service.routing, "_route", counted)
    return taken


async def test_a_statement_that_found_every_server_locked_runs_again_waiting(engine, service, monkeypatch):
    """Under a logon storm every eligible server may be locked by other placements at the
    statement's snapshot (SKIP LOCKED): it places nobody and writes nothing. It runs again, at last
    queueing for the best server's lock, before the transactional path; when nothing is free the
    transactional path still says why."""
    await seed(engine, server(A, max_sessions=1))
    real = routing_sql.route_context
    calls: list[tuple[bool, bool]] = []

    async def all_locked_once(conn, request, key, now, placement=None, pool_accounts=("", ""), wait=False):
        found = await real(conn, request, key, now, None if not calls else placement, pool_accounts, wait)
        calls.append((placement is not None, wait))
        return found

    monkeypatch.setattr(routing_sql, "route_context", all_locked_once)
    taken = _transactional_routes(service, monkeypatch)
    first = await service.route(d.RouteRequest(connection_id="c1", cookie="alice"))
    assert first.reason is d.RouteReason.NEW
    assert (calls, taken) == ([(True, False), (True, False)], [])
    calls.clear()
    with pytest.raises(NoCapacity):  # the one server is full: every try places nobody
        await service.route(d.RouteRequest(connection_id="c2", cookie="bob"))
    assert calls == [(True, False), (True, False), (True, True)]
    assert taken == ["c2"]
    await assert_live_counters_exact(engine)


async def _lock_waits(conn: psycopg.AsyncConnection, locker_pid: int) -> int:
    """How many backends wait for a lock `locker_pid` holds."""
    cur = await conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))", (locker_pid,)
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def _until_waiting(conn: psycopg.AsyncConnection, locker_pid: int) -> None:
    for _ in range(500):
        if await _lock_waits(conn, locker_pid):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no placement queued for the held server")


async def _routed_while_every_server_is_held(
    service: BrokerService,
    pg_database_url: str,
    meanwhile: Callable[[psycopg.AsyncConnection], Awaitable[None]] | None = None,
) -> d.RouteDecision:
    """Route a new user while another transaction holds every server row; once the placement waits
    for one, `meanwhile` runs in that transaction, which then commits."""
    async with await psycopg.AsyncConnection.connect(pg_database_url) as locker:
        await locker.execute("SELECT address FROM servers ORDER BY address FOR UPDATE")
        watch = await psycopg.AsyncConnection.connect(pg_database_url, autocommit=True)
        async with watch, asyncio.TaskGroup() as tasks:
            routed = tasks.create_task(service.route(d.RouteRequest(connection_id="c1", cookie="alice")))
            await _until_waiting(watch, locker.info.backend_pid)
            assert not routed.done()
            if meanwhile is not None:
                await meanwhile(locker)
            await locker.commit()
    return routed.result()


async def test_a_placement_queues_for_a_held_server_in_one_statement(
    engine, service, pg_database_url, monkeypatch
):
    """Every server held by another transaction (another placement, a proxy's report batch): the
    placement passes them over, then queues for the best one and is placed there in one statement
    once it is free, not by the transactional path."""
    await seed(engine, server(A), server(B))
    taken = _transactional_routes(service, monkeypatch)
    decision = await _routed_while_every_server_is_held(service, pg_database_url)
    assert decision.reason is d.RouteReason.NEW
    assert decision.server_address == A  # the best at its snapshot: equal loads, address order
    assert taken == []
    await assert_live_counters_exact(engine)


async def test_a_queued_placement_passes_over_a_server_that_filled_meanwhile(
    engine, service, pg_database_url, monkeypatch
):
    """The server a placement queued for took its last session while the placement waited: its row
    is re-checked under the lock and the placement goes to the next server, in the same statement;
    no limit is exceeded."""
    await seed(engine, server(A, max_sessions=1), server(B))
    taken = _transactional_routes(service, monkeypatch)

    async def fill_a(locker: psycopg.AsyncConnection) -> None:
        # A session placed on A by the lock's holder: A is full when the lock is granted.
        await locker.execute(
            'INSERT INTO sessions (id, pool, "user", user_key, server_address, state, learnt_from,'
            " client_address, created_at, updated_at, end_reason) VALUES"
            " ('held', 'default', 'carol', 'carol', %s, 'active', 'route', '', now(), now(), '')",
            (A,),
        )

    decision = await _routed_while_every_server_is_held(service, pg_database_url, fill_a)
    assert decision.reason is d.RouteReason.NEW
    assert decision.server_address == B
    assert taken == []
    await assert_live_counters_exact(engine)


async def test_no_identity_placements_take_the_fast_path_and_spread(engine, service):
    await seed(engine, server(A), server(B))
    placed = [(await service.route(d.RouteRequest(connection_id=f"n{i}"))) for i in range(4)]
    assert {p.reason for p in placed} == {d.RouteReason.NO_IDENTITY}
    assert sorted(p.server_address for p in placed) == [A, A, B, B]
    await assert_live_counters_exact(engine)


async def test_a_dead_pooled_connection_is_replaced(engine, service, pg_database_url):
    """A pooled connection killed under the broker: the call still answers, the pool drops it."""
    await seed(engine, server(A))
    await service.route(d.RouteRequest(connection_id="warm", cookie="alice"))
    with psycopg.connect(pg_database_url, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    answer = await service.route(d.RouteRequest(connection_id="after", cookie="alice"))
    assert answer.reason is d.RouteReason.RECONNECT
    assert answer.server_address == A
    again = await service.route(d.RouteRequest(connection_id="after2", cookie="bob"))
    assert again.reason is d.RouteReason.NEW


async def test_the_domain_overrules_sql_on_a_reconnect(engine, service, monkeypatch):
    """Should SQL's copy of the reconnect rule ever accept what the domain refuses, the stored answer
    is taken back and the transactional path decides (here: the session ends, the user is placed)."""
    await seed(engine, server(A), server(B))
    first = await service.route(d.RouteRequest(connection_id="c1", cookie="alice"))
    monkeypatch.setattr(d, "takes_reconnects", lambda s: False)
    again = await service.route(d.RouteRequest(connection_id="c2", cookie="alice"))
    assert again.reason is d.RouteReason.NEW
    assert again.session_id != first.session_id
    async with service.store.raw_autocommit() as conn:
        cur = await conn.execute("SELECT reason FROM connections WHERE connection_id = 'c2'")
        assert await cur.fetchall() == [("new",)]
    await assert_live_counters_exact(engine)


async def test_a_truncated_cookie_nobody_else_starts_with_is_placed_in_one_statement(
    engine, service, monkeypatch
):
    """mstsc cuts every `DOMAIN\\user` to 9 characters: a logon storm of such cookies must not
    queue on the transactional path when no live session's user starts with the cookie."""
    await seed(engine, server(A), server(B))
    # A longer user elsewhere in the key order, and a live session with the same 8 characters.
    await service.route(d.RouteRequest(connection_id="o1", cookie="FTBCO\\A7X"))
    await service.route(d.RouteRequest(connection_id="o2", cookie="FTBCO\\A8006799"))

    async def no_transaction(work: object) -> object:
        raise AssertionError("the transactional path ran")

    monkeypatch.setattr(service, "run_tx", no_transaction)
    placed = await service.route(d.RouteRequest(connection_id="c1", cookie="FTBCO\\A70"))
    assert placed.reason is d.RouteReason.NEW
    again = await service.route(d.RouteRequest(connection_id="c2", cookie="ftbco\\a70"))
    assert (again.reason, again.session_id) == (d.RouteReason.RECONNECT, placed.session_id)
    await assert_live_counters_exact(engine)


def _probe_conditions(plan: str, alias: str) -> list[str]:
    """Each scan of `sessions <alias>` in the plan: its index and its index condition."""
    lines = plan.splitlines()
    found = []
    for at, line in enumerate(lines):
        if f" on sessions {alias}" in line:
            assert "Scan using" in line, line  # an index, never the whole table
            condition = next(x for x in lines[at + 1 :] if "Index Cond:" in x).strip()
            found.append(line.split("Scan using ", 1)[1].split(" on ", 1)[0] + ": " + condition)
    return found


@pytest.mark.parametrize("stats", ["analyzed", "stale"])
@pytest.mark.parametrize("plan_cache_mode", ["force_custom_plan", "force_generic_plan"])
async def test_the_prefix_guard_reads_the_prefix_index(
    engine, service, pg_database_url, plan_cache_mode, stats
):
    """Also with statistics from when the table was empty (before autovacuum's next analyze), which
    once made the planner probe the whole index and filter the pool afterwards."""
    await seed(engine, server(A))
    with psycopg.connect(pg_database_url, autocommit=True) as conn:
        if stats == "stale":
            conn.execute("ANALYZE sessions")
        conn.execute(
            """INSERT INTO sessions (id, pool, "user", user_key, server_address, state, learnt_from,
                                     client_address, created_at, updated_at, end_reason)
               SELECT 'x' || n, 'default', 'u' || n, 'u' || n, %s,
                      CASE WHEN n %% 3 = 0 THEN 'ended' ELSE 'disconnected' END, 'route', '',
                      now(), now(), ''
               FROM generate_series(1, 5000) n""",
            (A,),
        )
        if stats == "analyzed":
            conn.execute("ANALYZE sessions")
        conn.execute(f"SET plan_cache_mode = {plan_cache_mode}")  # psycopg prepares hot statements
        params = {
            "user_key": "ftbco\\a70", "kf": ["ftbco\\a70", "a70"], "kt": ["ftbco\\a71", "a71"],
            "nf": ["a70"], "nt": ["a71"], "domain": "", "upn_suffixes": "", "account_name": "a70",
            "pool_key": "", "now": NOW, "connection_id": "c1", "attempt": 0, "proxy_id": "p",
            "client_address": "", "session_id": "s1", "user": "FTBCO\\A70", "session_proxy_id": "p",
            "expires_at": NOW, "reason": "new",
        }  # fmt: skip
        statement = routing_sql._PLACING[(True, True, False)][0]  # key ranges and user-part ranges
        plan = "\n".join(row[0] for row in conn.execute("EXPLAIN " + statement, params))
    assert "uq_sessions_live_user on sessions t" in plan, plan
    assert "ix_sessions_live_account on sessions t" in plan, plan
    assert "Seq Scan on sessions" not in plan, plan
    guards = _probe_conditions(plan, "t")
    assert len(guards) == 2, plan  # one probe per range list, each range one index probe
    # Each probe is bounded by the pool too (the index's leading column), or it walks every key.
    assert all("(pool = " in c and ("~>=~" in c) for c in guards), plan
    # The read of the user's live session is bounded by the user's key: by (pool, user_key) on the
    # live-user index, or by user_key on its own index; never user_key alone on the live-user index.
    (live,) = _probe_conditions(plan, "l")
    assert "user_key" in live, plan
    assert "(pool" in live or live.startswith("ix_sessions_user_key: "), plan


@pytest.mark.parametrize("cookie", ["CORP\\alice", "CORP\\alic"])
async def test_a_domain_cookie_finds_the_session_the_server_reported_by_bare_name(
    engine, service, probes, cookie
):
    """quser prints no domain: a session the agent found for `alice` is the `CORP\\alice` user's
    (full or cut to 9 characters by mstsc), not a reason to give them a second session."""
    await seed(engine, server(A), server(B))
    await probes.claim_targets("r1", 60_000)
    await probes.report_sessions("r1", A, [d.ReportedSession("alice", d.SessionState.DISCONNECTED)])
    (reported,) = await service.lookup_user_sessions("alice")
    found = await service.route(d.RouteRequest(connection_id="c1", cookie=cookie))
    assert (found.reason, found.server_address) == (d.RouteReason.RECONNECT, A)
    assert found.session_id == reported.session_id
    # Linked to the full name: the next full cookie finds it in one statement.
    (linked,) = await service.lookup_user_sessions("CORP\\alice")
    assert linked.user == "CORP\\alice"
    again = await service.route(d.RouteRequest(connection_id="c2", cookie="corp\\ALICE"))
    assert again.session_id == reported.session_id


async def test_a_domain_cookie_never_takes_another_domains_session(engine, service, probes):
    await seed(engine, server(A), server(B))
    await service.route(d.RouteRequest(connection_id="c0", cookie="OTHER\\alice"))
    placed = await service.route(d.RouteRequest(connection_id="c1", cookie="CORP\\alice"))
    assert placed.reason is d.RouteReason.NEW
    await assert_live_counters_exact(engine)


async def test_a_domain_cookie_without_a_bare_session_is_placed_in_one_statement(
    engine, service, monkeypatch
):
    await seed(engine, server(A), server(B))
    await service.route(d.RouteRequest(connection_id="o1", cookie="alice2"))  # not `alice`

    async def no_transaction(work: object) -> object:
        raise AssertionError("the transactional path ran")

    monkeypatch.setattr(service, "run_tx", no_transaction)
    placed = await service.route(d.RouteRequest(connection_id="c1", cookie="CORP\\alice"))
    assert placed.reason is d.RouteReason.NEW


async def test_a_pool_whose_account_settings_changed_is_routed_by_the_transactional_path(
    engine, service, monkeypatch
):
    """The statement's key was made with the pool's account settings as the broker last read them:
    when the row says otherwise, it stores and places nothing; the transactional path answers with
    the pool's settings, and the next Route is one statement again."""
    corp = d.Pool("default", True, 3600.0, domain="CORP", upn_suffixes=("corp.example.com",))
    await seed(engine, server(A), server(B), pools=(corp,))
    transactions: list[object] = []
    original = service.run_tx

    async def counted(work):
        transactions.append(work)
        return await original(work)

    monkeypatch.setattr(service, "run_tx", counted)
    placed = await service.route(d.RouteRequest(connection_id="c1", cookie="bob"))  # settings unknown
    assert placed.reason is d.RouteReason.NEW
    assert len(transactions) == 1
    async with engine.connect() as conn:
        (key,) = (await conn.execute(select(sessions.c.user_key))).scalars()
    assert key == "corp\\bob"
    again = await service.route(d.RouteRequest(connection_id="c2", cookie="BOB@corp.example.com"))
    assert (again.reason, again.session_id) == (d.RouteReason.RECONNECT, placed.session_id)
    assert len(transactions) == 1  # one statement


def test_guard_ranges_reach_postgresql_as_they_are(pg_database_url):
    """The guard's ranges travel as array literals: backslashes, quotes, braces, commas, spaces and
    control characters arrive unchanged."""
    characters = st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00")
    with psycopg.connect(pg_database_url, autocommit=True) as conn:

        @given(st.lists(st.text(characters, max_size=8)))
        @example(["corp\\alic\x01", 'a"b', "{x, y}", " ", "", "NULL", "\\"])
        @settings(max_examples=300, deadline=None)
        def check(values: list[str]) -> None:
            row = conn.execute("SELECT %s::text[]", (routing_sql._text_array(values),)).fetchone()
            assert row is not None
            assert row[0] == values

        check()


async def test_concurrent_placements_in_a_depth_pool_never_exceed_a_limit(engine, pg_database_url, clock):
    """Depth sends every placement to the same busiest server: under 60 concurrent new users on two
    replicas each server still takes exactly its 5 (the locked row is re-checked), the rest are refused."""
    depth = d.Pool("default", True, 3600.0, placement=d.Placement.DEPTH)
    await seed(engine, *(server(f"10.0.3.{i}:3389", max_sessions=5) for i in range(1, 5)), pools=(depth,))
    engines = [make_engine(pg_database_url, pool_size=30) for _ in range(2)]
    replicas = [BrokerService(Store(e), settings_for(pg_database_url), clock) for e in engines]
    try:
        results = await asyncio.gather(
            *(
                replicas[u % 2].route(d.RouteRequest(connection_id=f"c{u}", cookie=f"user{u}"))
                for u in range(60)
            ),
            return_exceptions=True,
        )
    finally:
        for e in engines:
            await e.dispose()
    placed = [r for r in results if isinstance(r, d.RouteDecision)]
    assert all(isinstance(r, NoCapacity) for r in results if not isinstance(r, d.RouteDecision)), results
    assert Counter(r.server_address for r in placed) == {f"10.0.3.{i}:3389": 5 for i in range(1, 5)}
    await assert_live_counters_exact(engine)
