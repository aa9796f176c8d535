"""The rdbroker.v1.Broker servicer: converts messages, calls the use cases, maps errors to statuses."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from rdbroker_broker import audit, metrics, refusals
from rdbroker_broker import domain as d
from rdbroker_broker.admission import beyond_queue_bound, call_deadline, run_to_completion
from rdbroker_broker.callers import Caller
from rdbroker_broker.callers import current as current_caller
from rdbroker_broker.errors import (
    BrokerError,
    CapacityStarting,
    DatabaseUnavailable,
    InvalidInput,
    Overloaded,
)
from rdbroker_broker.probing import ProbeService
from rdbroker_broker.rpc import convert, route_stream
from rdbroker_broker.rpc.status import status_for
from rdbroker_broker.service import BrokerService, Closed, ConnectionEvent, Opened
from rdbroker_common import telemetry
from rdbroker_common.power import START_WAIT_METADATA, start_wait_s
from rdbroker_proto.v1 import broker_pb2 as pb
from rdbroker_proto.v1 import broker_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Context = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[[Any, Req, Context], Awaitable[Resp]]

ROUTE_SPAN = "rdbroker.v1.Broker/Route"  # a streamed call's span is named as the unary call's
MAX_REPORT_EVENTS = 1000  # per ReportConnections call: bounds one call's work and message size


def guarded(method: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Broker errors become their status code with the error's message; anything else is INTERNAL."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Req, context: Context) -> Resp:
        remaining = context.time_remaining()
        if remaining is not None:
            call_deadline.set(asyncio.get_running_loop().time() + remaining)
        try:
            # Past its deadline or cancelled by its client, a call's database work still finishes:
            # nobody reads the answer, but the statement and its connection are left intact.
            return await run_to_completion(method(self, request, context))
        except BrokerError as exc:
            code = status_for(exc)
            # Overload: the gate warns once a while; the database away: its state, once per change.
            if code is grpc.StatusCode.UNAVAILABLE and not isinstance(exc, _QUIET):
                log.warning("%s: %s", method.__name__, exc)
            hold = _hold(exc)
            if hold:
                await context.abort(code, str(exc), trailing_metadata=hold)
            await context.abort(code, str(exc))
        except Exception:
            log.exception("%s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error in the broker (see its log)")

    return wrapper


# UNAVAILABLE answers not worth a warning each: logged elsewhere, or a user held for a start.
_QUIET = (Overloaded, DatabaseUnavailable, CapacityStarting)


def _hold(exc: BrokerError) -> tuple[tuple[str, str], ...]:
    """The trailing metadata that holds a user in the proxy while a server starts (power.py)."""
    if isinstance(exc, CapacityStarting):
        return ((START_WAIT_METADATA, str(round(exc.wait_s * 1000))),)
    return ()


class LocalStatus(Exception):
    """An in-process call's failure as a gRPC client would have seen it: the status code, its details,
    its trailing metadata."""

    def __init__(
        self, code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.trailing = trailing


async def call_locally(work: Callable[[], Awaitable[Resp]], caller: Caller, timeout_s: float | None) -> Resp:
    """What a gRPC call of this servicer does, without gRPC (`rdbroker up`'s proxy and health replica):
    the caller bound for the audit trail, the deadline for admission, the work run to completion past the
    deadline, and every failure raised as the status `guarded` would have sent (LocalStatus)."""
    deadline = None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s
    # run_to_completion's task copies this context: the caller and the deadline go with the work.
    caller_token, deadline_token = current_caller.set(caller), call_deadline.set(deadline)
    try:
        async with asyncio.timeout(timeout_s):
            return await run_to_completion(work())
    except TimeoutError:
        raise LocalStatus(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
    except BrokerError as exc:
        code = status_for(exc)
        if code is grpc.StatusCode.UNAVAILABLE and not isinstance(exc, _QUIET):
            log.warning("in-process call: %s", exc)
        raise LocalStatus(code, str(exc), _hold(exc)) from exc
    except Exception as exc:
        log.exception("in-process call failed")
        raise LocalStatus(grpc.StatusCode.INTERNAL, "internal error in the broker (see its log)") from exc
    finally:
        call_deadline.reset(deadline_token)
        current_caller.reset(caller_token)


class BrokerServicer(pb_grpc.BrokerServicer):
    def __init__(self, service: BrokerService, probes: ProbeService) -> None:
        self.service = service
        self.probes = probes
        self.stopping = asyncio.Event()  # set when the broker shuts down: RouteStreams end

    @guarded
    async def Route(self, request: pb.RouteRequest, context: Context) -> pb.RouteResponse:
        return await self.route(request)

    async def RouteStream(
        self, request_iterator: AsyncIterator[pb.RouteCalls], context: Context
    ) -> AsyncIterator[pb.RouteAnswers]:
        # Not `guarded`: the stream is not one call to run to completion; each call inside it is.
        async for answers in route_stream.serve(request_iterator, self._stream_answer, self.stopping):
            yield answers

    async def _stream_answer(self, call: pb.RouteCall) -> pb.RouteAnswer:
        """One Route call of a stream, as the unary Route would have ended: its answer or its status."""
        timeout_s = call.timeout_ms / 1000 if call.timeout_ms else None
        with telemetry.server_span(ROUTE_SPAN, call.trace_context):
            try:
                work = functools.partial(self.route, call.request)
                response = await call_locally(work, current_caller.get(), timeout_s)
            except LocalStatus as status:
                answer = route_stream.refusal(call, status.code, status.details)
                answer.start_wait_ms = round(start_wait_s(status.trailing) * 1000)
                return answer
        return pb.RouteAnswer(call_id=call.call_id, response=response)

    async def route(self, request: pb.RouteRequest) -> pb.RouteResponse:
        """Route's work, for gRPC and for in-process callers (`call_locally`); raises BrokerError."""
        started = time.perf_counter()
        reason, outcome = "none", grpc.StatusCode.INTERNAL.name
        try:
            decision = await self.service.route(convert.route_request(request))
            reason, outcome = decision.reason.value, "ok"
            return convert.route_response(decision)
        except BrokerError as exc:
            outcome = status_for(exc).name
            refusals.count(self.service, exc, outcome)
            raise
        finally:
            metrics.record_route(reason, outcome, time.perf_counter() - started)

    @guarded
    async def ConnectionOpened(
        self, request: pb.ConnectionOpenedRequest, context: Context
    ) -> pb.ConnectionOpenedResponse:
        await self.service.connection_opened(request.session_id, request.connection_id, request.proxy_id)
        return pb.ConnectionOpenedResponse()

    @guarded
    async def ConnectionClosed(
        self, request: pb.ConnectionClosedRequest, context: Context
    ) -> pb.ConnectionClosedResponse:
        await self.service.connection_closed(
            request.session_id,
            request.connection_id,
            bytes_from_client=request.bytes_from_client,
            bytes_from_server=request.bytes_from_server,
            duration_ms=request.duration_ms,
            end_reason=request.end_reason,
        )
        return pb.ConnectionClosedResponse()

    @guarded
    async def ReportConnections(
        self, request: pb.ReportConnectionsRequest, context: Context
    ) -> pb.ReportConnectionsResponse:
        return await self.report_connections(request)

    async def report_connections(self, request: pb.ReportConnectionsRequest) -> pb.ReportConnectionsResponse:
        """Apply the events in order, each as its single RPC would. A refused event is answered by
        index and the rest go on; a database outage fails the whole call (the use cases are
        idempotent, so the proxy resends the whole batch)."""
        if len(request.events) > MAX_REPORT_EVENTS:
            raise InvalidInput(
                f"too many events ({len(request.events)}; at most {MAX_REPORT_EVENTS} per call)"
            )
        events: list[ConnectionEvent] = []
        positions: list[int] = []  # each event's index in the request
        errors: dict[int, Exception] = {}
        for index, event in enumerate(request.events):
            kind = event.WhichOneof("event")
            if kind == "opened":
                o = event.opened
                events.append(Opened(o.session_id, o.connection_id, o.proxy_id or request.proxy_id))
            elif kind == "closed":
                c = event.closed
                events.append(
                    Closed(
                        c.session_id,
                        c.connection_id,
                        c.bytes_from_client,
                        c.bytes_from_server,
                        c.duration_ms,
                        c.end_reason,
                    )
                )
            else:
                errors[index] = InvalidInput("event is neither opened nor closed")
                continue
            positions.append(index)
        for index, error in zip(positions, await self.service.report_connections(events), strict=True):
            if error is not None:
                errors[index] = error
        answer = pb.ReportConnectionsResponse()
        for index in sorted(errors):
            error = errors[index]
            answer.rejected.append(index)
            if isinstance(error, BrokerError):
                answer.rejected_reasons.append(f"{status_for(error).name}: {error}")
            else:
                answer.rejected_reasons.append("INTERNAL: internal error in the broker (see its log)")
        return answer

    @guarded
    async def ProxyHeartbeat(
        self, request: pb.ProxyHeartbeatRequest, context: Context
    ) -> pb.ProxyHeartbeatResponse:
        return await self.proxy_heartbeat(request)

    async def proxy_heartbeat(self, request: pb.ProxyHeartbeatRequest) -> pb.ProxyHeartbeatResponse:
        beyond_queue_bound.set(True)  # never refused for a full queue (admission.py)
        interval_ms = await self.service.proxy_heartbeat(
            request.proxy_id, request.active_connections, request.connection_ids
        )
        return pb.ProxyHeartbeatResponse(heartbeat_interval_ms=interval_ms)

    @guarded
    async def LookupUserSessions(
        self, request: pb.LookupUserSessionsRequest, context: Context
    ) -> pb.LookupUserSessionsResponse:
        found = await self.service.lookup_user_sessions(request.user, request.pool, request.include_ended)
        return pb.LookupUserSessionsResponse(sessions=[convert.session(s) for s in found])

    @guarded
    async def ListServers(self, request: pb.ListServersRequest, context: Context) -> pb.ListServersResponse:
        found = await self.service.list_servers(request.pool)
        now = self.service.now()
        return pb.ListServersResponse(servers=[convert.server(s, now) for s in found])

    @guarded
    async def SetServerState(
        self, request: pb.SetServerStateRequest, context: Context
    ) -> pb.SetServerStateResponse:
        state = convert.ADMIN_IN.get(request.admin_state)
        if state is None:
            refusal = InvalidInput("admin_state must be ENABLED, DRAINING or MAINTENANCE")
            audit.refused("server.state", request.address, refusal)  # the use case logs the others
            raise refusal
        server = await self.service.set_server_state(request.address, state)
        return pb.SetServerStateResponse(server=convert.server(server, self.service.now()))

    @guarded
    async def EndSession(self, request: pb.EndSessionRequest, context: Context) -> pb.EndSessionResponse:
        session = await self.service.end_session(request.session_id)
        return pb.EndSessionResponse(session=convert.session(session))

    @guarded
    async def ClaimProbeTargets(
        self, request: pb.ClaimProbeTargetsRequest, context: Context
    ) -> pb.ClaimProbeTargetsResponse:
        return await self.claim_probe_targets(request)

    async def claim_probe_targets(self, request: pb.ClaimProbeTargetsRequest) -> pb.ClaimProbeTargetsResponse:
        held = await self.probes.claim_targets(request.replica_id, request.lease_ms)
        targets = [
            pb.ProbeTarget(
                address=t.address,
                pool=t.pool,
                agent_url=t.agent_url,
                sessions_url=t.sessions_url,
                health=convert.HEALTH[t.health],
                interval_ms=t.interval_ms,
                timeout_ms=t.timeout_ms,
                rise=t.rise,
                fall=t.fall,
                sessions_interval_ms=t.sessions_interval_ms,
            )
            for t in held
        ]
        return pb.ClaimProbeTargetsResponse(targets=targets)

    @guarded
    async def ReportProbeResults(
        self, request: pb.ReportProbeResultsRequest, context: Context
    ) -> pb.ReportProbeResultsResponse:
        return await self.report_probe_results(request)

    async def report_probe_results(
        self, request: pb.ReportProbeResultsRequest
    ) -> pb.ReportProbeResultsResponse:
        results = [convert.probe_result(r) for r in request.results]
        rejected = await self.probes.report_results(request.replica_id, results)
        return pb.ReportProbeResultsResponse(rejected_addresses=rejected)

    @guarded
    async def ReportServerSessions(
        self, request: pb.ReportServerSessionsRequest, context: Context
    ) -> pb.ReportServerSessionsResponse:
        return await self.report_server_sessions(request)

    async def report_server_sessions(
        self, request: pb.ReportServerSessionsRequest
    ) -> pb.ReportServerSessionsResponse:
        reported = []
        for item in request.sessions:
            state = convert.SESSION_STATE_IN.get(item.state)
            if state not in (d.SessionState.ACTIVE, d.SessionState.DISCONNECTED):
                raise InvalidInput(f"session of {item.user[:40]!r}: state must be ACTIVE or DISCONNECTED")
            reported.append(d.ReportedSession(item.user, state))
        listed_at = convert.listed_at(request)
        counts = await self.probes.report_sessions(
            request.replica_id, request.address, reported, request.omits_disconnected, listed_at
        )
        return convert.reconcile_counts(counts)
