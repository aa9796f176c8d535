"""Overload over gRPC against a real broker and PostgreSQL: with its one database connection busy, a
Route that cannot get it before its deadline is refused UNAVAILABLE ("overloaded") before that
deadline, one past the queue bound at once; a call whose client gave up still finishes its
database work (no cancelled statement, no lost connection), so its retry gets the stored answer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import grpc
import psycopg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from rdbroker_broker import metrics
from rdbroker_broker.admission import Gate
from rdbroker_proto.v1 import broker_pb2 as pb
from tests.integration.broker.conftest import (
    running_broker,
    seed,
    server,
    settings_for,
    until_a_statement_waits_on_a_lock,
)


def route(connection_id: str, user: str) -> pb.RouteRequest:
    return pb.RouteRequest(connection_id=connection_id, proxy_id="p1", cookie=user)


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(200):  # bounded: 10 s
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within 10 s: {what}")


async def test_an_overloaded_broker_refuses_in_time_and_finishes_what_it_started(
    pg_database_url: str,
    engine: AsyncEngine,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gates: list[Gate] = []  # the broker's admission gate, to see a call waiting in its queue
    made = Gate.__init__

    def recorded(gate: Gate, *args: Any, **kwargs: Any) -> None:
        made(gate, *args, **kwargs)
        gates.append(gate)

    monkeypatch.setattr(Gate, "__init__", recorded)
    await seed(engine, server("10.0.0.1:3389"))
    # No sweep, idle ping, power loop or drainer: each would take the one connection or the one queue
    # place.
    settings = settings_for(
        pg_database_url,
        db_pool_size=1,
        db_max_waiting=1,
        sweep_interval_s=3600,
        db_check_interval_s=3600,
        power_interval_s=3600,
        drain_interval_s=3600,
    )
    caplog.set_level(logging.WARNING)
    async with running_broker(settings) as broker:
        stub = broker.stub
        # The one pooled connection exists (the background loops' first passes at start may hold it
        # and the queue place a moment: try again, bounded).
        for attempt in range(50):
            try:
                await stub.Route(route("warm", "warm"), timeout=10)
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() is not grpc.StatusCode.UNAVAILABLE or attempt == 49:
                    raise
                await asyncio.sleep(0.1)
        refused_before = dict(metrics._refused_counts)
        async with await psycopg.AsyncConnection.connect(pg_database_url) as locker:
            await locker.execute("LOCK TABLE pools IN ACCESS EXCLUSIVE MODE")
            # alice's call takes the only connection; its statement waits on the lock.
            first = asyncio.ensure_future(stub.Route(route("c-alice", "alice"), timeout=1.0))
            await until_a_statement_waits_on_a_lock(pg_database_url)

            # bob waits for the connection, and is refused before his deadline, not at it.
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Route(route("c-bob", "bob"), timeout=1.5)
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "overloaded: no database connection came free in time" in str(refused.value.details())

            # carol waits (the queue holds one); dave finds the queue full and is refused at once.
            carol = asyncio.ensure_future(stub.Route(route("c-carol", "carol"), timeout=10))
            await until(lambda: any(gate.waiting == 1 for gate in gates), "carol waits in the queue")
            with pytest.raises(grpc.aio.AioRpcError) as full:
                await stub.Route(route("c-dave", "dave"), timeout=10)
            assert full.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "1 calls already wait for the database" in str(full.value.details())
            # A proxy's heartbeat is never refused for a full queue: it waits its turn.
            heartbeat = asyncio.ensure_future(
                stub.ProxyHeartbeat(pb.ProxyHeartbeatRequest(proxy_id="p1"), timeout=10)
            )

            with pytest.raises(grpc.aio.AioRpcError) as gave_up:
                await first  # alice's client gives up while her statement still waits
            assert gave_up.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            await locker.rollback()

        assert (await asyncio.wait_for(carol, 10)).server_address == "10.0.0.1:3389"
        assert (await asyncio.wait_for(heartbeat, 10)).heartbeat_interval_ms > 0
        # alice's statement ran to its end after her client left: her session is there before she
        # retries, and the retry gets that answer.
        found = await stub.LookupUserSessions(pb.LookupUserSessionsRequest(user="alice"), timeout=10)
        assert len(found.sessions) == 1
        again = await stub.Route(route("c-alice", "alice"), timeout=10)
        assert (again.reason, again.session_id) == (pb.ROUTE_REASON_NEW, found.sessions[0].session_id)
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "closing connection" in m or "cancel" in m.lower()], messages
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], messages
    assert sum("overloaded: refused" in m for m in messages) == 1  # one warning for the two refusals
    for reason in ("timed_out", "queue_full"):  # counted for rdbroker_calls_refused_total{reason}
        assert metrics._refused_counts[reason] == refused_before.get(reason, 0) + 1
