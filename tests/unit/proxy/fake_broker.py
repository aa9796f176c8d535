"""An in-process Broker for proxy tests and the proxy bench: a real grpc.aio server, in-memory routing.

`Directory` is the shared state (what PostgreSQL is to real brokers); several `FakeBroker` servicers
over one Directory behave like broker replicas. Route follows the broker contract closely enough to
test the proxy: token -> the registered server it names (else PERMISSION_DENIED), a known user ->
their server (RECONNECT), else the least-used server (NEW, or NO_IDENTITY without a cookie), and one
answer per (connection_id, attempt): a retried call never creates a second session.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from rdbroker_broker.rpc import route_stream
from rdbroker_proto.v1 import broker_pb2 as pb
from rdbroker_proto.v1 import broker_pb2_grpc
from rdbroker_rdp import decode_routing_token


@dataclass
class Directory:
    pools: dict[str, list[str]]  # pool name ("" = default) -> server addresses
    answers: dict[tuple[str, int], pb.RouteResponse] = field(default_factory=dict)
    users: dict[tuple[str, str], str] = field(default_factory=dict)  # (pool, user) -> server
    sessions_created: Counter[str] = field(default_factory=Counter)  # connection_id -> sessions made
    placements: Counter[str] = field(default_factory=Counter)  # server -> sessions placed there
    routes: list[pb.RouteRequest] = field(default_factory=list)
    opened: list[pb.ConnectionOpenedRequest] = field(default_factory=list)
    closed: list[pb.ConnectionClosedRequest] = field(default_factory=list)
    heartbeats: list[pb.ProxyHeartbeatRequest] = field(default_factory=list)
    heartbeat_interval_ms: int = 5000
    error: tuple[grpc.StatusCode, str] | None = None  # answer every Route with this error
    opened_error: tuple[grpc.StatusCode, str] | None = None  # answer ConnectionOpened with this error
    batch_reports: bool = True  # False: ReportConnections answers UNIMPLEMENTED, as an older broker
    stream_routes: bool = True  # False: RouteStream answers UNIMPLEMENTED, as an older broker
    report_calls: Counter[str] = field(default_factory=Counter)  # RPC name -> calls carrying reports
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    def registered(self, address: str) -> bool:
        return any(address in servers for servers in self.pools.values())

    def route(self, request: pb.RouteRequest) -> pb.RouteResponse | tuple[grpc.StatusCode, str]:
        self.routes.append(request)
        if self.error is not None:
            return self.error
        key = (request.connection_id, request.attempt)
        if key in self.answers:
            return self.answers[key]
        pool = request.pool
        if pool not in self.pools:
            return grpc.StatusCode.NOT_FOUND, f"no pool {pool!r}"
        user = request.cookie.strip()
        if request.routing_token:
            target = decode_routing_token(request.routing_token)
            address = f"{target[0]}:{target[1]}" if target else ""
            if not address or not self.registered(address):
                return grpc.StatusCode.PERMISSION_DENIED, "token names no registered server"
            answer = self._answer(address, pb.ROUTE_REASON_TOKEN, user, pool, new=False)
        elif user and (pool, user) in self.users and request.attempt == 0:
            answer = self._answer(self.users[(pool, user)], pb.ROUTE_REASON_RECONNECT, user, pool, new=False)
        else:
            candidates = [s for s in self.pools[pool] if s != request.failed_server_address]
            if not candidates:
                return grpc.StatusCode.RESOURCE_EXHAUSTED, "no server can take a session"
            server = min(candidates, key=lambda s: self.placements[s])
            reason = pb.ROUTE_REASON_NEW if user else pb.ROUTE_REASON_NO_IDENTITY
            answer = self._answer(server, reason, user, pool, new=True)
            self.sessions_created[request.connection_id] += 1
            self.placements[server] += 1
            if user:
                self.users[(pool, user)] = server
        self.answers[key] = answer
        return answer

    def _answer(self, server: str, reason: int, user: str, pool: str, *, new: bool) -> pb.RouteResponse:
        return pb.RouteResponse(
            server_address=server,
            session_id=f"s{next(self._ids)}",
            reason=reason,  # type: ignore[arg-type]
            user=user,
            pool=pool or "default",
        )


class FakeBroker(broker_pb2_grpc.BrokerServicer):
    """One broker replica over a shared Directory. `hang_routes` makes Route commit and never answer."""

    def __init__(self, directory: Directory) -> None:
        self.directory = directory
        self.route_calls = 0
        self.streams_opened = 0
        self.hang_routes = False
        self.route_delay_s = 0.0

    async def Route(
        self, request: pb.RouteRequest, context: grpc.aio.ServicerContext[pb.RouteRequest, pb.RouteResponse]
    ) -> pb.RouteResponse:
        answer = await self._route(request)
        if isinstance(answer, tuple):
            await context.abort(answer[0], answer[1])
        assert isinstance(answer, pb.RouteResponse)
        return answer

    async def RouteStream(self, request_iterator, context):
        """The broker's own stream serving (rpc/route_stream.py) over this replica's Route."""
        self.streams_opened += 1
        if not self.directory.stream_routes:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        async for answers in route_stream.serve(request_iterator, self._stream_answer):
            yield answers

    async def _stream_answer(self, call: pb.RouteCall) -> pb.RouteAnswer:
        answer = await self._route(call.request)
        if isinstance(answer, tuple):
            return route_stream.refusal(call, *answer)
        return pb.RouteAnswer(call_id=call.call_id, response=answer)

    async def _route(self, request: pb.RouteRequest) -> pb.RouteResponse | tuple[grpc.StatusCode, str]:
        self.route_calls += 1
        if self.route_delay_s:
            await asyncio.sleep(self.route_delay_s)
        answer = self.directory.route(request)
        if self.hang_routes:
            await asyncio.sleep(3600)  # committed, but the answer never leaves: the proxy must retry
        return answer

    async def ConnectionOpened(self, request, context):
        self.directory.report_calls["ConnectionOpened"] += 1
        if self.directory.opened_error is not None:
            await context.abort(*self.directory.opened_error)
        self.directory.opened.append(request)
        return pb.ConnectionOpenedResponse()

    async def ConnectionClosed(self, request, context):
        self.directory.report_calls["ConnectionClosed"] += 1
        self.directory.closed.append(request)
        return pb.ConnectionClosedResponse()

    async def ReportConnections(self, request, context):
        if not self.directory.batch_reports:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        self.directory.report_calls["ReportConnections"] += 1
        answer = pb.ReportConnectionsResponse()
        for index, event in enumerate(request.events):
            kind = event.WhichOneof("event")
            if kind == "opened" and self.directory.opened_error is not None:
                answer.rejected.append(index)
                answer.rejected_reasons.append(f"{self.directory.opened_error[0].name}: refused")
            elif kind == "opened":
                self.directory.opened.append(event.opened)
            elif kind == "closed":
                self.directory.closed.append(event.closed)
            else:
                answer.rejected.append(index)
                answer.rejected_reasons.append("INVALID_ARGUMENT: empty event")
        return answer

    async def ProxyHeartbeat(self, request, context):
        self.directory.heartbeats.append(request)
        return pb.ProxyHeartbeatResponse(heartbeat_interval_ms=self.directory.heartbeat_interval_ms)


class RunningBroker:
    def __init__(self, servicer: FakeBroker, server: grpc.aio.Server, port: int) -> None:
        self.servicer = servicer
        self.server = server
        self.port = port
        self.address = f"127.0.0.1:{port}"

    async def stop(self) -> None:
        await self.server.stop(None)


@contextlib.asynccontextmanager
async def fake_broker(directory: Directory, port: int = 0) -> AsyncIterator[RunningBroker]:
    """A FakeBroker served on 127.0.0.1 (a free port unless one is given)."""
    server = grpc.aio.server()
    servicer = FakeBroker(directory)  # type: ignore[abstract]  # the other RPCs answer UNIMPLEMENTED
    broker_pb2_grpc.add_BrokerServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        yield RunningBroker(servicer, server, bound)
    finally:
        await server.stop(None)
