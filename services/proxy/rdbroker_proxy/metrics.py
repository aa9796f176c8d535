"""The proxy's metrics (names from docs/contracts.md; the Prometheus exporter adds `_total` to counters).

Nothing here runs per byte: active connections and bytes proxied are read when metrics are collected,
from the live connections' own counters plus the totals of the connections that have ended. Those
callbacks run on the exporter's thread; they only copy the set of connections (one step under the
GIL) and read integers. They see a proxy through the protocols below, so this module imports nothing of
the proxy's (every other module may count here).
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterable
from typing import Protocol

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation


class SpliceCounts(Protocol):
    @property
    def from_client(self) -> int: ...
    @property
    def from_server(self) -> int: ...


class ConnectionCounts(Protocol):
    @property
    def splice(self) -> SpliceCounts | None: ...


class ProxyCounts(Protocol):
    """What the callbacks read of one proxy (`connection.ProxyContext`)."""

    @property
    def connections(self) -> Collection[ConnectionCounts]: ...
    @property
    def ended_from_client(self) -> int: ...
    @property
    def ended_from_server(self) -> int: ...
    @property
    def refused_over_client_limit(self) -> int: ...
    @property
    def routing_waiting(self) -> int: ...


_meter = metrics.get_meter("rdbroker_proxy")
_contexts: list[ProxyCounts] = []

broker_unreachable = _meter.create_counter(
    "rdbroker_broker_unreachable", description="Broker calls for which no broker address answered"
)
report_drops = _meter.create_counter(
    "rdbroker_report_drops",
    description="Connection reports lost: the buffer overflowed, or a broker refused one",
)
UNREACHABLE_ROUTE = {"method": "Route"}
UNREACHABLE_HEARTBEAT = {"method": "ProxyHeartbeat"}
DROP_BUFFER_FULL = {"reason": "buffer_full"}
DROP_REJECTED = {"reason": "rejected"}
FROM_CLIENT = {"direction": "from_client"}
FROM_SERVER = {"direction": "from_server"}


def publish(context: ProxyCounts) -> None:
    _contexts.append(context)


def withdraw(context: ProxyCounts) -> None:
    with contextlib.suppress(ValueError):
        _contexts.remove(context)


def _active(_options: CallbackOptions) -> Iterable[Observation]:
    return [Observation(sum(len(ctx.connections) for ctx in list(_contexts)))]


def _bytes(_options: CallbackOptions) -> Iterable[Observation]:
    from_client = from_server = 0
    for ctx in list(_contexts):
        from_client += ctx.ended_from_client
        from_server += ctx.ended_from_server
        for connection in list(ctx.connections):
            splice = connection.splice
            if splice is not None:
                from_client += splice.from_client
                from_server += splice.from_server
    return [Observation(from_client, FROM_CLIENT), Observation(from_server, FROM_SERVER)]


def _over_client_limit(_options: CallbackOptions) -> Iterable[Observation]:
    return [Observation(sum(ctx.refused_over_client_limit for ctx in list(_contexts)))]


_meter.create_observable_counter(
    "rdbroker_proxy_over_client_limit",
    callbacks=[_over_client_limit],
    description="Connections closed at accept: their client address was at max_routing_per_client",
)


def _routing_waiting(_options: CallbackOptions) -> Iterable[Observation]:
    return [Observation(sum(ctx.routing_waiting for ctx in list(_contexts)))]


_meter.create_observable_gauge(
    "rdbroker_proxy_routing_waiting",
    callbacks=[_routing_waiting],
    description="Connections waiting their turn to be routed (max_routing are routed at once)",
)
_meter.create_observable_gauge(
    "rdbroker_proxy_active_connections",
    callbacks=[_active],
    description="Client connections open on this proxy",
)
_meter.create_observable_counter(
    "rdbroker_proxy_bytes",
    callbacks=[_bytes],
    description="Bytes proxied, by direction (from_client/from_server)",
)
