"""Fixtures for the broker on a real PostgreSQL: a migrated engine, a service with a settable clock,
a farm seeded through `apply_farm`, and a broker served in-process on 127.0.0.1 ports."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncEngine

from rdbroker_broker import domain as d
from rdbroker_broker.app import serve
from rdbroker_broker.config import BrokerSettings
from rdbroker_broker.db import migrate
from rdbroker_broker.db.engine import make_engine
from rdbroker_broker.farm import Farm, apply_farm
from rdbroker_broker.probing import ProbeService
from rdbroker_broker.service import BrokerService
from rdbroker_broker.store import Store
from rdbroker_proto.v1 import broker_pb2_grpc


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def settings_for(url: str, **kw) -> BrokerSettings:
    base = {
        "database_url": SecretStr(url),
        "grpc_listen": "127.0.0.1:0",
        "http_listen": "127.0.0.1:0",
        "migrate": True,
        "shutdown_grace_s": 1.0,
    }
    return BrokerSettings(**(base | kw))  # type: ignore[arg-type]


def farm(*servers: d.Server, pools: tuple[d.Pool, ...] = (d.Pool("default", True, 3600.0),)) -> Farm:
    return Farm(pools=list(pools), servers=list(servers))


def server(address: str, pool: str = "default", **kw) -> d.Server:
    return d.Server(address=address, pool=pool, **kw)


@pytest.fixture(autouse=True)
def _keep_pytest_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """CLI entry points configure logging for a process; under pytest that would replace its capture."""
    monkeypatch.setattr("rdbroker_common.logs.configure", lambda *a, **k: None)


@pytest.fixture
async def engine(pg_database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(pg_database_url)
    await migrate.upgrade(engine)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def service(engine: AsyncEngine, clock: Clock, pg_database_url: str) -> BrokerService:
    return BrokerService(Store(engine), settings_for(pg_database_url), clock)


@pytest.fixture
def probes(service: BrokerService) -> ProbeService:
    return ProbeService(service)


async def seed(engine: AsyncEngine, *servers: d.Server, pools: tuple[d.Pool, ...] | None = None) -> None:
    plan = await apply_farm(engine, farm(*servers) if pools is None else farm(*servers, pools=pools))
    assert not plan.refusals


@dataclass
class RunningBroker:
    stub: broker_pb2_grpc.BrokerStub
    channel: grpc.aio.Channel
    grpc_port: int
    http_port: int


@contextlib.asynccontextmanager
async def running_broker(settings: BrokerSettings) -> AsyncIterator[RunningBroker]:
    """The whole broker (gRPC + REST + sweeper) served in this event loop with `settings`."""
    ready, stop = asyncio.Event(), asyncio.Event()
    bound: dict[str, int] = {}
    # A bare task (not a TaskGroup): the fixture's setup and teardown may run in different tasks.
    task = asyncio.get_running_loop().create_task(serve(settings, ready, stop, bound))
    waiter = asyncio.get_running_loop().create_task(ready.wait())
    await asyncio.wait({task, waiter}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if not ready.is_set():
        waiter.cancel()
        if task.done():
            task.result()  # raises the start-up error
        raise AssertionError("the broker did not start in 30 s")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{bound['grpc']}")
    try:
        yield RunningBroker(broker_pb2_grpc.BrokerStub(channel), channel, bound["grpc"], bound["http"])
    finally:
        await channel.close()
        stop.set()
        await asyncio.wait_for(task, 30)


@pytest.fixture
async def broker(pg_database_url: str, engine: AsyncEngine) -> AsyncIterator[RunningBroker]:
    """The whole broker served in this event loop, with the test settings."""
    async with running_broker(settings_for(pg_database_url)) as running:
        yield running


async def lock_waiters(url: str) -> int:
    """How many backends of the database at `url` wait on a lock."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        row = await (
            await conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        ).fetchone()
    assert row is not None
    return int(row[0])


async def until_a_statement_waits_on_a_lock(url: str) -> None:
    for _ in range(200):  # bounded: 10 s
        if await lock_waiters(url):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("no statement came to wait on the lock")


async def assert_live_counters_exact(engine: AsyncEngine) -> None:
    """The trigger-kept live_sessions of every server equals a recount of its live sessions."""
    from sqlalchemy import func, select

    from rdbroker_broker.db.tables import servers, sessions

    recount = (
        select(func.count())
        .where(sessions.c.server_address == servers.c.address, sessions.c.state != "ended")
        .scalar_subquery()
    )
    async with engine.connect() as conn:
        rows = (await conn.execute(select(servers.c.address, servers.c.live_sessions, recount))).all()
    assert rows
    assert [(a, kept) for a, kept, _ in rows] == [(a, counted) for a, _, counted in rows]
