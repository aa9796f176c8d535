"""Resource hygiene: file descriptors come back after many connections, whatever way they end."""

from __future__ import annotations

import asyncio

from tests.unit.proxy.fake_broker import Directory, fake_broker
from tests.unit.proxy.support import (
    CR,
    BulkServer,
    close,
    closed_by_peer,
    handshake,
    open_client,
    open_fds,
    running_proxy,
    wait_until,
)

CONNECTIONS = 1000
CONCURRENCY = 20


async def test_file_descriptors_return_after_1000_connections() -> None:
    async with BulkServer() as server:
        directory = Directory({"": [server.address]})
        async with (
            fake_broker(directory) as broker,
            running_proxy([broker.address], max_routing_per_client=0) as proxy,
        ):
            _, writer, _ = await handshake(proxy.port, CR)  # warm up channels and caches
            await close(writer)
            await wait_until(lambda: not proxy.context.connections)
            before = open_fds()

            async def one(i: int) -> None:
                if i % 10 == 9:  # some refused ones too: garbage, closed without routing
                    reader, writer = await open_client(proxy.port)
                    writer.write(b"\x00" * 20)
                    assert await closed_by_peer(reader)
                else:
                    _, writer, _ = await handshake(proxy.port, CR)
                await close(writer)

            queue = list(range(CONNECTIONS))

            async def worker() -> None:
                while queue:
                    await one(queue.pop())

            async with asyncio.TaskGroup() as tg:
                for _ in range(CONCURRENCY):
                    tg.create_task(worker())
            await wait_until(lambda: not proxy.context.connections, timeout_s=30)
            await wait_until(lambda: open_fds() <= before, timeout_s=30)
            assert proxy.context.accepted == CONNECTIONS + 1
            assert proxy.context.routing_per_client == {}  # every connection counted out again
    # Each handshaken connection routed (a Route asked again after a slow attempt, under a loaded
    # machine, carries the same connection_id: idempotent, one connection); the garbage ones never.
    assert len({r.connection_id for r in directory.routes}) == CONNECTIONS // 10 * 9 + 1
