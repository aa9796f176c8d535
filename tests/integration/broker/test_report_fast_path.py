"""Connection reports on PostgreSQL take one statement each (`db/report_sql.py`), on SQLite plain
sqlite3 calls (`db/embedded_sql.py`, test_embedded_sqlite.py); the transactional use case is the
reference. Generated scripts of opened/closed events, operator ends, expiry and
new placements run twice, in two mirrored sets of users: once through `report_connections` (the
fast path, falling back where it must) and once through the use case alone. Every event's outcome
and every row they touch must come out the same."""

from __future__ import annotations

import asyncio
import random
import re
from datetime import UTC, datetime
from typing import Any
from unittest.mock import patch

import psycopg
import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from rdbroker_broker import domain as d
from rdbroker_broker import metrics
from rdbroker_broker.db import embedded_sql, report_sql
from rdbroker_broker.db.tables import connections, sessions
from rdbroker_broker.errors import NotFound
from rdbroker_broker.rpc import convert
from rdbroker_broker.service import BrokerService, Closed, ConnectionEvent, Opened
from rdbroker_proto.v1 import broker_pb2 as pb
from tests.integration.broker.conftest import Clock, seed, server

A = "10.0.0.1:3389"
SCRIPTS = 60
SESSIONS = 200
SESSION_FIELDS = (
    "state", "server_address", "connection_id", "proxy_id", "opened_at", "disconnected_at",
    "expires_at", "ended_at", "end_reason", "updated_at", "confirmed",
)  # fmt: skip
# Bytes from the server at a close: around the default junk_bytes (2048), and a real logon's.
SERVER_BYTES = (0, 19, 2047, 2048, 6308)
CONNECTION_FIELDS = (
    "attempt", "reason", "opened_at", "closed_at", "bytes_from_client", "bytes_from_server",
    "duration_ms", "end_reason",
)  # fmt: skip


async def route(service: BrokerService, connection_id: str, user: str) -> str:
    request = pb.RouteRequest(connection_id=connection_id, proxy_id="p1", cookie=user)
    return (await service.route(convert.route_request(request))).session_id


def script(rng: random.Random) -> list[tuple[str, ...]]:
    """Steps over one user's connections c0..c2 (c0 routed first, the others routed on the way)."""
    steps: list[tuple[str, ...]] = []
    routed = 1
    for _ in range(rng.randint(1, 9)):
        roll = rng.random()
        if roll < 0.1 and routed < 3:
            steps.append(("route", f"c{routed}"))
            routed += 1
        elif roll < 0.15:
            steps.append(("end",))  # the operator ends the user's live session
        elif roll < 0.2:
            steps.append(("expire",))  # time passes beyond every timeout; the sweep runs
        elif roll < 0.25:
            steps.append(("unknown",))  # a report naming a session that does not exist
        elif roll < 0.3:
            steps.append(("confirm",))  # the server's agent lists the user's live session
        else:
            connection = f"c{rng.randrange(routed)}"
            reason = rng.choice(["", "client_closed", "server_closed"])
            # Opened more often than not: a claim is junk only once its connection reached the server.
            kind = rng.choice(["opened", "opened", "closed"])
            steps.append((kind, connection, reason, str(rng.choice(SERVER_BYTES))))
    return steps


