"""A broker served in-process with the process's telemetry (the session `telemetry` fixture)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from rdbroker_broker.app import serve
from rdbroker_common import telemetry as tel
from rdbroker_proto.v1 import broker_pb2_grpc

# The broker tests' fixtures (a migrated engine; CLI logging left to pytest) serve here too.
from tests.integration.broker.conftest import (  # noqa: F401 - fixtures, used by name
    _keep_pytest_logging,
    engine,
    settings_for,
)


@dataclass
class TracedBroker:
    stub: broker_pb2_grpc.BrokerStub
    grpc_port: int
    http_port: int


@pytest.fixture
async def broker(pg_database_url: str, engine: AsyncEngine, telemetry) -> AsyncIterator[TracedBroker]:  # noqa: F811
    """The whole broker in this event loop; its client channel carries trace context."""
    ready, stop = asyncio.Event(), asyncio.Event()
    bound: dict[str, int] = {}
    settings = settings_for(pg_database_url, sessions_metric_interval_s=0.2)
    task = asyncio.get_running_loop().create_task(serve(settings, ready, stop, bound))
    waiter = asyncio.get_running_loop().create_task(ready.wait())
    await asyncio.wait({task, waiter}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if not ready.is_set():
        waiter.cancel()
        if task.done():
            task.result()
        raise AssertionError("the broker did not start in 30 s")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{bound['grpc']}", interceptors=tel.client_interceptors())
    try:
        yield TracedBroker(broker_pb2_grpc.BrokerStub(channel), bound["grpc"], bound["http"])
    finally:
        await channel.close()
        stop.set()
        await asyncio.wait_for(task, 30)


async def eventually(check, *, timeout_s: float = 15.0, step_s: float = 0.1):
    """Poll `check()` (sync, answering a value or None) until it answers something; bounded in time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = await asyncio.to_thread(check)
        if value is not None or loop.time() >= deadline:
            return value
        await asyncio.sleep(step_s)
