"""Route calls over a long-lived RouteStream call (proto/broker.proto): every call waiting at the moment
goes in one message, and answers come back by call_id.

grpc.aio costs about as much CPU per stream message as per unary call (~250-450 us on each side on a
2-core machine, bench/grpc_floor.py), so calls riding together pay it once per batch: 16 calls in flight
cost ~25 us each per side. One client alone pays one message each way, no more than a unary call.
Calls do not overlap by themselves often enough (1.6 calls per message at 64 clients against a real
broker), so while earlier calls are still unanswered a new call waits up to HOLD_S for others to share
its message; with nothing in flight it goes at once.

A stream's failure is every unanswered call's failure, as UNAVAILABLE (the broker went away: another may
answer, Route being idempotent on connection_id); a broker without the RPC fails it with UNIMPLEMENTED
(StreamUnsupported) and the caller falls back to unary Route. The caller replaces a stream after
MAX_AGE_S (`retire`): the broker's GOAWAY after its max connection age would cut a stream with calls in
flight, and a `dns:///` channel balances streams, not calls, over the brokers it resolves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

import grpc

from rdbroker_common.power import START_WAIT_METADATA
from rdbroker_proto.v1 import broker_pb2 as pb

log = logging.getLogger(__name__)

MAX_AGE_S = 5.0  # well inside the broker's 10 s max-connection-age grace
MAX_BATCH = 256  # calls per message (the broker takes up to 1000)
# While calls are in flight (the broker is busy), a new call waits this long for company: in
# bench/proxy_bench.py (64 clients, real broker) 2 ms cut the proxy's, broker's and PostgreSQL's CPU per
# set-up by 10-20% each, against a Route that takes several milliseconds there anyway.
HOLD_S = 0.002
RETIRE_GRACE_S = 30.0  # a retired stream still unanswered after this is cut
# Codes of a failed stream that its calls keep: the same call would fail so on its own.
_KEPT = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})

OpenCall = Callable[[], "grpc.aio.StreamStreamCall[pb.RouteCalls, pb.RouteAnswers]"]


class StreamUnsupported(Exception):
    """The broker has no RouteStream (an older broker): use unary Route with it."""


def status(
    code: grpc.StatusCode, details: str, trailing: Mapping[str, str] | None = None
) -> grpc.aio.AioRpcError:
    """A failure shaped as the unary call's would be, so callers handle both alike."""
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(*(trailing or {}).items()), details
    )


class RouteStream:
    """One RouteStream call to one broker. Build it inside the event loop."""

    def __init__(self, open_call: OpenCall) -> None:
        self.opened = time.monotonic()
        self._call = open_call()
        self._pending: dict[int, asyncio.Future[pb.RouteAnswer]] = {}
        self._outbox: list[pb.RouteCall] = []
        self._woken = asyncio.Event()
        self._last_id = 0
        self._retired = False
        self.failed: BaseException | None = None
        self.messages_written = 0
        self.calls_written = 0
        self._writer = asyncio.ensure_future(self._write())
        self._reader = asyncio.ensure_future(self._read())

    @property
    def usable(self) -> bool:
        return self.failed is None and not self._retired and time.monotonic() - self.opened < MAX_AGE_S

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def ask(
        self, request: pb.RouteRequest, timeout_s: float, trace: dict[str, str]
    ) -> pb.RouteResponse:
        """Route `request`; raises AioRpcError as the unary call would, or StreamUnsupported."""
        if self.failed is not None:
            raise self.failed
        self._last_id += 1
        call_id = self._last_id
        future: asyncio.Future[pb.RouteAnswer] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        self._outbox.append(
            pb.RouteCall(
                call_id=call_id,
                request=request,
                timeout_ms=max(1, round(timeout_s * 1000)),
                trace_context=trace,
            )
        )
        self._woken.set()
        try:
            async with asyncio.timeout(timeout_s):
                answer = await future
        except TimeoutError:
            raise status(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        finally:
            self._pending.pop(call_id, None)
        if answer.code == grpc.StatusCode.OK.value[0]:
            return answer.response
        trailing = {START_WAIT_METADATA: str(answer.start_wait_ms)} if answer.start_wait_ms else None
        raise status(_CODES.get(answer.code, grpc.StatusCode.UNKNOWN), answer.details, trailing)

    def retire(self) -> None:
        """No new calls; the broker answers those written, then the stream ends (cut after a grace)."""
        if self._retired:
            return
        self._retired = True
        self._woken.set()
        asyncio.get_running_loop().call_later(RETIRE_GRACE_S, self.close)

    def close(self) -> None:
        """End the stream now: unanswered calls fail (UNAVAILABLE) and may be asked elsewhere."""
        self._fail(None)

    # -- the two halves ------------------------------------------------------------------------

    async def _write(self) -> None:
        try:
            while True:
                await self._woken.wait()
                if len(self._pending) > len(self._outbox) and not self._retired:
                    await asyncio.sleep(HOLD_S)  # earlier calls unanswered: let others join
                self._woken.clear()
                while self._outbox:
                    batch = self._outbox[:MAX_BATCH]
                    del self._outbox[:MAX_BATCH]
                    await self._call.write(pb.RouteCalls(calls=batch))
                    self.messages_written += 1
                    self.calls_written += len(batch)
                if self._retired:
                    await self._call.done_writing()
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a finished call refuses writes (AioRpcError, InvalidStateError)
            self._fail(exc)

    async def _read(self) -> None:
        error: BaseException | None = None
        try:
            while True:
                message = await self._call.read()
                if not isinstance(message, pb.RouteAnswers):  # grpc.aio.EOF: the broker ended it
                    break
                for answer in message.answers:
                    future = self._pending.get(answer.call_id)
                    if future is not None and not future.done():
                        future.set_result(answer)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = exc
        self._fail(error)

    def _fail(self, error: BaseException | None) -> None:
        """The stream is over: every unanswered call fails with what the stream ended with."""
        if self.failed is None:
            self.failed = _stream_failure(error)
            log.debug(
                "route stream over: %d calls in %d messages (%s)",
                self.calls_written,
                self.messages_written,
                self.failed,
            )
        for future in self._pending.values():
            if not future.done():
                future.set_exception(self.failed)
        self._outbox.clear()
        current = asyncio.current_task()
        for task in (self._writer, self._reader):
            if task is not current:
                task.cancel()
        self._call.cancel()


def _stream_failure(error: BaseException | None) -> BaseException:
    if isinstance(error, grpc.aio.AioRpcError):
        code = error.code()
        if code is grpc.StatusCode.UNIMPLEMENTED:
            return StreamUnsupported(error.details() or "")
        if code in _KEPT:
            return status(code, error.details() or "")
        return status(grpc.StatusCode.UNAVAILABLE, f"route stream ended: {code.name}: {error.details()}")
    if error is None:
        return status(grpc.StatusCode.UNAVAILABLE, "route stream ended")
    return status(grpc.StatusCode.UNAVAILABLE, f"route stream failed: {error!r}")


_CODES = {code.value[0]: code for code in grpc.StatusCode}