class World:
    """One user's connections and sessions, under a prefix so two worlds share a database."""

    def __init__(self, service: BrokerService, clock: Clock, prefix: str, fast: bool) -> None:
        self.service, self.clock, self.prefix, self.fast = service, clock, prefix, fast
        self.session_of: dict[str, str] = {}  # connection -> the session its route answered
        self.outcomes: list[str] = []

    async def step(self, step: tuple[str, ...]) -> None:
        if step[0] == "route":
            await self.routed(step[1])
        elif step[0] == "confirm":
            async with self.service.store.transaction() as r:
                await r.conn.execute(
                    update(sessions)
                    .where(sessions.c.user == self.user, sessions.c.state != "ended")
                    .values(confirmed=True)
                )
        else:  # "end"
            for session in await self.service.lookup_user_sessions(self.user):
                await self.service.end_session(session.session_id)

    def event(self, step: tuple[str, ...]) -> ConnectionEvent:
        kind = step[0]
        if kind == "unknown":
            return Opened(f"{self.prefix}-nosuch", f"{self.prefix}-c9", "p1")
        if kind == "opened":
            return Opened(self.session_of[step[1]], self.cid(step[1]), "p1")
        return Closed(self.session_of[step[1]], self.cid(step[1]), 10, int(step[3]), 30, step[2])

    @property
    def user(self) -> str:
        return f"{self.prefix}user"

    def cid(self, connection: str) -> str:
        return f"{self.prefix}-{connection}"

    async def routed(self, connection: str) -> None:
        try:
            self.session_of[connection] = await route(self.service, self.cid(connection), self.user)
        except Exception as exc:  # both worlds must fail alike
            self.outcomes.append(f"route {type(exc).__name__}")

    async def report(self, steps: list[tuple[str, ...]]) -> None:
        """The fast world sends consecutive reports as one batch, as a proxy does; the reference
        world applies them one by one through the use case."""
        events = [self.event(step) for step in steps]
        if self.fast:
            errors = await self.service.report_connections(events)
        else:
            errors = []
            for event in events:
                try:
                    await self.service.reports._report_use_case(event)
                    errors.append(None)
                except Exception as exc:
                    errors.append(exc)
        self.outcomes.extend(type(error).__name__ if error else "ok" for error in errors)


REPORTS = ("opened", "closed", "unknown")


def groups(steps: list[tuple[str, ...]]) -> list[list[tuple[str, ...]]]:
    """Consecutive reports in one group (one batch); every other step alone."""
    found: list[list[tuple[str, ...]]] = []
    for step in steps:
        if step[0] in REPORTS and found and found[-1][0][0] in REPORTS:
            found[-1].append(step)
        else:
            found.append([step])
    return found


async def rows(engine: AsyncEngine, prefix: str) -> list[tuple[Any, ...]]:
    """The world's rows with its prefix taken out, so the two worlds compare equal."""
    async with engine.connect() as conn:
        s = await conn.execute(
            select(sessions.c.origin_connection_id, *(sessions.c[f] for f in SESSION_FIELDS))
            .where(sessions.c.user == f"{prefix}user")
            .order_by(sessions.c.created_at, sessions.c.origin_connection_id)
        )
        c = await conn.execute(
            select(connections.c.connection_id, *(connections.c[f] for f in CONNECTION_FIELDS))
            .where(connections.c.connection_id.like(f"{prefix}-%"))
            .order_by(connections.c.connection_id, connections.c.attempt)
        )
        found = [*s.all(), *c.all()]
    return [tuple(_unprefixed(v, prefix) for v in row) for row in found]


async def ended_sessions(engine: AsyncEngine, prefix: str) -> set[str]:
    async with engine.connect() as conn:
        found = await conn.execute(
            select(sessions.c.id).where(sessions.c.user == f"{prefix}user", sessions.c.state == "ended")
        )
        return set(found.scalars())


async def states(engine: AsyncEngine, prefix: str) -> set[tuple[str, bool, str]]:
    async with engine.connect() as conn:
        found = await conn.execute(
            select(sessions.c.end_reason, sessions.c.confirmed, sessions.c.state).where(
                sessions.c.user == f"{prefix}user"
            )
        )
        return {(reason, confirmed, state) for reason, confirmed, state in found}


def _unprefixed(value: object, prefix: str) -> object:
    if isinstance(value, str):
        return value.replace(prefix, "W")
    if isinstance(value, datetime):
        return value.isoformat()
    return value


async def test_reports_apply_as_the_use_case_does_over_generated_scripts(engine, service, clock):
    await reports_match_the_use_case(engine, service, clock)


