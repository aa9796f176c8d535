"""`rdbroker up`'s proxy and health replica calling the broker's use cases in-process: no gRPC channel,
no serialization, no bearer token on the path, the same answers and the same failures.

Each call goes through the servicer's own methods (the same message conversions and route metrics as
over gRPC) via `call_locally`, which does what the gRPC server does around them: the caller bound for the
audit trail (`up:proxy`, `up:health`), the deadline for admission, the work run to completion, errors as
the status codes a gRPC client would have seen. The clients below then treat those codes exactly as
the gRPC clients do: Route retries UNAVAILABLE and DEADLINE_EXCEEDED until its deadline and refuses
the client on any other code; reports are queued, batched and resent as the proxy's gRPC client does.

The broker's gRPC listener stays (operators' tools use it); this process's own services no longer do.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import TypeVar

import grpc

from rdbroker_broker import callers
from rdbroker_broker.rpc.servicer import BrokerServicer, LocalStatus, call_locally
from rdbroker_common.power import start_wait_s
from rdbroker_health import metrics as health_metrics
from rdbroker_health.errors import BrokerRefused
from rdbroker_health.errors import BrokerUnavailable as HealthUnavailable
from rdbroker_proto.v1 import broker_pb2 as pb
from rdbroker_proxy.errors import BrokerUnavailable, RouteRefused
from rdbroker_proxy.reports import REPORT_LINGER_S, QueuedReports, Report
from rdbroker_proxy.routing import RETRYABLE, Unanswered, route_in_rounds

log = logging.getLogger(__name__)

T = TypeVar("T")

PROXY_CALLER = callers.Caller("up:proxy", role=callers.PROXY)
HEALTH_CALLER = callers.Caller("up:health", role=callers.HEALTH)


class LocalBroker:
    """The broker of this process, once it serves: `run_broker` sets `servicer` before the broker is
    ready and clears it when the broker stops, so a late call fails as an unreachable broker would."""

    def __init__(self) -> None:
        self.servicer: BrokerServicer | None = None

    def serving(self) -> BrokerServicer:
        if self.servicer is None:
            raise LocalStatus(grpc.StatusCode.UNAVAILABLE, "the broker of this process is not serving")
        return self.servicer


class ProxyBroker(QueuedReports):
    """The proxy's `Broker`, in-process."""

    def __init__(
        self,
        local: LocalBroker,
        proxy_id: str,
        *,
        route_timeout_s: float = 5.0,
        route_attempt_timeout_s: float = 2.0,
        report_timeout_s: float = 2.0,
        report_buffer: int = 10000,
        report_linger_s: float = REPORT_LINGER_S,
        heartbeat_interval_s: float = 5.0,
    ) -> None:
        super().__init__(
            proxy_id,
            report_buffer=report_buffer,
            report_linger_s=report_linger_s,
            heartbeat_interval_s=heartbeat_interval_s,
        )
        self.local = local
        self.route_timeout_s = route_timeout_s
        self.route_attempt_timeout_s = route_attempt_timeout_s
        self.report_timeout_s = report_timeout_s

    async def _call(self, work: Callable[[BrokerServicer], Awaitable[T]], timeout_s: float) -> T:
        servicer = self.local.serving()
        return await call_locally(lambda: work(servicer), PROXY_CALLER, timeout_s)

    async def route(self, request: pb.RouteRequest) -> pb.RouteResponse:
        """As BrokerClient.route with one broker: UNAVAILABLE (overload, the database away, a user held
        for a server being started: then until the pool's `start_wait`) and DEADLINE_EXCEEDED are
        retried with the same request until the deadline (Route is idempotent on connection_id); any
        other code refuses the client."""
        loop = asyncio.get_running_loop()

        async def once(deadline: float) -> pb.RouteResponse:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise Unanswered("deadline reached")
            try:
                return await self._call(
                    lambda s: s.route(request), min(remaining, self.route_attempt_timeout_s)
                )
            except LocalStatus as exc:
                if exc.code not in RETRYABLE:
                    raise RouteRefused(exc.code, exc.details) from exc
                raise Unanswered(f"{exc.code.name}: {exc.details}", start_wait_s(exc.trailing)) from exc

        return await route_in_rounds(once, self.route_timeout_s)

    async def _send_batch(self, batch: list[Report]) -> list[Report]:
        events = [
            pb.ConnectionEvent(opened=r)
            if isinstance(r, pb.ConnectionOpenedRequest)
            else pb.ConnectionEvent(closed=r)
            for _, r in batch
        ]
        request = pb.ReportConnectionsRequest(proxy_id=self.proxy_id, events=events)
        try:
            answer = await self._call(lambda s: s.report_connections(request), self.report_timeout_s)
        except LocalStatus as exc:
            if exc.code in RETRYABLE:
                return batch  # applied in part or not at all: resending is harmless (idempotent)
            for kind, report in batch:
                self._rejected(kind, report, f"{exc.code.name}: {exc.details}")
            return []
        self._answered(batch, answer)
        return []

    async def _heartbeat(self, request: pb.ProxyHeartbeatRequest) -> pb.ProxyHeartbeatResponse:
        try:
            return await self._call(lambda s: s.proxy_heartbeat(request), self.report_timeout_s)
        except LocalStatus as exc:
            raise BrokerUnavailable(f"{exc.code.name}: {exc.details}") from exc

    async def close(self) -> None:
        pass


class HealthBroker:
    """The health replica's `Broker`, in-process."""

    def __init__(self, local: LocalBroker, timeout_s: float) -> None:
        self.local = local
        self.timeout_s = timeout_s

    async def _call(self, name: str, work: Callable[[BrokerServicer], Awaitable[T]]) -> T:
        try:
            servicer = self.local.serving()
            return await call_locally(lambda: work(servicer), HEALTH_CALLER, self.timeout_s)
        except LocalStatus as exc:
            if exc.code in RETRYABLE:
                health_metrics.broker_unreachable.add(1, {"method": name})
                raise HealthUnavailable(f"{name}: the broker of this process did not answer") from exc
            raise BrokerRefused(f"{name} in process: {exc.code.name} {exc.details}") from exc

    async def claim(self, replica_id: str, lease_ms: int) -> list[pb.ProbeTarget]:
        request = pb.ClaimProbeTargetsRequest(replica_id=replica_id, lease_ms=lease_ms)
        answer = await self._call("ClaimProbeTargets", lambda s: s.claim_probe_targets(request))
        return list(answer.targets)

    async def report_results(self, replica_id: str, results: Sequence[pb.ProbeResult]) -> list[str]:
        request = pb.ReportProbeResultsRequest(replica_id=replica_id, results=results)
        answer = await self._call("ReportProbeResults", lambda s: s.report_probe_results(request))
        return list(answer.rejected_addresses)

    async def report_sessions(
        self,
        replica_id: str,
        address: str,
        sessions: Sequence[pb.ReportedSession],
        omits_disconnected: bool = False,
        listed_at: datetime | None = None,
    ) -> pb.ReportServerSessionsResponse:
        request = pb.ReportServerSessionsRequest(
            replica_id=replica_id, address=address, sessions=sessions, omits_disconnected=omits_disconnected
        )
        if listed_at is not None:
            request.listed_at.FromDatetime(listed_at)
        return await self._call("ReportServerSessions", lambda s: s.report_server_sessions(request))

    async def close(self) -> None:
        pass
