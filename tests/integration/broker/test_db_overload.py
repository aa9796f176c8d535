"""The broker under database pressure: a call that waits past the pool's timeout is told the broker is
overloaded (not that the database is down), and a Route cancelled mid-statement (its client gave up)
leaves no broken connection behind and no error in the log."""

from __future__ import annotations

import asyncio
import logging

import psycopg
import pytest

from rdbroker_broker.db import migrate
from rdbroker_broker.db.engine import make_engine
from rdbroker_broker.errors import Unavailable
from rdbroker_broker.rpc import convert
from rdbroker_broker.service import BrokerService
from rdbroker_broker.store import Store
from rdbroker_proto.v1 import broker_pb2 as pb
from tests.integration.broker.conftest import Clock, seed, server, settings_for


def route_request(connection_id: str, cookie: str):  # type: ignore[no-untyped-def]
    return convert.route_request(pb.RouteRequest(connection_id=connection_id, proxy_id="p1", cookie=cookie))


async def waiting_on_lock(url: str) -> int:
    """How many backends of this database wait on a lock."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        row = await (
            await conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        ).fetchone()
    assert row is not None
    return int(row[0])


async def test_a_call_that_finds_no_free_connection_in_time_says_the_broker_is_overloaded(pg_database_url):
    engine = make_engine(pg_database_url, pool_size=1, pool_timeout_s=0.3)
    try:
        await migrate.upgrade(engine)
        await seed(engine, server("10.0.0.1:3389"))
        service = BrokerService(Store(engine), settings_for(pg_database_url), Clock())
        async with engine.connect():  # the pool's only connection, held by someone else
            with pytest.raises(Unavailable, match="overloaded: no database connection came free"):
                await service.route(route_request("c1", "alice"))
        decision = await service.route(route_request("c1", "alice"))  # nothing of the failed call stayed
        assert decision.server_address == "10.0.0.1:3389"
    finally:
        await engine.dispose()


async def test_a_route_cancelled_mid_statement_leaves_a_usable_pool_and_no_error(
    pg_database_url, caplog: pytest.LogCaptureFixture
):
    engine = make_engine(pg_database_url, pool_size=1)
    try:
        await migrate.upgrade(engine)
        await seed(engine, server("10.0.0.1:3389"))
        service = BrokerService(Store(engine), settings_for(pg_database_url), Clock())
        await service.route(route_request("warm", "bob"))  # the pool's connection exists and is idle
        caplog.set_level(logging.WARNING)
        async with await psycopg.AsyncConnection.connect(pg_database_url) as locker:
            await locker.execute("LOCK TABLE pools IN ACCESS EXCLUSIVE MODE")
            call = asyncio.ensure_future(service.route(route_request("c1", "alice")))
            for _ in range(200):  # until the Route statement waits on the lock (bounded: 10 s)
                if await waiting_on_lock(pg_database_url):
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the Route statement never waited on the lock")
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            await locker.rollback()
        decision = await asyncio.wait_for(service.route(route_request("c2", "alice")), 10)
        assert decision.server_address == "10.0.0.1:3389"
        assert decision.reason.value == "new"  # the cancelled call placed nobody
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == [], [r.getMessage() for r in errors]
    finally:
        await engine.dispose()


async def test_a_connection_the_driver_closed_under_a_call_is_discarded_without_error(
    pg_database_url, caplog: pytest.LogCaptureFixture
):
    # psycopg closes a connection whose query cancellation was interrupted (a call cancelled as its
    # statement failed): the hot path's pooled connection must then be dropped, not returned.
    engine = make_engine(pg_database_url, pool_size=1)
    try:
        await migrate.upgrade(engine)
        await seed(engine, server("10.0.0.1:3389"))
        store = Store(engine)
        caplog.set_level(logging.WARNING)
        async with store.raw_autocommit() as conn:
            await conn.close()
        service = BrokerService(store, settings_for(pg_database_url), Clock())
        decision = await asyncio.wait_for(service.route(route_request("c1", "alice")), 10)
        assert decision.server_address == "10.0.0.1:3389"
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == [], [r.getMessage() for r in errors]
    finally:
        await engine.dispose()
