"""The health replica's metrics (names from docs/contracts.md; the Prometheus exporter adds `_total`)."""

from __future__ import annotations

from opentelemetry import metrics

_meter = metrics.get_meter("rdbroker_health")

probe_results = _meter.create_counter(
    "rdbroker_probe_results", description="Probes run, by server, probe (rdp/agent) and outcome (ok/fail)"
)
server_up = _meter.create_gauge(
    "rdbroker_server_up", description="1 while a server held by this replica is up (after rise/fall), else 0"
)
broker_unreachable = _meter.create_counter(
    "rdbroker_broker_unreachable", description="Broker calls for which no broker address answered"
)
report_drops = _meter.create_counter(
    "rdbroker_report_drops", description="Probe results never delivered (refused, or replaced before a retry)"
)
