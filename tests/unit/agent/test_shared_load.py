"""`GET /load` is computed once for concurrent requests and reused for `load_cache_s`; the agent serves
at most `max_connections` connections at once: a request on one more gets 503 and a close."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import httpx
import pytest

from rdbroker_agent.__main__ import main
from rdbroker_agent.config import parse_config
from rdbroker_agent.server import AgentServer
from rdbroker_agent.shared import SharedResult
from tests.unit.agent.fakes import FakeSources

T = TypeVar("T")

CONFIG = parse_config({"counters": [{"kind": "cpu"}]})


def spawn(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    # These tests need loose tasks to race each other; each is awaited or cancelled by its test.
    return asyncio.get_running_loop().create_task(coro)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Gate:
    """A computation that waits until released, counting its runs."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.runs = 0
        self.fail = False

    async def __call__(self) -> str:
        self.runs += 1
        await asyncio.wait_for(self.open.wait(), 5)
        if self.fail:
            raise RuntimeError("counter broke")
        return f"{self.runs}"


async def test_concurrent_callers_share_one_computation() -> None:
    gate = Gate()
    shared = SharedResult(gate, ttl_s=1.0)
    waiters = [spawn(shared.get()) for _ in range(10)]
    await asyncio.sleep(0)
    gate.open.set()
    assert await asyncio.gather(*waiters) == ["1"] * 10
    assert gate.runs == 1


async def test_an_answer_is_reused_until_it_is_ttl_old() -> None:
    gate, clock = Gate(), Clock()
    gate.open.set()
    shared = SharedResult(gate, ttl_s=1.0, clock=clock)
    assert await shared.get() == "1"
    clock.now += 0.9
    assert await shared.get() == "1"
    clock.now += 0.1
    assert await shared.get() == "2"
    assert shared.computations == 2


async def test_zero_ttl_still_shares_but_never_reuses() -> None:
    gate = Gate()
    shared = SharedResult(gate, ttl_s=0.0)
    first = [spawn(shared.get()) for _ in range(3)]
    await asyncio.sleep(0)
    gate.open.set()
    assert await asyncio.gather(*first) == ["1"] * 3
    assert await shared.get() == "2"


async def test_a_failure_reaches_every_waiter_and_is_not_kept() -> None:
    gate = Gate()
    gate.fail = True
    shared = SharedResult(gate, ttl_s=10.0)
    waiters = [spawn(shared.get()) for _ in range(3)]
    await asyncio.sleep(0)
    gate.open.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    gate.fail = False
    assert await shared.get() == str(gate.runs)


async def test_one_waiter_leaving_does_not_cancel_the_others() -> None:
    gate = Gate()
    shared = SharedResult(gate, ttl_s=1.0)
    staying, leaving = spawn(shared.get()), spawn(shared.get())
    await asyncio.sleep(0)
    leaving.cancel()
    gate.open.set()
    assert await staying == "1"
    assert leaving.cancelled()


def test_a_negative_ttl_is_refused() -> None:
    with pytest.raises(ValueError, match="ttl_s"):
        SharedResult(Gate(), ttl_s=-1)


class SlowCpu(FakeSources):
    def __init__(self) -> None:
        super().__init__(cpu=40.0)
        self.gate = asyncio.Event()
        self.calls = 0

    async def cpu_percent(self) -> float:
        self.calls += 1
        await asyncio.wait_for(self.gate.wait(), 5)
        return 40.0


async def test_concurrent_load_requests_run_the_counters_once() -> None:
    sources = SlowCpu()
    async with AgentServer(CONFIG, sources, load_cache_s=5.0) as server:
        client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=10)
        async with client:
            requests = [spawn(client.get("/load")) for _ in range(8)]
            for _ in range(100):  # bounded: wait until the first request reached the counter
                if sources.calls:
                    break
                await asyncio.sleep(0.01)
            sources.gate.set()
            answers = await asyncio.gather(*requests)
            assert [a.text for a in answers] == ["40\n"] * 8
            assert (await client.get("/load")).text == "40\n"  # within load_cache_s: reused
    assert sources.calls == 1


async def hold(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection kept open by an unfinished request head."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /lo")
    await writer.drain()
    return reader, writer


async def until(check) -> None:
    for _ in range(500):  # bounded
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met")


async def test_over_the_connection_cap_a_request_gets_503() -> None:
    async with AgentServer(CONFIG, FakeSources(cpu=10.0), max_connections=2) as server:
        held = [await hold(server.port)]
        await until(lambda: server.open_connections == 1)
        # One held and this one: two, within the cap.
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=5) as client:
            assert (await client.get("/load")).text == "10\n"
        held.append(await hold(server.port))
        await until(lambda: server.open_connections == 2)

        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /load HTTP/1.1\r\nHost: agent\r\n\r\n")
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(), 5)  # the whole answer, then the close
        writer.close()
        await writer.wait_closed()
        assert reply.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        assert b"\r\nconnection: close\r\n" in reply.lower()
        assert reply.endswith(b"\r\n\r\nService Unavailable")

        for _, held_writer in held:
            held_writer.close()
            await held_writer.wait_closed()
        await until(lambda: server.open_connections == 0)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=5) as client:
            assert (await client.get("/load")).text == "10\n"


def test_bad_cache_or_cap_settings_are_refused(tmp_path, capsys) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('[[counters]]\nkind = "cpu"\n')
    assert main(["--config", str(config), "--max-connections", "0"]) == 2
    assert "agent_max_connections" in capsys.readouterr().err
    assert main(["--config", str(config), "--load-cache-s", "-1"]) == 2
    assert "agent_load_cache_s" in capsys.readouterr().err
