"""Admission to the database under overload (a logon storm): calls queue for one of the pool's
connections in order, and a call that could no longer be answered before its deadline, or that
finds the queue full, is refused at once with UNAVAILABLE, so the proxy tries another replica.

Without this, every queued call waited for a pooled connection until its client gave up; the
broker then spent its CPU on calls nobody would read (PostgreSQL work, and a cancel request and a
new connection for each statement cancelled under way): offered twice its capacity, it answered
591-1,197 routes/s in time where it answers ~1,700 unloaded (`bench/route_bench.py --rate`,
docs/broker.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from contextvars import ContextVar
from typing import Any, TypeVar

from rdbroker_broker.errors import Overloaded

log = logging.getLogger(__name__)

T = TypeVar("T")

# When the current call's answer is no use any more (event loop time), if the call has a deadline.
call_deadline: ContextVar[float | None] = ContextVar("call_deadline", default=None)
# Calls that wait even when the queue is full: proxy heartbeats (one per proxy per interval). A
# proxy whose heartbeats are refused for a few intervals has its sessions marked disconnected.
beyond_queue_bound: ContextVar[bool] = ContextVar("beyond_queue_bound", default=False)


class Gate:
    """At most `slots` holders at once (the pool's size, so holders never wait in the pool);
    the others wait in arrival order, at most `max_waiting` of them, each until `margin_s` before
    its deadline (or `wait_s` without one)."""

    LOG_EVERY_S = 10.0  # refusals come by the thousand in a storm: one warning per interval

    def __init__(
        self,
        slots: int,
        *,
        max_waiting: int,
        wait_s: float,
        margin_s: float = 0.1,
        on_refused: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.slots = slots
        self.on_refused = on_refused  # counts refusals by reason (the app passes metrics.record_refused)
        self.max_waiting = max_waiting
        self.wait_s = wait_s
        self.margin_s = margin_s
        self._free = slots
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._refused_since_log = 0
        self._logged_at = -self.LOG_EVERY_S

    @property
    def held(self) -> int:
        return self.slots - self._free

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self._acquire()
        try:
            yield
        finally:
            self._release()

    async def _acquire(self) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        if len(self._waiters) >= self.max_waiting and not beyond_queue_bound.get():
            raise self._refused(
                "queue_full",
                f"the broker is overloaded: {len(self._waiters)} calls already wait for the database",
            )
        loop = asyncio.get_running_loop()
        deadline = call_deadline.get()
        wait = self.wait_s
        if deadline is not None:
            wait = min(wait, deadline - loop.time() - self.margin_s)
            if wait <= 0:
                raise self._refused(
                    "no_time", "the broker is overloaded: no time left in this call to wait for the database"
                )
        ticket: asyncio.Future[None] = loop.create_future()
        self._waiters.append(ticket)
        try:
            async with asyncio.timeout(wait):
                await ticket
        except BaseException as exc:
            if ticket.done() and not ticket.cancelled():
                self._release()  # handed a slot just as this call gave up: pass it on
            else:
                with suppress(ValueError):
                    self._waiters.remove(ticket)
            if isinstance(exc, TimeoutError):
                raise self._refused(
                    "timed_out",
                    "the broker is overloaded: no database connection came free in time for this call",
                ) from None
            raise

    def _refused(self, reason: str, message: str) -> Overloaded:
        self.on_refused(reason)
        self._refused_since_log += 1
        now = time.monotonic()
        if now - self._logged_at >= self.LOG_EVERY_S:
            log.warning(
                "overloaded: refused %d calls since the last warning (%d wait for %d database connections)",
                self._refused_since_log,
                len(self._waiters),
                self.slots,
                extra={"refused": self._refused_since_log, "waiting": len(self._waiters)},
            )
            self._refused_since_log, self._logged_at = 0, now
        return Overloaded(message)

    def _release(self) -> None:
        while self._waiters:
            ticket = self._waiters.popleft()
            if not ticket.done():
                ticket.set_result(None)  # the slot goes straight to the longest waiter
                return
        self._free += 1


async def run_to_completion(work: Awaitable[T]) -> T:
    """Await `work`, which runs on to its end even if this call is cancelled (its client gave up or
    its deadline passed). Stopping a statement under way costs PostgreSQL a cancel request and may
    cost the connection; the work is idempotent (a retried Route gets the stored answer)."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(_outcome_unread)
        raise


def _outcome_unread(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.debug("a cancelled call's work ended in %r", exc)
