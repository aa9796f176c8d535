"""The broker client: Route with failover across brokers, and reports that never block the data path.

Brokers are stateless replicas over one database, so any of them answers any call. The channels
(`rdbroker_common.broker_channels`: one per address, rotated, failing ones last, renewed certificates
and failing `dns:///` names followed) make a dead broker cost one failed call, not one per connection.
Route goes on a RouteStream per broker (`route_stream.py`: the calls waiting at one moment share a
message) or, with a broker without it, as a unary call; either way it is retried on another broker
with the same connection_id (the broker is idempotent on it), within one overall deadline.

Opened/Closed reports go through the queue of `reports.py`, up to REPORT_BATCH in one
ReportConnections call; a broker without that RPC gets the single ConnectionOpened/Closed calls.

With `token`, each call carries `authorization: Bearer <token>` (the broker's proxy role); a token file is
looked at at most every few seconds, never per call.

Trace context goes into each call's metadata (or a streamed call's message) through
`telemetry.traced_unary`/`traced_call`, not a channel interceptor: grpc.aio's interceptor path costs
about 100 us of CPU per call, spans or not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar

import grpc
from google.protobuf.message import Message
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_random_exponential

from rdbroker_common import telemetry, tls
from rdbroker_common.broker_channels import BrokerChannels
from rdbroker_common.broker_token import BrokerToken
from rdbroker_common.power import start_wait_s
from rdbroker_proto.v1 import broker_pb2 as pb
from rdbroker_proto.v1.broker_pb2_grpc import BrokerStub
from rdbroker_proxy import metrics
from rdbroker_proxy.errors import BrokerUnavailable, RouteRefused
from rdbroker_proxy.reports import REPORT_LINGER_S, RETRY_PAUSE_S, QueuedReports, Report
from rdbroker_proxy.route_stream import RouteStream, StreamUnsupported

if TYPE_CHECKING:
    from rdbroker_proto.v1.broker_pb2_grpc import BrokerAsyncStub

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

# A broker that failed with one of these may be down or cut off: another broker may answer.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
BATCH_RETRY_S = 60.0  # a broker that answered UNIMPLEMENTED is asked again after this (it may be upgraded)
MAX_ROUTE_PAUSE_S = 0.5  # between Route rounds over every broker
DNS_STREAMS = 4  # RouteStream calls kept per `dns:///` target, so several brokers share its calls
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]

SERVICE = "rdbroker.v1.Broker"  # span names, as the interceptors name them
ROUTE = f"{SERVICE}/Route"
REPORT_CONNECTIONS = f"{SERVICE}/ReportConnections"
HEARTBEAT = f"{SERVICE}/ProxyHeartbeat"

_SINGLE = {"opened": "ConnectionOpened", "closed": "ConnectionClosed"}


def held_until(deadline: float, started: float, start_wait_s: float) -> float:
    """The Route deadline once a broker asked to hold the user `start_wait_s` (0: unchanged)."""
    return max(deadline, started + start_wait_s) if start_wait_s > 0 else deadline


class Unanswered(Exception):
    """A round of Route tries that no broker answered, each failing with a retryable code."""

    def __init__(self, detail: str, start_wait_s: float = 0.0) -> None:
        super().__init__(detail)
        self.start_wait_s = start_wait_s  # a broker asked to hold the user this long (0: none)


async def route_in_rounds(
    round_: Callable[[float], Awaitable[pb.RouteResponse]], timeout_s: float
) -> pb.RouteResponse:
    """`round_(deadline)` (every broker in turn) round after round until one answers, with tenacity:
    between rounds a random pause in a window of 2 x RETRY_PAUSE_S doubling up to MAX_ROUTE_PAUSE_S,
    none begun that the deadline would cut, so a restarting broker (or every channel in reconnect
    backoff) is waited for, not given up on. A round that met a hold (a server being started) moves
    the deadline to that long after the start. RouteRefused passes through; a deadline reached
    raises BrokerUnavailable."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + timeout_s
    # The first round runs outside tenacity: its retry machinery costs ~4% of a set-up's CPU, and
    # nearly every Route is answered at the first round. A failure is handed to tenacity as its
    # first attempt, so the pauses and the stop rule are as if tenacity had run it.
    try:
        return await round_(deadline)
    except Unanswered as exc:
        first: Unanswered | None = exc

    async def next_round() -> pb.RouteResponse:
        nonlocal first
        if first is not None:
            failure, first = first, None
            raise failure
        return await round_(deadline)

    def out_of_time(state: RetryCallState) -> bool:
        nonlocal deadline
        failure = state.outcome.exception() if state.outcome is not None else None
        if isinstance(failure, Unanswered):
            deadline = held_until(deadline, started, failure.start_wait_s)
        return deadline - loop.time() <= state.upcoming_sleep

    retrying = AsyncRetrying(
        retry=retry_if_exception_type(Unanswered),
        # Full jitter: a storm a busy broker refused comes back spread over the pause, not all at
        # once to be refused again (in lockstep, an overloaded broker took ~2 users a round).
        wait=wait_random_exponential(
            multiplier=2 * RETRY_PAUSE_S, min=RETRY_PAUSE_S / 5, max=MAX_ROUTE_PAUSE_S
        ),
        stop=out_of_time,
        reraise=True,
    )
    try:
        async for attempt in retrying:
            with attempt:
                return await next_round()
    except Unanswered as exc:
        metrics.broker_unreachable.add(1, metrics.UNREACHABLE_ROUTE)
        raise BrokerUnavailable(f"no broker answered Route: {exc}") from exc
    raise AssertionError("tenacity ended without an outcome")  # reraise=True: never reached


