"""Processes for bench/proxy_bench.py, one role each (run as `python bench/proxy_load.py ROLE ...`).

    backend --port P                    a fast fake terminal server: Connection Confirm, then echo
                                        (a first message of WHOAMI after the Confirm answers its port)
    fakebroker --port P --servers A,B   the in-process test broker (tests/unit/proxy/fake_broker.py)
    setups --port P --count N ...       connection setups: connect, CR, wait for the CC, close
    bulk --port P --mib N --streams S   N MiB each way per stream through an echoing backend
    idle --port P --count N             N handshaken connections held open until stdin closes
    sticky --port P --users U --rounds R   each user connects once a round and asks which server it
                                        reached; counts the users that reached more than one

Load generators print one JSON line. All run on uvloop (or blocking sockets in threads for bulk),
so the client is not the bottleneck it would be on the plain asyncio loop.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import socket
import sys
import threading
import time
from pathlib import Path

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rdbroker_rdp import (  # noqa: E402 - after the path set-up
    build_connection_confirm,
    build_connection_request,
    parse_first_packet,
)

CONFIRM = build_connection_confirm("neg_rsp", selected_protocol=1)
CHUNK = 1 << 20
HIGH_WATER = 1 << 20
WHOAMI = b"WHOAMI\r\n"  # no RDP client sends this as its first bytes after the Confirm
# The answer to WHOAMI: the port, padded past the broker's default `junk_bytes` (2048), so the
# connection counts as a session (a disconnected one after close), not as a probe that holds nothing.
WHOAMI_ANSWER_BYTES = 4096


# -- backend -------------------------------------------------------------------------------------


class Backend(asyncio.Protocol):
    """Answers the first packet with a Confirm, then echoes with backpressure."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.transport: asyncio.Transport | None = None
        self.buf: bytearray | None = bytearray()
        self.first_echo = True  # only the first chunk after the Confirm can be a WHOAMI

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        assert self.transport is not None
        self.transport.set_write_buffer_limits(high=HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.buf is None:
            if self.first_echo:
                self.first_echo = False
                if data == WHOAMI:
                    self.transport.write(str(self.port).encode().ljust(WHOAMI_ANSWER_BYTES - 2) + b"\r\n")
                    return
            self.transport.write(data)
            return
        self.buf += data
        try:
            first = parse_first_packet(self.buf)
        except ValueError:
            self.transport.abort()
            return
        if first is None:
            return
        rest, self.buf = bytes(self.buf[first.consumed :]), None
        self.transport.write(CONFIRM + rest)

    def pause_writing(self) -> None:
        assert self.transport is not None
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        assert self.transport is not None
        self.transport.resume_reading()

    def eof_received(self) -> bool:
        return False  # close once what is buffered has gone out


async def backend(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        functools.partial(Backend, port), "127.0.0.1", port, backlog=4096, reuse_address=True
    )
    async with server:
        await server.serve_forever()


async def fakebroker(port: int, servers: list[str]) -> None:
    from tests.unit.proxy.fake_broker import Directory, fake_broker

    async with fake_broker(Directory({"": servers}), port=port):
        await asyncio.Event().wait()


# -- connection setups ------------------------------------------------------------------------------


class SetupClient(asyncio.Protocol):
    def __init__(self, packet: bytes, done: asyncio.Future[bool], *, keep: bool = False) -> None:
        self.packet = packet
        self.done = done
        self.keep = keep  # stay connected after the Confirm (idle connections)
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        assert self.transport is not None
        self.transport.write(self.packet)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) >= 4 and len(self.buf) >= int.from_bytes(self.buf[2:4], "big"):
            if not self.done.done():
                self.done.set_result(self.buf[5] == 0xD0)
            if not self.keep:
                assert self.transport is not None
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(False)


async def one_setup(port: int, packet: bytes) -> bool:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bool] = loop.create_future()
    try:
        async with asyncio.timeout(15):
            transport, _ = await loop.create_connection(lambda: SetupClient(packet, done), "127.0.0.1", port)
            try:
                return await done
            finally:
                transport.close()
    except (OSError, TimeoutError):
        return False


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else float("nan")