async def reports_match_the_use_case(engine: AsyncEngine, service: BrokerService, clock: Clock) -> None:
    """The check above, on the store of `engine` (SQLite's fast path runs it too). Neither fast
    path needs the use case for these events: both revive ended sessions themselves."""
    await seed(engine, server(A))  # one server: both worlds place alike
    rng = random.Random(20261127)
    fell_back = 0
    revived = 0
    all_outcomes: list[str] = []
    real_use_case = service.reports._report_use_case
    seen: set[tuple[str, bool, str]] = set()  # (end_reason, confirmed, state) after any step

    async def counted(event: ConnectionEvent) -> None:
        nonlocal fell_back
        fell_back += 1
        await real_use_case(event)

    # (With the use case counted, and each open with its close in one statement counted.)
    module = report_sql if service.store.is_postgres else embedded_sql
    with patch.object(module, "opened_closed", wraps=module.opened_closed) as fused:
        for n in range(SCRIPTS):
            steps = script(rng)
            fast, slow = World(service, clock, f"f{n}", fast=True), World(service, clock, f"s{n}", fast=False)
            # In lockstep, so both worlds see the same clock and the same sweeps.
            for group in groups([("route", "c0"), *steps]):
                if group[0][0] == "expire":
                    clock.advance(4000)
                    await service.sweep()
                    continue
                service.reports._report_use_case = counted  # type: ignore[method-assign]
                ended = await ended_sessions(engine, fast.prefix)
                await (fast.report(group) if group[0][0] in REPORTS else fast.step(group[0]))
                revived += len(ended - await ended_sessions(engine, fast.prefix))
                service.reports._report_use_case = real_use_case  # type: ignore[method-assign]
                await (slow.report(group) if group[0][0] in REPORTS else slow.step(group[0]))
                seen.update(await states(engine, fast.prefix))
            assert fast.outcomes == slow.outcomes, steps
            all_outcomes += fast.outcomes
            assert await rows(engine, fast.prefix) == await rows(engine, slow.prefix), steps
    # The scripts revive ended sessions, and refuse to when the user has a newer one, without the
    # use case; and they reach a claim ended as junk as well as claims and confirmed sessions
    # disconnected. An open followed by its close applies as one (`opened_closed`).
    assert fell_back == 0
    assert fused.call_count > 0
    assert revived > 0
    assert any("Conflict" in outcome for outcome in all_outcomes)
    assert ("abandoned", False, "ended") in seen
    assert ("", False, "disconnected") in seen
    assert ("", True, "disconnected") in seen


async def test_the_common_events_never_reach_the_use_case(engine, service, monkeypatch):
    await seed(engine, server(A))
    sid = await route(service, "c1", "kim")
    junk = await route(service, "j1", "scanner")

    async def refuse(event: ConnectionEvent) -> None:
        raise AssertionError(f"the use case ran for {event}")

    monkeypatch.setattr(service.reports, "_report_use_case", refuse)
    events: list[ConnectionEvent] = [
        Opened(sid, "c1", "p1"),
        Closed(sid, "c1", 1, 6308, 3, "client_closed"),
        Opened("nosuch", "c9", "p1"),
        Opened(junk, "j1", "p1"),
        Closed(junk, "j1", 19, 19, 3, "client_closed"),
    ]
    results = await service.report_connections(events)
    assert results[:2] == [None, None]
    assert isinstance(results[2], NotFound)
    assert results[3:] == [None, None]
    found = await service.lookup_user_sessions("kim")
    assert [s.state.value for s in found] == ["disconnected"]
    [ended] = await service.lookup_user_sessions("scanner", include_ended=True)
    assert (ended.state.value, ended.end_reason) == ("ended", "abandoned")


