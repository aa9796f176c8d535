"""The admission gate in front of the database pool (rdbroker_broker/admission.py): arrival order,
refusals that come at once (queue full, no time left) or before the deadline, and no slot lost to a
waiter that gives up or is cancelled."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Iterator

import pytest

from rdbroker_broker.admission import Gate, beyond_queue_bound, call_deadline, run_to_completion
from rdbroker_broker.errors import Overloaded, Unavailable

REFUSED: list[str] = []  # the reasons the gates below refused calls for


def gate(slots: int = 1, max_waiting: int = 100, wait_s: float = 10.0, margin_s: float = 0.1) -> Gate:
    return Gate(slots, max_waiting=max_waiting, wait_s=wait_s, margin_s=margin_s, on_refused=REFUSED.append)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def occupied(g: Gate, holders: int = 1) -> AsyncIterator[None]:
    """`holders` calls in the gate (holding a slot, or past the slots waiting) until the block ends."""
    release = asyncio.Event()

    async def hold() -> None:
        async with g.slot():
            await release.wait()

    tasks = [asyncio.ensure_future(hold()) for _ in range(holders)]
    await settle()
    try:
        yield
    finally:
        release.set()
        await asyncio.gather(*tasks)


@contextlib.contextmanager
def deadline_in(seconds: float) -> Iterator[float]:
    deadline = asyncio.get_running_loop().time() + seconds
    call_deadline.set(deadline)
    try:
        yield deadline
    finally:
        call_deadline.set(None)


async def test_waiting_calls_get_the_slot_in_arrival_order() -> None:
    g = gate(slots=1)
    order: list[str] = []
    first = asyncio.Event()

    async def call(name: str, hold: asyncio.Event | None = None) -> None:
        async with g.slot():
            order.append(name)
            if hold is not None:
                await hold.wait()

    holder = asyncio.ensure_future(call("a", first))
    await settle()
    waiters = [asyncio.ensure_future(call(name)) for name in "bcd"]
    await settle()
    assert (g.held, g.waiting) == (1, 3)
    first.set()
    await asyncio.gather(holder, *waiters)
    assert order == ["a", "b", "c", "d"]
    assert (g.held, g.waiting) == (0, 0)


async def test_a_full_queue_refuses_the_next_call_at_once(caplog: pytest.LogCaptureFixture) -> None:
    g = gate(slots=1, max_waiting=2)
    async with occupied(g, 3):  # one holds, two wait
        REFUSED.clear()
        caplog.set_level(logging.WARNING)
        with pytest.raises(Overloaded, match="overloaded: 2 calls already wait for the database"):
            async with g.slot():
                pytest.fail("admitted past a full queue")
        assert isinstance(Overloaded("x"), Unavailable)  # so the proxy tries another broker
        assert REFUSED == ["queue_full"]
        assert any("overloaded: refused 1 calls" in r.getMessage() for r in caplog.records)
    assert (g.held, g.waiting) == (0, 0)


async def test_a_call_marked_beyond_the_queue_bound_waits_when_the_queue_is_full() -> None:
    g = gate(slots=1, max_waiting=1)

    async def heartbeat() -> str:
        beyond_queue_bound.set(True)
        async with g.slot():
            return "in"

    async with occupied(g, 2):  # one holds, one waits: full
        with pytest.raises(Overloaded):
            async with g.slot():
                pass
        marked = asyncio.ensure_future(heartbeat())
        await settle()
        assert g.waiting == 2
    assert await marked == "in"


async def test_refusals_in_a_storm_are_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    g = gate(slots=1, max_waiting=1)
    async with occupied(g, 2):
        caplog.set_level(logging.WARNING)
        for _ in range(50):
            with pytest.raises(Overloaded):
                async with g.slot():
                    pass
    warnings = [r for r in caplog.records if r.name == "rdbroker_broker.admission"]
    assert len(warnings) == 1


async def test_a_call_with_no_time_left_is_refused_without_waiting() -> None:
    g = gate(slots=1, margin_s=0.1)
    async with occupied(g):
        with deadline_in(0.05), pytest.raises(Overloaded, match="no time left"):  # under the margin
            async with g.slot():
                pytest.fail("admitted with no time left")
        assert g.waiting == 0


async def test_a_waiting_call_gives_up_a_margin_before_its_deadline() -> None:
    g = gate(slots=1, margin_s=0.2)
    async with occupied(g):
        with deadline_in(0.5), pytest.raises(Overloaded, match="no database connection came free in time"):
            async with g.slot():
                pytest.fail("admitted while the slot was held")
        assert g.waiting == 0
    async with g.slot():  # the slot it waited for is still there
        assert g.held == 1


async def test_a_slot_handed_to_a_waiter_cancelled_before_it_runs_passes_on() -> None:
    g = gate(slots=1)
    got: list[str] = []

    async def call(name: str) -> None:
        async with g.slot():
            got.append(name)

    held = g.slot()
    await held.__aenter__()
    b = asyncio.ensure_future(call("b"))
    c = asyncio.ensure_future(call("c"))
    await settle()
    assert g.waiting == 2
    await held.__aexit__(None, None, None)  # hands the slot to b's ticket without yielding to b
    b.cancel()
    await c
    with pytest.raises(asyncio.CancelledError):
        await b
    assert got == ["c"]
    assert (g.held, g.waiting) == (0, 0)


async def test_no_slot_is_lost_or_doubled_under_random_cancellations_and_deadlines() -> None:
    rng = random.Random(7)
    g = gate(slots=3, max_waiting=40, margin_s=0.001)
    inside = 0
    most = 0
    loop = asyncio.get_running_loop()

    async def call() -> None:
        nonlocal inside, most
        if rng.random() < 0.5:
            call_deadline.set(loop.time() + rng.uniform(0.0, 0.03))
        async with g.slot():
            inside += 1
            most = max(most, inside)
            try:
                await asyncio.sleep(rng.uniform(0.0, 0.004))
            finally:
                inside -= 1

    tasks = [asyncio.ensure_future(call()) for _ in range(300)]
    for task in tasks:
        if rng.random() < 0.2:
            loop.call_later(rng.uniform(0.0, 0.05), task.cancel)
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    kinds = {type(o).__name__ for o in outcomes}
    assert kinds <= {"NoneType", "Overloaded", "CancelledError"}
    assert "NoneType" in kinds  # calls were admitted
    assert "Overloaded" in kinds  # and calls were refused
    assert most <= 3
    assert (g.held, g.waiting) == (0, 0)
    async with g.slot(), g.slot(), g.slot():  # all three slots are still there
        assert g.held == 3


async def test_work_runs_to_its_end_when_its_call_is_cancelled(caplog: pytest.LogCaptureFixture) -> None:
    finished = asyncio.Event()
    started = asyncio.Event()

    async def work(fail: bool) -> str:
        started.set()
        await asyncio.sleep(0.01)
        finished.set()
        if fail:
            raise Unavailable("gone")
        return "done"

    for fail in (False, True):
        started.clear()
        finished.clear()
        call = asyncio.ensure_future(run_to_completion(work(fail)))
        await started.wait()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await asyncio.wait_for(finished.wait(), 5)  # the work went on without its caller
        await settle()
    assert await run_to_completion(work(False)) == "done"
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
