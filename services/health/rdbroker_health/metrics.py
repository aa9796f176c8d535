"""The health replica's metrics (names from docs/contracts.md; the Prometheus exporter adds `_total`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

_meter = metrics.get_meter("rdbroker_health")

probe_results = _meter.create_counter(
    "rdbroker_probe_results",
    description="Probes run, by server, probe (rdp/agent) and outcome (ok/fail; refused: the agent "
    "answered 401/403 to our token)",
)
broker_unreachable = _meter.create_counter(
    "rdbroker_broker_unreachable", description="Broker calls for which no broker address answered"
)
report_drops = _meter.create_counter(
    "rdbroker_report_drops", description="Probe results never delivered (refused, or replaced before a retry)"
)

# A held server's state now: True up, False down, absent while unknown (never probed, no state handed over).
ServerStates = Callable[[], Mapping[str, bool]]
_server_states: list[ServerStates] = []


def _observe_server_up(options: CallbackOptions) -> Iterable[Observation]:
    # Read at collection time from the servers held right now, so a server whose lease this replica
    # lost leaves the scrape instead of showing its last value forever.
    return [
        Observation(1 if up else 0, {"server": address})
        for source in list(_server_states)
        for address, up in source().items()
    ]


_meter.create_observable_gauge(
    "rdbroker_server_up",
    callbacks=[_observe_server_up],
    description="Per server this replica holds: 1 up, 0 down (after rise/fall); absent while unknown",
)


def publish_server_states(source: ServerStates) -> None:
    _server_states.append(source)


def withdraw_server_states(source: ServerStates) -> None:
    with contextlib.suppress(ValueError):
        _server_states.remove(source)