async def test_junk_ends_only_the_claim_its_own_connection_made(engine, service, monkeypatch):
    """Fewer than junk_bytes from the server ends an unconfirmed claim closed by the connection that
    made it; the same bytes leave a confirmed session, or a claim another connection came back to,
    disconnected. Both paths: the batch statement, and the use case."""
    await seed(engine, server(A))
    abandoned: list[int] = []
    monkeypatch.setattr(metrics, "record_abandoned", lambda count=1: abandoned.append(count))
    for fast in (True, False):

        async def apply(events: list[ConnectionEvent], fast: bool = fast) -> None:
            if fast:
                assert await service.report_connections(events) == [None] * len(events)
            else:
                for event in events:
                    await service.reports._report_use_case(event)

        claim, confirmed, back = [await route(service, f"{fast}{n}", f"{fast}user{n}") for n in range(3)]
        async with service.store.raw_autocommit() as conn:
            await conn.execute("UPDATE sessions SET confirmed = true WHERE id = %s", (confirmed,))
        await apply([Opened(back, f"{fast}2", "p1"), Closed(back, f"{fast}2", 1, 6308, 3, "client_closed")])
        assert await route(service, f"{fast}2b", f"{fast}user2") == back
        opened = [
            Opened(claim, f"{fast}0", "p1"),
            Opened(confirmed, f"{fast}1", "p1"),
            Opened(back, f"{fast}2b", "p1"),
        ]
        await apply(
            [*opened, *(Closed(e.session_id, e.connection_id, 19, 2047, 3, "client_closed") for e in opened)]
        )
        states = {}
        for n in range(3):
            [found] = await service.lookup_user_sessions(f"{fast}user{n}", include_ended=True)
            states[n] = (found.state.value, found.end_reason)
        assert states == {0: ("ended", "abandoned"), 1: ("disconnected", ""), 2: ("disconnected", "")}, fast
        assert sum(abandoned) == 1, fast  # counted once, on either path
        abandoned.clear()


async def test_a_session_whose_pool_is_not_found_by_name_still_disconnects(engine, service, clock):
    # Sessions keep their pool's name as it was; the use case resolves it case-insensitively.
    await seed(engine, server(A))
    sid = await route(service, "c1", "kim")
    await service.connection_opened(sid, "c1", "p1")
    async with engine.begin() as conn:
        await conn.execute(sessions.update().where(sessions.c.id == sid).values(pool="DEFAULT"))
    await service.connection_closed(sid, "c1", bytes_from_server=6308, end_reason="client_closed")
    (session,) = await service.lookup_user_sessions("kim")
    assert session.state.value == "disconnected"
    assert session.expires_at is not None
    assert (session.expires_at - clock.now).total_seconds() == 3600


