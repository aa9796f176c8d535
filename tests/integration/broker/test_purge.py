"""History past `retention_s` is deleted by the sweep: ended sessions, connections, refusal counts and silent
proxies, never a live session or anything younger; at most once a minute, in bounded transactions."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from rdbroker_broker import domain as d
from rdbroker_broker import refusals
from rdbroker_broker.db.repositories import SessionRepository
from rdbroker_broker.db.tables import connections, proxies, route_refusals, sessions
from rdbroker_broker.errors import NotFound
from rdbroker_broker.service import BrokerService, sweeping
from tests.integration.broker.conftest import Clock, seed, server

A = "10.0.0.1:3389"


async def ended(service: BrokerService, user: str) -> str:
    decision = await service.route(d.RouteRequest(connection_id=f"c-{user}", proxy_id="p1", cookie=user))
    await service.end_session(decision.session_id)
    return decision.session_id


async def ids(engine: AsyncEngine) -> tuple[set[str], set[str], set[str]]:
    async with engine.connect() as conn:
        return (
            set((await conn.execute(select(sessions.c.id))).scalars()),
            set((await conn.execute(select(connections.c.connection_id))).scalars()),
            set((await conn.execute(select(proxies.c.proxy_id))).scalars()),
        )


async def test_history_past_retention_is_purged_and_nothing_else(engine, service, clock: Clock):
    await seed(engine, server(A))
    await service.proxy_heartbeat("old-proxy", 0, [])
    old = await ended(service, "alice")
    clock.advance(service.settings.retention_s + 10)
    young = await ended(service, "carol")
    live = (
        await service.route(d.RouteRequest(connection_id="c-dave", proxy_id="p1", cookie="dave"))
    ).session_id
    await service.proxy_heartbeat("new-proxy", 0, [])

    counts = await service.sweep()

    assert counts["purged"] == 2  # alice's session and her connection
    session_ids, connection_ids, proxy_ids = await ids(engine)
    assert session_ids == {young, live}
    assert old not in session_ids
    assert connection_ids == {"c-carol", "c-dave"}
    assert proxy_ids == {"new-proxy"}


async def test_the_purge_runs_at_most_once_a_minute(engine, service, clock: Clock):
    await seed(engine, server(A))
    first = await ended(service, "alice")
    clock.advance(10)
    second = await ended(service, "eve")
    clock.advance(service.settings.retention_s - 5)  # alice is past retention, eve not yet

    assert (await service.sweep())["purged"] == 2
    clock.advance(30)  # eve is past retention now, but the last purge was 30 s ago
    assert (await service.sweep())["purged"] == 0
    assert second in (await ids(engine))[0]
    clock.advance(30)
    assert (await service.sweep())["purged"] == 2
    assert not {first, second} & (await ids(engine))[0]


async def test_a_backlog_is_purged_in_bounded_transactions(
    engine, service, clock: Clock, monkeypatch: pytest.MonkeyPatch
):
    await seed(engine, server(A))
    old = [await ended(service, f"user{n}") for n in range(5)]
    clock.advance(service.settings.retention_s + 1)
    limits: list[int] = []
    purge_ended = SessionRepository.purge_ended

    async def recorded(self: SessionRepository, before: Any, limit: int) -> int:
        limits.append(limit)
        return await purge_ended(self, before, limit)

    monkeypatch.setattr(sweeping, "PURGE_BATCH", 2)
    monkeypatch.setattr(SessionRepository, "purge_ended", recorded)

    assert (await service.sweep())["purged"] == 10  # five sessions, five connections
    assert limits == [2, 2, 2, 2]  # 2 + 2 + 1, then one that found nothing
    assert not set(old) & (await ids(engine))[0]
    async with engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(connections))).scalar_one() == 0


async def test_finding_what_to_purge_reads_only_the_ended_sessions_due(tmp_path, engine):
    """The purge's search uses the partial index of ended sessions by end time on both stores, not
    every ended session (on SQLite a statement holds the event loop for its time)."""
    import sqlite3

    from rdbroker_broker.db import migrate
    from rdbroker_broker.db.engine import make_engine

    lite = make_engine(f"sqlite:///{tmp_path / 'purge.db'}")
    await migrate.upgrade(lite)
    await lite.dispose()
    query = "SELECT id FROM sessions WHERE state = 'ended' AND ended_at < '2026-01-01' LIMIT 100"
    conn = sqlite3.connect(tmp_path / "purge.db")
    plan = " ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {query}"))
    conn.close()
    assert "ix_sessions_ended_at" in plan
    async with engine.connect() as pg:
        await pg.exec_driver_sql("SET enable_seqscan = off")  # an empty table: ask which index it can use
        rows = (await pg.exec_driver_sql(f"EXPLAIN {query}")).all()
    assert "ix_sessions_ended_at" in " ".join(r[0] for r in rows)


async def test_on_sqlite_the_purge_goes_in_small_batches(tmp_path, monkeypatch):
    """On SQLite a statement holds the event loop: a backlog is deleted in batches of
    SQLITE_PURGE_BATCH rows of each table, the loop free between them."""
    from rdbroker_broker.db import migrate
    from rdbroker_broker.db.engine import make_engine
    from rdbroker_broker.store import Store
    from tests.integration.broker.conftest import settings_for

    url = f"sqlite:///{tmp_path / 'batches.db'}"
    lite = make_engine(url)
    await migrate.upgrade(lite)
    clock = Clock()
    service = BrokerService(Store(lite), settings_for(url), clock)
    try:
        await seed(lite, server(A))
        for n in range(7):
            await ended(service, f"user{n}")
        monkeypatch.setattr(sweeping, "SQLITE_PURGE_BATCH", 3)
        limits: list[int] = []
        purge_ended = SessionRepository.purge_ended

        async def recorded(self: SessionRepository, before: Any, limit: int) -> int:
            limits.append(limit)
            return await purge_ended(self, before, limit)

        monkeypatch.setattr(SessionRepository, "purge_ended", recorded)
        clock.advance(service.settings.retention_s + 1)
        assert await service.sweeping._purge_due(clock.now) >= 7
        assert set(limits) == {3}
        assert len(limits) >= 3
        async with lite.connect() as conn:
            assert (await conn.execute(select(func.count()).select_from(sessions))).scalar() == 0
    finally:
        await lite.dispose()


async def test_refusal_counts_past_retention_are_purged(engine, service, clock: Clock):
    # route_refusals (refusals.py): a row per minute and status, deleted with the rest of the history.
    await seed(engine, server(A))
    refusals.count(service, NotFound("no such pool"), "NOT_FOUND")
    await refusals.flush(service)
    clock.advance(service.settings.retention_s + 120)
    refusals.count(service, NotFound("no such pool"), "NOT_FOUND")
    await refusals.flush(service)
    await service.sweep()
    async with engine.connect() as conn:
        rows = (await conn.execute(select(route_refusals.c.minute, route_refusals.c.count))).all()
    assert [(minute.replace(second=0, microsecond=0), n) for minute, n in rows] == [
        (clock.now.replace(second=0, microsecond=0), 1)
    ]
