"""The health replica's client of the broker: several addresses, failover on unavailability.

Calls go to the last address that answered; on UNAVAILABLE or DEADLINE_EXCEEDED the next address is
tried, once around the list. Every call used here is safe to repeat (a claim renews, a report
overwrites), so a call that may have reached a broker before failing can be sent to another.

With `token`, each call carries `authorization: Bearer <token>` (the broker's health role).

With `client_tls`, renewed certificate files are noticed on a call at most every few seconds: new
channels take the next calls and the replaced ones close after a grace period.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Protocol, TypeVar

import grpc

from rdbroker_common import tls
from rdbroker_common.broker_token import BrokerToken
from rdbroker_common.settings import Renewal, channel_options
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
        if not addresses:
            raise ValueError("at least one broker address is needed")
        self.addresses = list(addresses)
        self.timeout_s = timeout_s
        self._tls = client_tls
        self._token = token or BrokerToken()
        self._interceptors = interceptors
        if client_tls is not None:
            credentials = client_tls.credentials
        self._credentials = credentials
        self._renewal = Renewal()
        self._channels = [self._channel(a, credentials, interceptors) for a in self.addresses]
        self._stubs = [broker_pb2_grpc.BrokerStub(c) for c in self._channels]
        self._current = 0
        self._retiring: set[asyncio.Task[None]] = set()

    @staticmethod
    def _channel(
        target: str,
        credentials: grpc.ChannelCredentials | None,
        interceptors: Sequence[grpc.aio.ClientInterceptor],
    ) -> grpc.aio.Channel:
        # A `dns:///` target is one channel balanced over every address the name resolves to.
        options = [*_CHANNEL_OPTIONS, *channel_options(target)]
        if credentials is not None:
            return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)

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
        return grpc.aio.Metadata(*self._token.metadata())

    async def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()  # closes the replaced channels now
        await asyncio.gather(*self._retiring, return_exceptions=True)
        for channel in self._channels:
            await channel.close()

    def _follow_tls(self) -> None:
        """New channels when the certificate files changed; calls in flight finish on the old ones."""
        if self._tls is None or not self._tls.changed():
            return
        old = self._channels
        credentials = self._credentials = self._tls.credentials
        self._channels = [self._channel(a, credentials, self._interceptors) for a in self.addresses]
        self._stubs = [broker_pb2_grpc.BrokerStub(c) for c in self._channels]
        log.info("TLS files changed: new broker channels")
        self._retire(old)

    def _renew_failing(self) -> None:
        """A `dns:///` channel failing for a few seconds is replaced: the new one resolves the name at
        once (brokers back after an outage), where the old one waits out its resolver's backoff."""
        failing = grpc.ChannelConnectivity.TRANSIENT_FAILURE
        for index, channel in enumerate(self._channels):
            if self._renewal.due(index, self.addresses[index], channel.get_state() == failing):
                log.info(
                    "broker channel to %s failing: a new one resolves the name again", self.addresses[index]
                )
                self._channels[index] = self._channel(
                    self.addresses[index], self._credentials, self._interceptors
                )
                self._stubs[index] = broker_pb2_grpc.BrokerStub(self._channels[index])
                self._retire([channel])

    def _retire(self, channels: list[grpc.aio.Channel]) -> None:
        task = tls.retire_channels(channels)
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _order(self) -> list[int]:
        """Every address once: the last one that answered first, those known to be failing last."""
        self._follow_tls()
        self._renew_failing()
        n = len(self._stubs)
        rotated = [(self._current + step) % n for step in range(n)]
        failing = grpc.ChannelConnectivity.TRANSIENT_FAILURE
        healthy = [i for i in rotated if self._channels[i].get_state() != failing]
        return healthy + [i for i in rotated if i not in healthy]

    async def _call(self, name: str, send: Callable[[broker_pb2_grpc.BrokerAsyncStub], Awaitable[T]]) -> T:
        last: grpc.aio.AioRpcError | None = None
        for index in self._order():
            try:
                response = await send(self._stubs[index])
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _FAILOVER_CODES:
                    raise BrokerRefused(
                        f"{name} at {self.addresses[index]}: {exc.code().name} {exc.details()}"
                    ) from exc
                # The caller logs the outcome once; this is the per-address detail.
                log.debug("broker %s unavailable for %s: %s", self.addresses[index], name, exc.details())
                last = exc
                continue
            if index != self._current:
                log.info("broker calls now go to %s", self.addresses[index])
                self._current = index
            return response
        metrics.broker_unreachable.add(1, {"method": name})
        raise BrokerUnavailable(f"{name}: no broker answered ({', '.join(self.addresses)})") from last