async def test_the_statements_find_sessions_by_primary_key_whatever_the_statistics_say(
    engine, service, pg_database_url
):
    # Statistics taken when no session was pending or active make a state index look cheaper than
    # the primary key; walking it costs a scan of every session in that state.
    await seed(engine, server(A))
    sid = await route(service, "c1", "kim")
    with psycopg.connect(pg_database_url, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO sessions (id, pool, "user", user_key, server_address, state, learnt_from,
                                     client_address, created_at, updated_at, end_reason)
               SELECT 'x' || n, 'default', 'u' || n, 'u' || n, %s, 'disconnected', 'route', '',
                      now(), now(), ''
               FROM generate_series(1, 5000) n""",
            (A,),
        )
        conn.execute("ANALYZE sessions")
        params = {
            "session_id": sid, "connection_id": "c1", "proxy_id": "p1", "now": datetime.now(UTC),
            "bytes_from_client": 1, "bytes_from_server": 2, "duration_ms": 3, "end_reason": "",
            "session_end_reason": "closed_before_open",
        }  # fmt: skip
        for statement in (report_sql.OPENED, report_sql.CLOSED, report_sql.OPENED_CLOSED):
            plan = "\n".join(row[0] for row in conn.execute("EXPLAIN " + statement, params))
            scans = re.findall(r"Scan using (\w+) on sessions(?: (\w+))?", plan)
            assert "Seq Scan on sessions" not in plan, plan
            # The session by its primary key; an open's check for a newer live session of the user
            # (before a revival) by the live-user index, keyed on the user.
            assert {index for index, alias in scans if alias != "n"} == {"pk_sessions"}, plan
            assert {index for index, alias in scans if alias == "n"} <= {"uq_sessions_live_user"}, plan
            keyed = r"Index Cond: \(+pool\)::text = \(t\.pool\)::text\) AND .*user_key"
            assert statement == report_sql.CLOSED or re.search(keyed, plan), plan


async def test_a_failed_batch_transaction_leaves_nothing_and_the_events_apply_one_by_one(
    engine, service, monkeypatch
):
    await seed(engine, server(A))
    first, second = await route(service, "c1", "kim"), await route(service, "c2", "lee")
    real_run_all, real_run = report_sql.run_all, report_sql.run
    statements_run = 0

    async def deadlock_after(conn: Any, statements: Any) -> list[tuple[report_sql.Outcome, ...]]:
        # Another proxy's batch locked the same rows in the other order: PostgreSQL picks us.
        await real_run_all(conn, statements)
        raise psycopg.errors.DeadlockDetected("deadlock detected")

    async def deadlock_on_second(conn: Any, statement: Any) -> tuple[report_sql.Outcome, ...]:
        nonlocal statements_run
        statements_run += 1
        if statements_run == 2:
            raise psycopg.errors.DeadlockDetected("deadlock detected")
        return await real_run(conn, statement)

    monkeypatch.setattr(report_sql, "run_all", deadlock_after)
    monkeypatch.setattr(report_sql, "run", deadlock_on_second)
    fell_back: list[ConnectionEvent] = []
    real_use_case = service.reports._report_use_case

    async def counted(event: ConnectionEvent) -> None:
        fell_back.append(event)
        await real_use_case(event)

    monkeypatch.setattr(service.reports, "_report_use_case", counted)
    events: list[ConnectionEvent] = [
        Opened(first, "c1", "p1"),
        Closed(first, "c1", 1, 6308, 3, "client_closed"),
        Opened(second, "c2", "p1"),
        Opened("nosuch", "c9", "p1"),
    ]
    results = await service.report_connections(events)
    assert results[:3] == [None, None, None]
    assert isinstance(results[3], NotFound)
    # The whole batch's transaction rolled back; one event at a time, the transaction holding
    # `Opened(first)` failed too and rolled back; the use case applied that event, and the rest
    # went back to the one-at-a-time statements.
    assert fell_back == [events[0]]
    assert statements_run == 5  # Opened(first) [undone], Closed(first) [failed], then 3 more
    assert [s.state.value for s in await service.lookup_user_sessions("kim")] == ["disconnected"]
    assert [s.state.value for s in await service.lookup_user_sessions("lee")] == ["active"]


async def test_a_batch_is_one_round_trip(engine, service, monkeypatch):
    await seed(engine, server(A))
    sids = [await route(service, f"c{n}", f"user{n}") for n in range(20)]

    async def one_at_a_time(conn: Any, statement: Any) -> tuple[report_sql.Outcome, ...]:
        raise AssertionError("a statement was sent on its own")

    monkeypatch.setattr(report_sql, "run", one_at_a_time)
    real_runs, runs = report_sql._runs, []

    def counted_runs(statements: Any) -> Any:
        found = real_runs(statements)
        runs.extend(len(params) for _, params in found)
        return found

    monkeypatch.setattr(report_sql, "_runs", counted_runs)
    events: list[ConnectionEvent] = [Opened(sid, f"c{n}", "p1") for n, sid in enumerate(sids)]
    events.insert(10, Opened("no-such-session", "c99", "p1"))  # refused, in the middle of a run
    events += [Closed(sid, f"c{n}", bytes_from_server=6308) for n, sid in enumerate(sids[:10])]
    results = await service.report_connections(events)
    # Each statement's outcome lands on its own event: the first ten opens take their closes along
    # (one statement each, in the open's place), then one run of the other opens.
    assert runs == [10, 11]
    assert [n for n, r in enumerate(results) if r is not None] == [10]
    assert "no-such-session" in str(results[10])
    states = [s.state.value for n in range(20) for s in await service.lookup_user_sessions(f"user{n}")]
    assert states == ["disconnected"] * 10 + ["active"] * 10


@pytest.fixture
def undone(service: BrokerService) -> list[int]:
    """One entry per batch undone and applied one event at a time (its pipelined transaction failed)."""
    seen: list[int] = []
    real = service.reports._reports_fast

    async def counted(*args: Any) -> int:
        seen.append(1)
        return await real(*args)

    service.reports._reports_fast = counted  # type: ignore[method-assign]
    return seen


async def test_two_proxies_batches_on_the_same_sessions_in_opposite_orders_both_apply(
    engine, service, undone
):
    # Each batch is one transaction: locking the same sessions in opposite orders would deadlock
    # (PostgreSQL fails one after deadlock_timeout, 1 s, and it is applied one event at a time).
    # Each batch locks its sessions' servers first, in address order: they take turns instead, and
    # neither is ever undone.
    await seed(engine, server(A))
    sids = [await route(service, f"c{n}", f"user{n}") for n in range(SESSIONS)]
    forward: list[ConnectionEvent] = [Opened(sid, f"c{n}", "p1") for n, sid in enumerate(sids)]
    backward: list[ConnectionEvent] = [Opened(sid, f"c{n}", "p2") for n, sid in enumerate(sids)][::-1]
    for _ in range(3):
        first, second = await asyncio.gather(
            service.report_connections(forward), service.report_connections(backward)
        )
        assert first == [None] * SESSIONS
        assert second == [None] * SESSIONS
    assert undone == []
    states = {s.state.value for n in range(SESSIONS) for s in await service.lookup_user_sessions(f"user{n}")}
    assert states == {"active"}


async def test_batches_and_probe_results_over_the_same_servers_never_deadlock(
    engine, service, probes, clock, undone
):
    """Closing sessions changes their servers' counters (held_sessions, by trigger), so a batch writes
    server rows as well as sessions. Two proxies' batches over sessions on several servers, and a
    health replica's results for those servers, all at once: every transaction takes the server rows
    in address order, so none waits for another in a cycle (a deadlock would undo a batch, or fail
    the results or the heartbeat after PostgreSQL's deadlock_timeout)."""
    addresses = [f"10.0.1.{n}:3389" for n in range(1, 7)]
    await seed(engine, *(server(a) for a in addresses))
    await probes.claim_targets("r1", 3_600_000)
    sids = [await route(service, f"c{n}", f"user{n}") for n in range(600)]
    results = [d.ProbeResult(a, d.Health.UP, True, "", 10, d.AgentState.UP, "") for a in reversed(addresses)]
    for round_ in range(3):  # each round a chance to deadlock, were the orders not the same
        opened: list[ConnectionEvent] = [Opened(sid, f"c{n}r{round_}", "p1") for n, sid in enumerate(sids)]
        assert await service.report_connections(opened) == [None] * len(sids)
        # Each batch closes sessions spread over every server (a claim's close changes held_sessions).
        halves = [
            [
                Closed(sid, f"c{n}r{round_}", bytes_from_server=6308)
                for n, sid in enumerate(sids)
                if n % 2 == side
            ]
            for side in (0, 1)
        ]
        clock.advance(service.settings.heartbeat_interval_s + 1)
        # ... and the proxy's heartbeat, whose list lacks them all (their close reports are late).
        first, second, refused, _ = await asyncio.gather(
            service.report_connections(halves[0]),
            service.report_connections(halves[1]),
            probes.report_results("r1", results),
            service.proxy_heartbeat("p1", 0, []),
        )
        assert (first, second, refused) == ([None] * 300, [None] * 300, [])
    assert undone == []
    listed = await service.list_servers()
    assert sum(s.live_sessions for s in listed) == 600
    assert sum(s.held_sessions for s in listed) == 0  # closed claims hold nothing
    assert {s.load for s in listed} == {10}
