"""The routing step's turns (`max_routing`): past that many connections being routed at once, the others
wait their turn in arrival order, reading nothing more, and one that waits longer than
`route_queue_timeout_s` is closed without a Route call."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from rdbroker_proxy.server import ProxyServer
from rdbroker_rdp import build_connection_request
from tests.unit.proxy.fake_broker import Directory, RunningBroker, fake_broker
from tests.unit.proxy.support import (
    BulkServer,
    close,
    closed_by_peer,
    handshake,
    open_client,
    running_proxy,
    wait_until,
)


def counting(broker: RunningBroker, release: asyncio.Event) -> list[int]:
    """[in flight, most in flight] of the broker's Route calls, kept up to date; each call is held
    until `release` is set."""
    seen = [0, 0]
    real = broker.servicer._route

    async def route(request: Any) -> Any:
        seen[0] += 1
        seen[1] = max(seen)
        try:
            await release.wait()
            return await real(request)
        finally:
            seen[0] -= 1

    broker.servicer._route = route  # type: ignore[method-assign]
    return seen


@contextlib.asynccontextmanager
async def held_routes(
    **overrides: Any,
) -> AsyncIterator[tuple[Directory, ProxyServer, asyncio.Event, list[int]]]:
    """A proxy (with `overrides`) before a fake broker whose Route calls are held until the event is
    set; the list counts them (`counting`)."""
    async with BulkServer() as server:
        directory = Directory({"": [server.address]})
        async with fake_broker(directory) as broker, running_proxy([broker.address], **overrides) as proxy:
            release = asyncio.Event()
            yield directory, proxy, release, counting(broker, release)


async def test_connections_past_max_routing_wait_their_turn_in_arrival_order() -> None:
    async with held_routes(max_routing=2) as (directory, proxy, release, seen):
        clients = []
        for n in range(6):  # each first packet read before the next is sent: a known order
            reader, writer = await open_client(proxy.port)
            writer.write(build_connection_request(cookie=f"user{n}", requested_protocols=3))
            clients.append((reader, writer))
            await wait_until(lambda n=n: proxy.context.routing_waiting == max(0, n - 1))
        await wait_until(lambda: seen[0] == 2)
        release.set()
        for reader, writer in clients:
            async with asyncio.timeout(10):
                header = await reader.readexactly(4)  # each one's Connection Confirm
            assert header[:2] == b"\x03\x00"
            await close(writer)
        assert proxy.context.routing_waiting == 0
    assert seen[1] == 2  # never more than max_routing Route calls at once
    assert [r.cookie for r in directory.routes] == [f"user{n}" for n in range(6)]


async def test_a_connection_that_waits_too_long_for_its_turn_is_closed_unrouted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="rdbroker_proxy")
    limits = {"max_routing": 1, "route_queue_timeout_s": 0.2, "route_attempt_timeout_s": 10.0}
    async with held_routes(route_timeout_s=20.0, **limits) as (directory, proxy, release, seen):
        first = asyncio.ensure_future(handshake(proxy.port))
        await wait_until(lambda: seen[0] == 1)  # its Route is held at the broker
        reader, writer = await open_client(proxy.port)
        writer.write(build_connection_request(cookie="late", requested_protocols=3))
        assert await closed_by_peer(reader)  # its turn never came: closed, not routed
        await close(writer)
        release.set()
        _, first_writer, _ = await first  # the one in its turn goes through
        await close(first_writer)
        assert proxy.context.routing_waiting == 0
    assert [r.cookie for r in directory.routes] == ["alice"]
    ended = [r for r in caplog.records if r.getMessage().startswith("connection ended")]
    assert "route_queue_timeout" in [r.end_reason for r in ended]  # type: ignore[attr-defined]


async def test_with_no_limit_every_connection_is_routed_at_once() -> None:
    async with held_routes(max_routing=0) as (_, proxy, release, seen):
        waiting = [asyncio.ensure_future(handshake(proxy.port)) for _ in range(5)]
        await wait_until(lambda: seen[0] == 5)  # all five at the broker at once
        release.set()
        done = await asyncio.gather(*waiting)
        for _, writer, _ in done:
            await close(writer)
    assert seen[1] == 5
