"""The broker under database pressure: a call that waits past the pool's timeout is told the broker is
overloaded (not that the database is down), and a Route cancelled mid-statement (its client gave up)
leaves no broken connection behind and no error in the log."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import psycopg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from rdbroker_broker.db import migrate
from rdbroker_broker.db.engine import make_engine
from rdbroker_broker.errors import Unavailable
from rdbroker_broker.rpc import convert
from rdbroker_broker.service import BrokerService
from rdbroker_broker.store import Store
from rdbroker_proto.v1 import broker_pb2 as pb
from tests.integration.broker.conftest import (
    Clock,
    seed,
    server,
    settings_for,
    until_a_statement_waits_on_a_lock,
)

A = "10.0.0.1:3389"


def route_request(connection_id: str, cookie: str):  # type: ignore[no-untyped-def]
    return convert.route_request(pb.RouteRequest(connection_id=connection_id, proxy_id="p1", cookie=cookie))


@contextlib.asynccontextmanager
async def one_connection_broker(
    url: str, **engine_kw: float
) -> AsyncIterator[tuple[AsyncEngine, BrokerService]]:
    """A service on a pool of one connection, with one server."""
    engine = make_engine(url, pool_size=1, **engine_kw)  # type: ignore[arg-type]
    try:
        await migrate.upgrade(engine)
        await seed(engine, server(A))
        yield engine, BrokerService(Store(engine), settings_for(url), Clock())
    finally:
        await engine.dispose()


def assert_no_errors(caplog: pytest.LogCaptureFixture) -> None:
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


async def test_a_call_that_finds_no_free_connection_in_time_says_the_broker_is_overloaded(pg_database_url):
    async with one_connection_broker(pg_database_url, pool_timeout_s=0.3) as (engine, service):
        async with engine.connect():  # the pool's only connection, held by someone else
            with pytest.raises(Unavailable, match="overloaded: no database connection came free"):
                await service.route(route_request("c1", "alice"))
        decision = await service.route(route_request("c1", "alice"))  # nothing of the failed call stayed
        assert decision.server_address == A


async def test_a_route_cancelled_mid_statement_leaves_a_usable_pool_and_no_error(
    pg_database_url, caplog: pytest.LogCaptureFixture
):
    async with one_connection_broker(pg_database_url) as (_, service):
        await service.route(route_request("warm", "bob"))  # the pool's connection exists and is idle
        caplog.set_level(logging.WARNING)
        async with await psycopg.AsyncConnection.connect(pg_database_url) as locker:
            await locker.execute("LOCK TABLE pools IN ACCESS EXCLUSIVE MODE")
            call = asyncio.ensure_future(service.route(route_request("c1", "alice")))
            await until_a_statement_waits_on_a_lock(pg_database_url)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            await locker.rollback()
        decision = await asyncio.wait_for(service.route(route_request("c2", "alice")), 10)
        assert decision.server_address == A
        assert decision.reason.value == "new"  # the cancelled call placed nobody
        assert_no_errors(caplog)


async def test_a_connection_the_driver_closed_under_a_call_is_discarded_without_error(
    pg_database_url, caplog: pytest.LogCaptureFixture
):
    # psycopg closes a connection whose query cancellation was interrupted (a call cancelled as its
    # statement failed): the hot path's pooled connection must then be dropped, not returned.
    async with one_connection_broker(pg_database_url) as (_, service):
        caplog.set_level(logging.WARNING)
        async with service.store.raw_autocommit() as conn:
            await conn.close()
        decision = await asyncio.wait_for(service.route(route_request("c1", "alice")), 10)
        assert decision.server_address == A
        assert_no_errors(caplog)
