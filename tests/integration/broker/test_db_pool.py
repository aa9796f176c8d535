"""The database pool is a hard bound: calls beyond it wait for a connection instead of opening more,
and since a use case holds one connection at a time, a tiny pool under many concurrent calls of
every kind finishes them all."""

from __future__ import annotations

import asyncio
import threading

import psycopg

from rdbroker_broker.db import migrate
from rdbroker_broker.db.engine import make_engine
from rdbroker_broker.rpc import convert
from rdbroker_broker.service import BrokerService, Closed, Opened
from rdbroker_broker.store import Store
from rdbroker_proto.v1 import broker_pb2 as pb
from tests.integration.broker.conftest import Clock, seed, server, settings_for

USERS = 40


def peak_backends(url: str, done: threading.Event) -> int:
    """The most connections to the test's database seen at once (besides this one) until `done`."""
    peak = 0
    with psycopg.connect(url, autocommit=True) as conn:
        while not done.is_set():
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchone()
            assert row is not None
            peak = max(peak, int(row[0]))
    return peak


async def test_many_concurrent_calls_share_a_pool_of_two(pg_database_url):
    engine = make_engine(pg_database_url, pool_size=2)
    try:
        await migrate.upgrade(engine)
        await seed(engine, server("10.0.0.1:3389"), server("10.0.0.2:3389", max_sessions=USERS // 4))
        service = BrokerService(Store(engine), settings_for(pg_database_url), Clock())

        async def logon(n: int) -> str:
            # A new placement, its reports, a reconnect, a lookup: every path takes connections.
            request = pb.RouteRequest(connection_id=f"c{n}", proxy_id="p1", cookie=f"user{n}")
            decision = await service.route(convert.route_request(request))
            errors = await service.report_connections(
                [
                    Opened(decision.session_id, f"c{n}", "p1"),
                    Closed(decision.session_id, f"c{n}", bytes_from_server=6308),
                ]
            )
            assert errors == [None, None]
            again = pb.RouteRequest(connection_id=f"r{n}", proxy_id="p1", cookie=f"USER{n}")
            assert (await service.route(convert.route_request(again))).session_id == decision.session_id
            (found,) = await service.lookup_user_sessions(f"user{n}")
            return found.state.value

        done = threading.Event()
        watcher = asyncio.ensure_future(asyncio.to_thread(peak_backends, pg_database_url, done))
        try:
            states = await asyncio.wait_for(asyncio.gather(*(logon(n) for n in range(USERS))), 120)
        finally:
            done.set()
        assert states == ["disconnected"] * USERS  # closed, then routed back to (not yet reopened)
        assert 1 <= await watcher <= 2
    finally:
        await engine.dispose()
