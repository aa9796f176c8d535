"""One client connection: first packet, route, connect, replay, then hand over to the splice.

The client side is an asyncio Protocol (no task while it is idle or spliced). Only the routing step,
which awaits the broker and the server connect, runs as a short task.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from opentelemetry import context as otel_context
from opentelemetry import trace

from rdbroker_common import telemetry
from rdbroker_common.settings import split_host_port
from rdbroker_proto.v1 import broker_pb2 as pb
from rdbroker_proxy.config import ProxySettings
from rdbroker_proxy.errors import BrokerUnavailable, RouteRefused
from rdbroker_proxy.routing import Broker
from rdbroker_proxy.splice import Splice
from rdbroker_rdp import FirstPacket, X224Error, decode_cookie, parse_first_packet

log = logging.getLogger(__name__)


class Spawn(Protocol):
    def __call__(
        self, coro: Coroutine[Any, Any, None], *, context: contextvars.Context | None = None
    ) -> asyncio.Task[None]: ...


# Route calls per client connection: the first answer and the retries after servers that could not
# be reached. The broker decides each retry: a user placed afresh is placed elsewhere; a user's own
# session moves only if the broker's probe of its server fails too (else the client is closed).
MAX_ROUTE_ATTEMPTS = 3

FIRST_PACKET, ROUTING, SPLICING, CLOSED = range(4)
# A client address over its limit of connections in the routing step is logged at most this often.
CLIENT_LIMIT_LOG_INTERVAL_S = 10.0
# A connection the client ended before it was spliced is no failure of ours.
CLIENT_ENDS = frozenset({"client_closed", "client_closed_early"})
_tracer = trace.get_tracer("rdbroker.proxy")
REASONS = {value: name.removeprefix("ROUTE_REASON_").lower() for name, value in pb.RouteReason.items()}


@dataclass
class ProxyContext:
    """What every connection of one proxy shares."""

    settings: ProxySettings
    broker: Broker
    spawn: Spawn
    log_identity: Callable[[str], str]  # a cookie as it is logged (`identity_logger`)
    connections: set[ClientConnection] = field(default_factory=set)
    accepted: int = 0
    refused_over_cap: int = 0
    # Connections per client address from accept until their splice starts (or they end): a scanner
    # or a misbehaving client cannot hold every Route and every first-packet timer of the proxy.
    routing_per_client: dict[str, int] = field(default_factory=dict)
    refused_over_client_limit: int = 0
    _client_limit_logged_at: float = float("-inf")
    _client_limit_unlogged: int = 0
    drained: asyncio.Event | None = None  # set when the last connection ends, once shutdown asks
    # The routing step's turns (`max_routing`), taken in arrival order. Without them a storm of
    # thousands of connections shares the loop round-robin: every set-up advances a step per turn of
    # the loop, all finish together, late, and past their Route deadlines (docs/performance.md, "A storm").
    route_turns: asyncio.Semaphore | None = None
    routing_waiting: int = 0  # connections waiting for a turn
    # Bytes of the connections that have ended (the live ones keep their own, in their splice).
    ended_from_client: int = 0
    ended_from_server: int = 0

    def forget(self, connection: ClientConnection) -> None:
        self.connections.discard(connection)
        if self.drained is not None and not self.connections:
            self.drained.set()

    def connection_ids(self) -> list[str]:
        return [c.connection_id for c in self.connections if c.connection_id]

    def enter_routing(self, host: str) -> bool:
        """Count one more connection of `host` in the routing step; False (not counted) over the limit."""
        limit = self.settings.max_routing_per_client
        count = self.routing_per_client.get(host, 0)
        if limit and count >= limit:
            self._refuse_over_client_limit(host)
            return False
        self.routing_per_client[host] = count + 1
        return True

    def leave_routing(self, host: str) -> None:
        count = self.routing_per_client[host] - 1
        if count:
            self.routing_per_client[host] = count
        else:
            del self.routing_per_client[host]

    def _refuse_over_client_limit(self, host: str) -> None:
        self.refused_over_client_limit += 1
        self._client_limit_unlogged += 1
        now = time.monotonic()
        if now - self._client_limit_logged_at < CLIENT_LIMIT_LOG_INTERVAL_S:
            return
        log.warning(
            "client %s has %d connections in the routing step (max_routing_per_client): closed %d"
            " connections over the limit since the last such line",
            host,
            self.routing_per_client.get(host, 0),
            self._client_limit_unlogged,
            extra={"client_host": host, "closed": self._client_limit_unlogged},
        )
        self._client_limit_logged_at = now
        self._client_limit_unlogged = 0


def identity_logger(mode: str, hasher: Callable[[str], str]) -> Callable[[str], str]:
    """How a connection's cookie shows in its log line: keyed-hashed (`loghash`), or as is."""
    if mode == "cookie":
        return lambda cookie: cookie
    return lambda cookie: hasher(cookie) if cookie else ""


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "_buf",
        "_task",
        "_timer",
        "client",
        "client_eof",
        "connection_id",
        "context",
        "cookie",
        "pool",
        "reason",
        "routing_host",
        "server_address",
        "session_id",
        "span",
        "splice",
        "started",
        "started_ns",
        "state",
        "transport",
    )

    def __init__(self, context: ProxyContext) -> None:
        self.context = context
        self.transport: asyncio.Transport | None = None
        self.client = ""
        self.state = FIRST_PACKET
        self._buf = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self.splice: Splice | None = None
        self.client_eof = False
        self.started = time.monotonic()
        self.started_ns = time.time_ns()
        self.span: trace.Span | None = None  # from the first packet on: the parent of the Route calls
        self.connection_id = ""
        self.cookie = ""
        self.pool = ""
        self.session_id = ""
        self.server_address = ""
        self.reason = ""
        self.routing_host: str | None = None  # the client address counted in routing_per_client

    # -- asyncio callbacks ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else ""
        ctx = self.context
        ctx.accepted += 1
        if len(ctx.connections) >= ctx.settings.max_connections:
            ctx.refused_over_cap += 1
            self.finish("over_capacity", abort=True)
            return
        host = peer[0] if isinstance(peer, tuple) else ""
        if not ctx.enter_routing(host):
            # A clean close (FIN), no broker call, no line per connection: the context logs a summary.
            self.state = CLOSED
            transport.close()
            return
        self.routing_host = host
        ctx.connections.add(self)
        self._timer = asyncio.get_running_loop().call_later(
            ctx.settings.first_packet_timeout_s, self.finish, "first_packet_timeout"
        )

    def data_received(self, data: bytes) -> None:
        if self.state == SPLICING:
            assert self.splice is not None
            self.splice.client_data(data)
            return
        self._buf += data
        if self.state != FIRST_PACKET:
            return  # routing: kept and replayed in order
        limit = self.context.settings.max_first_packet
        try:
            with memoryview(self._buf)[:limit] as head:  # never parse past the bound
                first = parse_first_packet(head)
        except X224Error as exc:
            log.debug("malformed first packet: %s", exc)
            self.finish("malformed_first_packet", abort=True)
            return
        if first is not None:
            self._route(first)
        elif len(self._buf) >= limit:
            self.finish("first_packet_too_large", abort=True)

    def eof_received(self) -> bool:
        if self.state == SPLICING:
            assert self.splice is not None
            self.splice.client_eof_received()
            return True
        if self.state == ROUTING:
            self.client_eof = True  # forwarded as a half-close after the replay
            return True
        self.finish("client_closed_early")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state == SPLICING and self.splice is not None:
            self.splice.client_lost(exc)
        else:
            self.finish("client_closed_early" if self.state == FIRST_PACKET else "client_closed")

    def pause_writing(self) -> None:
        if self.splice is not None:
            self.splice.client_write_paused()

    def resume_writing(self) -> None:
        if self.splice is not None:
            self.splice.client_write_resumed()

    # -- routing --------------------------------------------------------------------------------

    def _route(self, first: FirstPacket) -> None:
        assert self.transport is not None
        self.state = ROUTING
        self.transport.pause_reading()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.connection_id = str(uuid.uuid4())
        self.span = telemetry.start_span(
            _tracer,
            "rdp.connection",
            kind=trace.SpanKind.SERVER,
            attributes={"client.address": self.client, "rdbroker.connection_id": self.connection_id},
            start_time=self.started_ns,
        )
        # The task runs in a context where this span is current: the broker calls are its children.
        task_context = contextvars.copy_context()
        task_context.run(otel_context.attach, trace.set_span_in_context(self.span))
        self._task = self.context.spawn(self._establish(first), context=task_context)

    def _route_request(self, first: FirstPacket) -> pb.RouteRequest:
        request = first.request
        if request.cookie is not None:
            self.cookie = decode_cookie(request.cookie)
        self.pool = request.collection or self.context.settings.pool
        route = pb.RouteRequest(
            connection_id=self.connection_id,
            proxy_id=self.context.broker.proxy_id,
            pool=self.pool,
            cookie=self.cookie,
            client_address=self.client,
        )
        if request.routing_token is not None:
            route.routing_token = decode_cookie(request.routing_token)
        pre = first.preconnection
        if pre is not None:
            route.preconnection_id = pre.id
            if pre.blob:
                route.preconnection_blob = pre.blob.encode("utf-8", "surrogatepass")
        return route

    async def _establish(self, first: FirstPacket) -> None:
        """Route and connect, in this connection's turn (`ProxyContext.route_turns`)."""
        turns = self.context.route_turns
        if turns is None:
            await self._set_up(first)
            return
        if not await self._wait_for_turn(turns):
            return
        try:
            await self._set_up(first)
        finally:
            turns.release()

    async def _wait_for_turn(self, turns: asyncio.Semaphore) -> bool:
        """True once this connection has a turn; False when it waited too long (closed)."""
        if not turns.locked():
            await turns.acquire()  # a free turn: taken without waiting
            return True
        ctx = self.context
        ctx.routing_waiting += 1
        try:
            async with asyncio.timeout(ctx.settings.route_queue_timeout_s):
                await turns.acquire()
            return True
        except TimeoutError:
            self._task = None
            self.finish("route_queue_timeout")
            return False
        except asyncio.CancelledError:
            self.finish("shutdown", abort=True)  # a no-op when the client's departure cancelled us
            raise
        finally:
            ctx.routing_waiting -= 1

    async def _set_up(self, first: FirstPacket) -> None:
        try:
            request = self._route_request(first)
            answer = await self.context.broker.route(request)
            self._take(answer)
            splice = await self._connect(answer.server_address)
            while splice is None and request.attempt + 1 < MAX_ROUTE_ATTEMPTS:
                request.attempt += 1
                request.failed_server_address = answer.server_address
                answer = await self.context.broker.route(request)
                self._take(answer)
                splice = await self._connect(answer.server_address)
            if splice is None:
                self.finish("connect_failed")
                return
            if self.state != ROUTING:  # the client went away meanwhile
                splice.close()
                return
            self.splice = splice
            self.state = SPLICING
            self._leave_routing()
            replay, self._buf = bytes(self._buf), bytearray()
            splice.start(replay, self.client_eof)
            self.context.broker.report_opened(
                pb.ConnectionOpenedRequest(
                    session_id=self.session_id,
                    connection_id=self.connection_id,
                    proxy_id=self.context.broker.proxy_id,
                    server_address=self.server_address,
                )
            )
        except RouteRefused as exc:
            log.info("broker refused the route: %s", exc, extra={"connection_id": self.connection_id})
            self.finish(exc.end_reason)
        except BrokerUnavailable as exc:
            log.warning("%s", exc, extra={"connection_id": self.connection_id})
            self.finish(exc.end_reason)
        except asyncio.CancelledError:
            self.finish("shutdown", abort=True)  # a no-op when the client's departure cancelled us
            raise
        except Exception:  # a bug must not take the other connections down with it
            log.exception("connection set-up failed", extra={"connection_id": self.connection_id})
            self.finish("internal_error", abort=True)
        finally:
            self._task = None

    def _leave_routing(self) -> None:
        host, self.routing_host = self.routing_host, None
        if host is not None:
            self.context.leave_routing(host)

    def _take(self, answer: pb.RouteResponse) -> None:
        self.session_id = answer.session_id
        self.server_address = answer.server_address
        self.reason = REASONS.get(answer.reason, f"reason_{answer.reason}")  # a newer broker's value
        if answer.pool:
            self.pool = answer.pool

    async def _connect(self, address: str) -> Splice | None:
        assert self.transport is not None
        settings = self.context.settings
        try:
            host, port = split_host_port(address)
            splice = Splice(self, self.transport, settings.idle_timeout_s)
            async with asyncio.timeout(settings.connect_timeout_s):
                await asyncio.get_running_loop().create_connection(lambda: splice, host, port)
        except (OSError, TimeoutError, ValueError) as exc:
            log.info(
                "cannot connect to server %s: %s",
                address,
                exc or type(exc).__name__,
                extra={"connection_id": self.connection_id, "server": address},
            )
            return None
        return splice

    # -- the end --------------------------------------------------------------------------------

    def _end_span(self, reason: str, *, spliced: bool, from_client: int, from_server: int) -> None:
        span, self.span = self.span, None
        assert span is not None
        span.set_attributes(
            {
                "rdbroker.end_reason": reason,
                "rdbroker.route_reason": self.reason,
                "rdbroker.session_id": self.session_id,
                "server.address": self.server_address,
                "rdbroker.bytes_from_client": from_client,
                "rdbroker.bytes_from_server": from_server,
            }
        )
        if not spliced and reason not in CLIENT_ENDS:
            span.set_status(trace.Status(trace.StatusCode.ERROR, reason))
        span.end()

    def finish(self, reason: str, *, abort: bool = False) -> None:
        """End this connection once: close both sides, report to the broker, log one line."""
        if self.state == CLOSED:
            return
        routed = self.state in (ROUTING, SPLICING)
        self.state = CLOSED
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()
        from_client = from_server = 0
        if self.splice is not None:
            self.splice.close(abort=abort)
            from_client, from_server = self.splice.from_client, self.splice.from_server
        else:
            from_client = len(self._buf)
        self._buf = bytearray()
        ctx = self.context
        ctx.ended_from_client += from_client
        ctx.ended_from_server += from_server
        self._leave_routing()
        ctx.forget(self)
        duration_ms = int((time.monotonic() - self.started) * 1000)
        if self.span is not None:
            self._end_span(
                reason, spliced=self.splice is not None, from_client=from_client, from_server=from_server
            )
        if routed and self.session_id:
            ctx.broker.report_closed(
                pb.ConnectionClosedRequest(
                    session_id=self.session_id,
                    connection_id=self.connection_id,
                    proxy_id=ctx.broker.proxy_id,
                    bytes_from_client=from_client,
                    bytes_from_server=from_server,
                    duration_ms=duration_ms,
                    end_reason=reason,
                )
            )
        log.info(
            "connection ended: %s",
            reason,
            extra={
                "client": self.client,
                "connection_id": self.connection_id,
                "session_id": self.session_id,
                "pool": self.pool,
                "identity": ctx.log_identity(self.cookie),
                "server": self.server_address,
                "route_reason": self.reason,
                "bytes_from_client": from_client,
                "bytes_from_server": from_server,
                "duration_ms": duration_ms,
                "end_reason": reason,
            },
        )
