"""64 MiB each way through the proxy, byte-exact, with a half-close from each side."""

from __future__ import annotations

import asyncio
import hashlib

from rdbroker_proxy.server import ProxyServer
from tests.unit.proxy.fake_broker import Directory, fake_broker
from tests.unit.proxy.support import CR, BulkServer, close, handshake, pattern, running_proxy, wait_until

SIZE = 64 * 1024 * 1024
CHUNK = 1 << 18


async def send_all(writer: asyncio.StreamWriter, data: bytes) -> None:
    view = memoryview(data)
    for offset in range(0, len(view), CHUNK):
        writer.write(view[offset : offset + CHUNK])
        await writer.drain()


async def read_to_eof(reader: asyncio.StreamReader) -> tuple[str, int]:
    digest, count = hashlib.sha256(), 0
    async with asyncio.timeout(120):
        while chunk := await reader.read(CHUNK):
            digest.update(chunk)
            count += len(chunk)
    return digest.hexdigest(), count


def test_the_checksums_would_catch_reordered_chunks() -> None:
    # The byte-exact tests compare SHA-256 digests: that proves order only if no chunk repeats.
    data = pattern(SIZE, 1)
    chunks = [data[offset : offset + (1 << 16)] for offset in range(0, SIZE, 1 << 16)]
    assert len(set(chunks)) == len(chunks)
    swapped = b"".join([chunks[1], chunks[0], *chunks[2:]])
    assert hashlib.sha256(swapped).digest() != hashlib.sha256(data).digest()
    assert pattern(SIZE, 1) == data  # deterministic: the same seed, the same bytes


def assert_counts(proxy: ProxyServer, directory: Directory, confirm: bytes) -> None:
    [closed] = directory.closed
    assert closed.bytes_from_client == len(CR) + SIZE
    assert closed.bytes_from_server == len(confirm) + SIZE


async def test_client_half_closes_first_and_the_server_still_sends() -> None:
    up, down = pattern(SIZE, 1), pattern(SIZE, 2)
    async with BulkServer(down, send_after_eof=True) as server:
        directory = Directory({"": [server.address]})
        async with fake_broker(directory) as broker, running_proxy([broker.address]) as proxy:
            reader, writer, confirm = await handshake(proxy.port, CR)
            async with asyncio.TaskGroup() as tg:
                received = tg.create_task(read_to_eof(reader))
                await send_all(writer, up)
                writer.write_eof()  # our half-close: the server answers only after it
            await close(writer)
            async with asyncio.timeout(60):
                await server.done.wait()
            await wait_until(lambda: len(directory.closed) == 1)
            assert_counts(proxy, directory, confirm)
    assert received.result() == (hashlib.sha256(down).hexdigest(), SIZE)
    assert (server.received.hexdigest(), server.received_bytes) == (hashlib.sha256(up).hexdigest(), SIZE)


async def test_server_half_closes_first_and_the_client_still_sends() -> None:
    up, down = pattern(SIZE, 3), pattern(SIZE, 4)
    async with BulkServer(down) as server:
        directory = Directory({"": [server.address]})
        async with fake_broker(directory) as broker, running_proxy([broker.address]) as proxy:
            reader, writer, confirm = await handshake(proxy.port, CR)
            received = await read_to_eof(reader)  # the server's data, then its half-close
            await send_all(writer, up)  # our direction still flows
            writer.write_eof()
            async with asyncio.timeout(60):
                await server.done.wait()
            await close(writer)
            await wait_until(lambda: len(directory.closed) == 1)
            assert_counts(proxy, directory, confirm)
    assert received == (hashlib.sha256(down).hexdigest(), SIZE)
    assert (server.received.hexdigest(), server.received_bytes) == (hashlib.sha256(up).hexdigest(), SIZE)
