"""The health replica's client of the broker: several addresses, failover on unavailability.

Calls go to the last address that answered; on UNAVAILABLE or DEADLINE_EXCEEDED the next address is
tried, once around the list. Every call used here is safe to repeat (a claim renews, a report
overwrites), so a call that may have reached a broker before failing can be sent to another.

With `token`, each call carries `authorization: Bearer <token>` (the broker's health role).

With `client_tls`, renewed certificate files are noticed on a call at most every few seconds: new
channels take the next calls and the replaced ones close after a grace period
(`rdbroker_common.broker_channels`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Protocol, TypeVar

import grpc
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt

from rdbroker_common import tls
from rdbroker_common.broker_channels import BrokerChannels
from rdbroker_common.broker_token import BrokerToken
from rdbroker_health import metrics
from rdbroker_health.errors import BrokerRefused, BrokerUnavailable
from rdbroker_proto.v1 import broker_pb2, broker_pb2_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")

_FAILOVER_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# Reconnect quickly when a broker comes back; the default backoff grows to two minutes.
_CHANNEL_OPTIONS = [
    # Notice a broker that vanished without closing the connection (host gone, network cut).
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


class Broker(Protocol):
    """What the health replica needs from "a broker": the gRPC `BrokerClient` below, or the in-process
    client `rdbroker up` gives it (rdbroker_cli.inprocess). Raise BrokerRefused or BrokerUnavailable."""

    async def claim(self, replica_id: str, lease_ms: int) -> list[broker_pb2.ProbeTarget]: ...

    async def report_results(
        self, replica_id: str, results: Sequence[broker_pb2.ProbeResult]
    ) -> list[str]: ...

    async def report_sessions(
        self,
        replica_id: str,
        address: str,
        sessions: Sequence[broker_pb2.ReportedSession],
        omits_disconnected: bool = False,
        listed_at: datetime | None = None,
    ) -> broker_pb2.ReportServerSessionsResponse: ...

    async def close(self) -> None: ...


class BrokerClient:
    def __init__(
        self,
        addresses: Sequence[str],
        *,
        timeout_s: float,
        credentials: grpc.ChannelCredentials | None = None,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        client_tls: tls.ClientTls | None = None,
        token: BrokerToken | None = None,
    ) -> None:
        self.channels: BrokerChannels[broker_pb2_grpc.BrokerAsyncStub] = BrokerChannels(
            addresses,
            broker_pb2_grpc.BrokerStub,
            options=_CHANNEL_OPTIONS,
            credentials=credentials,
            client_tls=client_tls,
            interceptors=interceptors,
            token=token,
            sticky=True,  # calls stay on the broker that last answered
        )
        self.addresses = self.channels.targets
        self.timeout_s = timeout_s

    async def claim(self, replica_id: str, lease_ms: int) -> list[broker_pb2.ProbeTarget]:
        request = broker_pb2.ClaimProbeTargetsRequest(replica_id=replica_id, lease_ms=lease_ms)
        response = await self._call(
            "ClaimProbeTargets",
            lambda stub: stub.ClaimProbeTargets(request, timeout=self.timeout_s, metadata=self._metadata()),
        )
        return list(response.targets)

    async def report_results(self, replica_id: str, results: Sequence[broker_pb2.ProbeResult]) -> list[str]:
        """Send results; answers the addresses the broker refused (this replica holds no lease on them)."""
        request = broker_pb2.ReportProbeResultsRequest(replica_id=replica_id, results=results)
        response = await self._call(
            "ReportProbeResults",
            lambda stub: stub.ReportProbeResults(request, timeout=self.timeout_s, metadata=self._metadata()),
        )
        return list(response.rejected_addresses)

    async def report_sessions(
        self,
        replica_id: str,
        address: str,
        sessions: Sequence[broker_pb2.ReportedSession],
        omits_disconnected: bool = False,
        listed_at: datetime | None = None,
    ) -> broker_pb2.ReportServerSessionsResponse:
        request = broker_pb2.ReportServerSessionsRequest(
            replica_id=replica_id, address=address, sessions=sessions, omits_disconnected=omits_disconnected
        )
        if listed_at is not None:
            request.listed_at.FromDatetime(listed_at)
        return await self._call(
            "ReportServerSessions",
            lambda stub: stub.ReportServerSessions(
                request, timeout=self.timeout_s, metadata=self._metadata()
            ),
        )

    def _metadata(self) -> grpc.aio.Metadata:
        return self.channels.metadata()

    async def close(self) -> None:
        await self.channels.close()

    async def _call(self, name: str, send: Callable[[broker_pb2_grpc.BrokerAsyncStub], Awaitable[T]]) -> T:
        """Each address once, in the channels' order, until one answers; no pause between them (each
        try is bounded by `timeout_s`, so the whole call by that many times the number of brokers)."""
        order = self.channels.order()
        tried: list[int] = []
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(len(order)),
                retry=retry_if_exception(_failover),
                reraise=True,
            ):
                with attempt:
                    tried.append(order[len(tried)])
                    response = await self._send(name, tried[-1], send)
        except grpc.aio.AioRpcError as exc:
            if not _failover(exc):
                raise BrokerRefused(
                    f"{name} at {self.addresses[tried[-1]]}: {exc.code().name} {exc.details()}"
                ) from exc
            metrics.broker_unreachable.add(1, {"method": name})
            raise BrokerUnavailable(f"{name}: no broker answered ({', '.join(self.addresses)})") from exc
        self.channels.answered(tried[-1])
        return response

    async def _send(
        self, name: str, index: int, send: Callable[[broker_pb2_grpc.BrokerAsyncStub], Awaitable[T]]
    ) -> T:
        try:
            return await send(self.channels.stub(index))
        except grpc.aio.AioRpcError as exc:
            if _failover(exc):
                # The caller logs the outcome once; this is the per-address detail.
                log.debug("broker %s unavailable for %s: %s", self.addresses[index], name, exc.details())
            raise


def _failover(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in _FAILOVER_CODES
