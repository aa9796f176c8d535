"""RouteStream's server side: Route calls arriving in batches on one long-lived stream, answered as
each is ready, every answer ready at that moment in one message (while other calls are at work, an
answer waits up to HOLD_S for theirs).

grpc.aio costs about the same CPU per message as per unary call (bench/grpc_floor.py), so a busy proxy's
calls riding together pay that cost once per batch. Each call is answered by `answer` (the servicer runs
Route's use case there, as `call_locally`: its own deadline, admission, audit caller, status); this module
only moves calls and answers. A call's work runs to its end even when the stream goes away: nobody
reads that answer, and the proxy asks another broker with the same connection_id (Route is idempotent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable

import grpc

from rdbroker_proto.v1 import broker_pb2 as pb

log = logging.getLogger(__name__)

MAX_CALLS_PER_MESSAGE = 1000  # as the proto says; more in one message are answered INVALID_ARGUMENT
# Calls in flight on one stream; beyond, a call is answered UNAVAILABLE at once and the proxy asks
# another broker (the admission gate refuses long before this under a storm; this bounds memory).
MAX_IN_FLIGHT = 5000
# An answer ready while other calls of its stream are still at work waits up to this long for theirs,
# to share its message (bench/proxy_bench.py, 64 clients: 2 ms cut the proxy's CPU per set-up ~18%);
# the last call in flight is answered at once.
HOLD_S = 0.002

Answer = Callable[[pb.RouteCall], Awaitable[pb.RouteAnswer]]

# The calls' tasks, held until done: a stream that ends does not take its calls' work with it.
_working: set[asyncio.Task[None]] = set()


def refusal(call: pb.RouteCall, code: grpc.StatusCode, details: str) -> pb.RouteAnswer:
    return pb.RouteAnswer(call_id=call.call_id, code=code.value[0], details=details)


async def serve(
    calls: AsyncIterable[pb.RouteCalls], answer: Answer, stopping: asyncio.Event | None = None
) -> AsyncIterator[pb.RouteAnswers]:
    """The answers to every call read from `calls`, until the proxy stops writing (or `stopping` is set:
    this broker shuts down) and all calls read are answered. Calls the proxy wrote after that fail
    with the stream (UNAVAILABLE) and go to another broker, rather than keep this one in its grace."""
    ready: list[pb.RouteAnswer] = []
    woken = asyncio.Event()
    idle = asyncio.Event()  # no call of this stream in flight
    idle.set()
    in_flight = 0
    reading = True

    def done(item: pb.RouteAnswer) -> None:
        ready.append(item)
        woken.set()

    async def work(call: pb.RouteCall) -> None:
        nonlocal in_flight
        try:
            done(await answer(call))
        except Exception:  # `answer` turns failures into codes: this is a bug, answered as one
            log.exception("RouteStream call failed")
            done(refusal(call, grpc.StatusCode.INTERNAL, "internal error in the broker (see its log)"))
        finally:
            in_flight -= 1
            if not in_flight:
                idle.set()
            woken.set()

    async def read() -> None:
        nonlocal in_flight, reading
        try:
            async for message in calls:
                for n, call in enumerate(message.calls):
                    if n >= MAX_CALLS_PER_MESSAGE:
                        done(refusal(call, grpc.StatusCode.INVALID_ARGUMENT, "too many calls in one message"))
                    elif in_flight >= MAX_IN_FLIGHT:
                        done(refusal(call, grpc.StatusCode.UNAVAILABLE, "too many calls in flight here"))
                    else:
                        in_flight += 1
                        idle.clear()
                        task = asyncio.ensure_future(work(call))
                        _working.add(task)
                        task.add_done_callback(_working.discard)
        finally:
            reading = False
            woken.set()

    reader = asyncio.ensure_future(read())
    watch = asyncio.ensure_future(stopping.wait()) if stopping is not None else None
    if watch is not None:
        watch.add_done_callback(lambda _: reader.cancel())
    try:
        while reading or in_flight or ready:
            await woken.wait()
            woken.clear()
            if reader.done() and not reader.cancelled() and reader.exception() is not None:
                break  # the stream broke under the reader: nothing more can be written
            if ready and in_flight:
                # Other calls still at work: their answers may share this message.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(HOLD_S):
                        await idle.wait()
            if ready:
                batch = ready[:]
                ready.clear()
                yield pb.RouteAnswers(answers=batch)
        if not reader.cancelled():
            await reader  # its failure (the stream broken under it) is the call's
    finally:
        reader.cancel()
        if watch is not None:
            watch.cancel()