class Broker(Protocol):
    """What the proxy needs from "a broker": the gRPC `BrokerClient` below, or the in-process client
    `rdbroker up` gives it (rdbroker_cli.inprocess), which calls the broker's use cases directly."""

    proxy_id: str
    sent_reports: int
    dropped_reports: int  # past the buffer bound
    rejected_reports: int  # refused by a broker

    @property
    def pending_reports(self) -> int: ...

    async def route(self, request: pb.RouteRequest) -> pb.RouteResponse:
        """Where this connection goes. Raises RouteRefused or BrokerUnavailable."""
        ...

    def report_opened(self, request: pb.ConnectionOpenedRequest) -> None: ...

    def report_closed(self, request: pb.ConnectionClosedRequest) -> None: ...

    async def run_reports(self) -> None: ...

    async def flush(self, timeout_s: float) -> bool: ...

    async def run_heartbeats(self, connection_ids: Callable[[], Sequence[str]]) -> None: ...

    async def close(self) -> None: ...


class BrokerClient(QueuedReports):
    """Talks to a set of broker replicas. Build it inside the event loop; `close()` it at the end."""

    def __init__(
        self,
        addresses: Sequence[str],
        *,
        proxy_id: str,
        route_timeout_s: float = 5.0,
        route_attempt_timeout_s: float = 2.0,
        route_stream: bool = True,
        report_timeout_s: float = 2.0,
        report_buffer: int = 10000,
        report_linger_s: float = REPORT_LINGER_S,
        heartbeat_interval_s: float = 5.0,
        credentials: grpc.ChannelCredentials | None = None,
        client_tls: tls.ClientTls | None = None,
        token: BrokerToken | None = None,
    ) -> None:
        if not addresses:
            raise ValueError("no broker addresses")
        super().__init__(
            proxy_id,
            report_buffer=report_buffer,
            report_linger_s=report_linger_s,
            heartbeat_interval_s=heartbeat_interval_s,
        )
        self.addresses = list(addresses)
        self.route_timeout_s = route_timeout_s
        self.route_attempt_timeout_s = route_attempt_timeout_s
        self.report_timeout_s = report_timeout_s
        # Rotation per call kind (reports do not skew Route's), failing channels last, TLS renewals
        # and failing dns:/// channels followed.
        self.channels: BrokerChannels[BrokerAsyncStub] = BrokerChannels(
            self.addresses,
            BrokerStub,
            options=CHANNEL_OPTIONS,
            credentials=credentials,
            client_tls=client_tls,
            token=token,
        )
        self._no_batch: dict[int, float] = {}  # broker index -> when it answered UNIMPLEMENTED
        self.route_stream = route_stream
        # RouteStream calls per broker index, each with the channel it runs on: one for a broker
        # address, several for a `dns:///` target (its channel balances streams, not calls).
        self._streams: list[list[tuple[RouteStream, grpc.aio.Channel] | None]] = [
            [None] * (DNS_STREAMS if a.startswith("dns:") else 1) for a in self.addresses
        ]
        self._stream_turn = [0] * len(self.addresses)
        self._no_stream: dict[int, float] = {}  # broker index -> when RouteStream answered UNIMPLEMENTED

    # -- Route ---------------------------------------------------------------------------------

    async def route(self, request: pb.RouteRequest) -> pb.RouteResponse:
        """Ask the brokers where this connection goes. Raises RouteRefused or BrokerUnavailable.

        A retry carries the same request (same connection_id and attempt), so a broker that
        answered an earlier try returns the same session rather than creating a second one. A broker
        that holds the user for a server being started (UNAVAILABLE with `rdbroker-start-wait-ms`)
        moves the deadline to that long after the call began: the client, its first packet read,
        just waits.
        """
        loop = asyncio.get_running_loop()

        async def every_broker(deadline: float) -> pb.RouteResponse:
            last: grpc.aio.AioRpcError | None = None
            hold = 0.0
            for index in self.channels.order("route"):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    return await self._route_at(index, request, min(remaining, self.route_attempt_timeout_s))
                except grpc.aio.AioRpcError as exc:
                    if exc.code() not in RETRYABLE:
                        raise RouteRefused(exc.code(), exc.details() or "") from exc
                    last = exc
                    hold = max(hold, start_wait_s(exc.trailing_metadata()))
                    log.debug(
                        "broker %s failed Route: %s",
                        self.addresses[index],
                        exc.code().name,
                        extra={"connection_id": request.connection_id},
                    )
            detail = f"{last.code().name}: {last.details()}" if last is not None else "deadline reached"
            raise Unanswered(detail, hold)

        return await route_in_rounds(every_broker, self.route_timeout_s)

    async def _route_at(self, index: int, request: pb.RouteRequest, timeout_s: float) -> pb.RouteResponse:
        """One Route try at one broker: on its RouteStream, else (off, or an older broker) unary."""
        if self.route_stream:
            marked = self._no_stream.get(index)
            if marked is None or time.monotonic() - marked >= BATCH_RETRY_S:
                stream = self._stream(index)
                try:
                    return await telemetry.traced_call(
                        ROUTE, lambda trace: stream.ask(request, timeout_s, trace)
                    )
                except StreamUnsupported:
                    if index not in self._no_stream:
                        log.info("broker %s has no RouteStream: unary Route with it", self.addresses[index])
                    self._no_stream[index] = time.monotonic()
        stub, metadata = self.channels.stub(index), self.channels.metadata
        return await telemetry.traced_unary(
            ROUTE, lambda trace: stub.Route(request, timeout=timeout_s, metadata=metadata(trace))
        )

    def _stream(self, index: int) -> RouteStream:
        """The next usable RouteStream to broker `index`: a new one when it ended, grew old, or its
        channel was replaced (renewed certificates, a failing `dns:///` name resolved again)."""
        slots = self._streams[index]
        turn = self._stream_turn[index] = (self._stream_turn[index] + 1) % len(slots)
        channel = self.channels.channel(index)
        held = slots[turn]
        if held is not None and held[0].usable and held[1] is channel:
            return held[0]
        if held is not None:
            held[0].retire()
        stub, metadata = self.channels.stub(index), self.channels.metadata
        stream = RouteStream(lambda: stub.RouteStream(metadata=metadata()))
        slots[turn] = (stream, channel)
        return stream

    async def _send_batch(self, batch: list[Report]) -> list[Report]:
        """Send a batch; answers what could not be sent, in order."""
        index = self.channels.order("report")[0]
        marked = self._no_batch.get(index)
        if marked is None or time.monotonic() - marked >= BATCH_RETRY_S:
            unsent = await self._report_connections(index, batch)
            if unsent is not None:
                return unsent
        return await self._send_singly(batch)

    async def _report_connections(self, index: int, batch: list[Report]) -> list[Report] | None:
        """One ReportConnections call for the whole batch; None when this broker lacks the RPC."""
        events = [
            pb.ConnectionEvent(opened=r)
            if isinstance(r, pb.ConnectionOpenedRequest)
            else pb.ConnectionEvent(closed=r)
            for _, r in batch
        ]
        request = pb.ReportConnectionsRequest(proxy_id=self.proxy_id, events=events)
        stub = self.channels.stub(index)
        try:
            answer = await telemetry.traced_unary(
                REPORT_CONNECTIONS,
                lambda metadata: stub.ReportConnections(
                    request, timeout=self.report_timeout_s, metadata=self.channels.metadata(metadata)
                ),
            )
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code is grpc.StatusCode.UNIMPLEMENTED:
                if index not in self._no_batch:
                    log.info(
                        "broker %s has no ReportConnections: sending single reports", self.addresses[index]
                    )
                self._no_batch[index] = time.monotonic()
                return None
            if code in RETRYABLE:
                # The broker may have applied part or all of it: resending is harmless (idempotent).
                log.debug("report batch to %s failed: %s", self.addresses[index], code.name)
                return batch
            # Refused whole (e.g. INVALID_ARGUMENT): it would be refused again.
            for kind, report in batch:
                self._rejected(kind, report, f"{code.name}: {exc.details()}")
            return []
        self._no_batch.pop(index, None)
        self._answered(batch, answer)
        return []

    async def _send_singly(self, batch: list[Report]) -> list[Report]:
        """The single RPCs, for brokers without ReportConnections. One connection's reports stay in order."""
        groups: dict[str, list[Report]] = {}
        for report in batch:
            groups.setdefault(report[1].connection_id, []).append(report)
        results = await asyncio.gather(*(self._send_in_order(g) for g in groups.values()))
        return [report for unsent in results for report in unsent]

    async def _send_in_order(self, reports: list[Report]) -> list[Report]:
        for i, (kind, request) in enumerate(reports):
            index = self.channels.order("report")[0]
            stub = self.channels.stub(index)
            try:
                await telemetry.traced_unary(f"{SERVICE}/{_SINGLE[kind]}", self._single(stub, request))
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE:
                    self._rejected(kind, request, f"{exc.code().name}: {exc.details()}")
                    continue
                log.debug("report to %s failed: %s", self.addresses[index], exc.code().name)
                return reports[i:]
            self.sent_reports += 1
        return []

    def _single(
        self, stub: BrokerAsyncStub, request: pb.ConnectionOpenedRequest | pb.ConnectionClosedRequest
    ) -> Callable[[grpc.aio.Metadata], Awaitable[Message]]:
        timeout, with_token = self.report_timeout_s, self.channels.metadata
        if isinstance(request, pb.ConnectionOpenedRequest):
            return lambda metadata: stub.ConnectionOpened(
                request, timeout=timeout, metadata=with_token(metadata)
            )
        return lambda metadata: stub.ConnectionClosed(request, timeout=timeout, metadata=with_token(metadata))

    # -- heartbeats ----------------------------------------------------------------------------

    async def _heartbeat(self, request: pb.ProxyHeartbeatRequest) -> pb.ProxyHeartbeatResponse:
        return await self._call_any(self._heartbeat_call(request))

    def _heartbeat_call(
        self, request: pb.ProxyHeartbeatRequest
    ) -> Callable[[BrokerAsyncStub], Awaitable[pb.ProxyHeartbeatResponse]]:
        return lambda stub: telemetry.traced_unary(
            HEARTBEAT,
            lambda metadata: stub.ProxyHeartbeat(
                request, timeout=self.report_timeout_s, metadata=self.channels.metadata(metadata)
            ),
        )

    async def _call_any(self, call: Callable[[BrokerAsyncStub], Awaitable[M]]) -> M:
        last: grpc.aio.AioRpcError | None = None
        for index in self.channels.order("report"):
            try:
                return await call(self.channels.stub(index))
            except grpc.aio.AioRpcError as exc:
                last = exc
        assert last is not None
        raise BrokerUnavailable(f"{last.code().name}: {last.details()}")

    async def close(self) -> None:
        for slots in self._streams:
            for held in slots:
                if held is not None:
                    held[0].close()
        await self.channels.close()