async def setups(port: int, count: int, concurrency: int, users: int) -> None:
    packets = [build_connection_request(cookie=f"user{i:05d}", requested_protocols=3) for i in range(users)]
    remaining = list(range(count))
    errors = 0
    latencies: list[float] = []  # ms, connect to Confirm, successful setups only

    async def worker() -> None:
        nonlocal errors
        while remaining:
            i = remaining.pop()
            began = time.perf_counter()
            if await one_setup(port, packets[i % users]):
                latencies.append((time.perf_counter() - began) * 1e3)
            else:
                errors += 1

    started = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(concurrency):
            tg.create_task(worker())
    seconds = time.perf_counter() - started
    result = {"count": count, "errors": errors, "seconds": seconds}
    result |= {"p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99)}
    print(json.dumps(result))  # noqa: T201


# -- stickiness -------------------------------------------------------------------------------------


class WhoamiClient(asyncio.Protocol):
    """Connection Request, Confirm, then WHOAMI: resolves with the backend's port (0 on failure)."""

    def __init__(self, packet: bytes, done: asyncio.Future[int]) -> None:
        self.packet = packet
        self.done = done
        self.buf = b""
        self.confirmed = 0  # bytes of the Confirm, once it is whole
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        assert self.transport is not None
        self.transport.write(self.packet)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buf += data
        if (
            not self.confirmed
            and len(self.buf) >= 4
            and len(self.buf) >= int.from_bytes(self.buf[2:4], "big")
        ):
            self.confirmed = int.from_bytes(self.buf[2:4], "big")
            if self.buf[5] != 0xD0:
                self.finish(0)
                return
            self.transport.write(WHOAMI)
        if self.confirmed and len(self.buf) >= self.confirmed + WHOAMI_ANSWER_BYTES:
            answer = self.buf[self.confirmed :].strip()
            self.finish(int(answer) if answer.isdigit() else 0)

    def finish(self, port: int) -> None:
        if not self.done.done():
            self.done.set_result(port)
        assert self.transport is not None
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(0)


async def sticky(port: int, users: int, rounds: int, concurrency: int) -> None:
    loop = asyncio.get_running_loop()
    seen: dict[int, set[int]] = {i: set() for i in range(users)}
    errors = 0

    async def whoami(i: int) -> None:
        nonlocal errors
        done: asyncio.Future[int] = loop.create_future()
        packet = build_connection_request(cookie=f"sticky{i:05d}", requested_protocols=3)
        try:
            async with asyncio.timeout(30):
                factory = functools.partial(WhoamiClient, packet, done)
                transport, _ = await loop.create_connection(factory, "127.0.0.1", port)
                try:
                    server = await done
                finally:
                    transport.close()
        except (OSError, TimeoutError):
            server = 0
        if server:
            seen[i].add(server)
        else:
            errors += 1

    for _ in range(rounds):  # a round ends before the next begins: every user reconnects
        remaining = list(range(users))

        async def worker(remaining: list[int]) -> None:
            while remaining:
                await whoami(remaining.pop())

        async with asyncio.TaskGroup() as tg:
            for _ in range(concurrency):
                tg.create_task(worker(remaining))
    split = sum(1 for servers in seen.values() if len(servers) > 1)
    servers = len(set().union(*seen.values()))
    print(json.dumps({"users": users, "split": split, "errors": errors, "servers": servers}))  # noqa: T201


# -- bulk -------------------------------------------------------------------------------------------


def bulk(port: int, mib: int, streams: int) -> None:
    packet = build_connection_request(cookie="bulk", requested_protocols=3)
    total = mib * CHUNK
    socks = []
    for _ in range(streams):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(packet)
        got = b""
        while len(got) < len(CONFIRM):
            part = s.recv(len(CONFIRM) - len(got))
            if not part:
                raise SystemExit("closed during the handshake")
            got += part
        socks.append(s)
    received = [0] * streams
    block = bytes(range(256)) * (CHUNK // 256)

    def send(s: socket.socket) -> None:
        for _ in range(mib):
            s.sendall(block)
        s.shutdown(socket.SHUT_WR)

    def receive(i: int, s: socket.socket) -> None:
        buf = bytearray(CHUNK)
        while received[i] < total:
            n = s.recv_into(buf)
            if not n:
                break
            received[i] += n

    started = time.perf_counter()
    threads = [threading.Thread(target=send, args=(s,)) for s in socks]
    threads += [threading.Thread(target=receive, args=(i, s)) for i, s in enumerate(socks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    for s in socks:
        s.close()
    ok = all(r == total for r in received)
    print(json.dumps({"mib_each_way": mib * streams, "seconds": seconds, "ok": ok}))  # noqa: T201


# -- idle -------------------------------------------------------------------------------------------


async def idle(port: int, count: int) -> None:
    loop = asyncio.get_running_loop()
    held: list[asyncio.Transport] = []
    failed = 0
    remaining = list(range(count))

    async def worker() -> None:
        nonlocal failed
        while remaining:
            i = remaining.pop()
            done: asyncio.Future[bool] = loop.create_future()
            packet = build_connection_request(cookie=f"idle{i}", requested_protocols=3)

            try:
                async with asyncio.timeout(30):
                    factory = functools.partial(SetupClient, packet, done, keep=True)
                    transport, _ = await loop.create_connection(factory, "127.0.0.1", port)
                    if await done:
                        held.append(transport)
                    else:
                        failed += 1
            except (OSError, TimeoutError):
                failed += 1

    async with asyncio.TaskGroup() as tg:
        for _ in range(50):
            tg.create_task(worker())
    print(json.dumps({"held": len(held), "failed": failed}), flush=True)  # noqa: T201
    await loop.run_in_executor(None, sys.stdin.read)  # hold until the bench closes our stdin
    for transport in held:
        transport.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["backend", "fakebroker", "setups", "bulk", "idle", "sticky"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--servers", default="")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--streams", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.role == "backend":
        uvloop.run(backend(args.port))
    elif args.role == "fakebroker":
        uvloop.run(fakebroker(args.port, args.servers.split(",")))
    elif args.role == "setups":
        uvloop.run(setups(args.port, args.count, args.concurrency, args.users))
    elif args.role == "bulk":
        bulk(args.port, args.mib, args.streams)
    elif args.role == "sticky":
        uvloop.run(sticky(args.port, args.users, args.rounds, args.concurrency))
    else:
        uvloop.run(idle(args.port, args.count))


if __name__ == "__main__":
    main()
