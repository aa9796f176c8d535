"""Two broker processes on one database agree: one live session per user, one answer per user."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import grpc
from sqlalchemy import func, select

from rdbroker_broker.db.tables import sessions
from rdbroker_proto.v1 import broker_pb2 as pb
from rdbroker_proto.v1 import broker_pb2_grpc
from tests.integration.broker.conftest import assert_live_counters_exact, seed, server
from tests.integration.broker.processes import broker_process

USERS = 100
CALLS_PER_USER = 4


async def test_two_brokers_400_concurrent_routes_for_100_users(pg_database_url, engine):
    await seed(engine, *(server(f"10.0.1.{i}:3389") for i in range(1, 9)))
    async with broker_process(pg_database_url) as (port_a, _), broker_process(pg_database_url) as (port_b, _):
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{p}") for p in (port_a, port_b)]
        stubs = [broker_pb2_grpc.BrokerStub(c) for c in channels]
        try:
            calls = []
            for n in range(CALLS_PER_USER):
                for u in range(USERS):
                    stub = stubs[(u + n) % 2]  # every user is asked of both brokers
                    request = pb.RouteRequest(connection_id=f"c-{u}-{n}", proxy_id="p", cookie=f"User{u}")
                    calls.append((u, stub.Route(request, timeout=60)))
            answers = await asyncio.gather(*(call for _, call in calls))
        finally:
            for channel in channels:
                await channel.close()

    by_user: dict[int, set[tuple[str, str]]] = defaultdict(set)
    for (u, _), answer in zip(calls, answers, strict=True):
        by_user[u].add((answer.server_address, answer.session_id))
    assert len(by_user) == USERS
    assert all(len(seen) == 1 for seen in by_user.values()), {u: s for u, s in by_user.items() if len(s) > 1}

    async with engine.connect() as conn:
        rows = await conn.execute(
            select(sessions.c.user_key, func.count())
            .where(sessions.c.state != "ended")
            .group_by(sessions.c.user_key)
        )
        live = dict(rows.all())
    assert len(live) == USERS
    assert set(live.values()) == {1}
    # The placements spread over the farm instead of piling onto one server.
    per_server: dict[str, int] = defaultdict(int)
    for seen in by_user.values():
        per_server[next(iter(seen))[0]] += 1
    assert len(per_server) == 8
    assert max(per_server.values()) <= 20
    await assert_live_counters_exact(engine)
