"""The broker closes every client connection after `grpc_max_connection_age_ms` (GOAWAY), so `dns:///`
clients re-resolve and reach broker pods added since; a client keeps working across the close."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rdbroker_broker.app import serve
from tests.integration.broker.conftest import settings_for

SERVING = health_pb2.HealthCheckResponse.SERVING


async def _check(stub: health_pb2_grpc.HealthStub) -> int:
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return int(reply.status)


async def test_connections_are_closed_after_their_max_age_and_the_client_reconnects(tmp_path):
    settings = settings_for(
        f"sqlite+aiosqlite:///{tmp_path / 'rdbroker.db'}",
        grpc_max_connection_age_ms=500,
        grpc_max_connection_age_grace_ms=200,
    )
    ready, stop = asyncio.Event(), asyncio.Event()
    bound: dict[str, int] = {}
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(serve(settings, ready, stop, bound))
        try:
            await asyncio.wait_for(ready.wait(), 30)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{bound['grpc']}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                for _ in range(3):  # each round: a connection, its GOAWAY, a new connection
                    assert await _check(stub) == SERVING
                    assert channel.get_state() is grpc.ChannelConnectivity.READY
                    # The server's GOAWAY (max age 500 ms, plus jitter) moves the channel out of READY;
                    # the bound is generous for a loaded machine.
                    await asyncio.wait_for(channel.wait_for_state_change(grpc.ChannelConnectivity.READY), 20)
                    assert channel.get_state() is not grpc.ChannelConnectivity.READY
                assert await _check(stub) == SERVING
        finally:
            stop.set()


async def test_the_default_max_age_is_thirty_seconds_with_ten_of_grace(tmp_path):
    settings = settings_for(f"sqlite+aiosqlite:///{tmp_path / 'rdbroker.db'}")
    assert (settings.grpc_max_connection_age_ms, settings.grpc_max_connection_age_grace_ms) == (
        30_000,
        10_000,
    )
