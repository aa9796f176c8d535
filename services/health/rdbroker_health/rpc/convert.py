"""Conversions between the probes' dataclasses and the `rdbroker.v1` wire messages (only here)."""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from rdbroker_health.hysteresis import Health
from rdbroker_health.probes import rdp
from rdbroker_health.probes.http import AgentResult, AgentState, ServerSession
from rdbroker_proto.v1 import broker_pb2, health_pb2

_HEALTH_TO_WIRE = {
    Health.UNKNOWN: broker_pb2.HEALTH_STATE_UNKNOWN,
    Health.UP: broker_pb2.HEALTH_STATE_UP,
    Health.DOWN: broker_pb2.HEALTH_STATE_DOWN,
}
_AGENT_TO_WIRE = {
    AgentState.NONE: broker_pb2.AGENT_STATE_UNSPECIFIED,
    AgentState.UP: broker_pb2.AGENT_STATE_UP,
    AgentState.DRAIN: broker_pb2.AGENT_STATE_DRAIN,
    AgentState.MAINT: broker_pb2.AGENT_STATE_MAINT,
    AgentState.DOWN: broker_pb2.AGENT_STATE_DOWN,
}


def health_from_wire(value: broker_pb2.HealthState.ValueType) -> Health:
    """The broker's state for a server; UNSPECIFIED (an old or empty field) counts as UNKNOWN."""
    if value == broker_pb2.HEALTH_STATE_UP:
        return Health.UP
    if value == broker_pb2.HEALTH_STATE_DOWN:
        return Health.DOWN
    return Health.UNKNOWN


def probe_result(
    address: str,
    health: Health,
    rdp_result: rdp.ProbeResult,
    agent: AgentResult | None,
    probed_at: datetime,
) -> broker_pb2.ProbeResult:
    stamp = Timestamp()
    stamp.FromDatetime(probed_at)
    return broker_pb2.ProbeResult(
        address=address,
        health=_HEALTH_TO_WIRE[health],
        rdp_ok=rdp_result.ok,
        rdp_detail=rdp_result.detail,
        load=agent.load if agent is not None and agent.ok and agent.load is not None else -1,
        agent_state=_AGENT_TO_WIRE[agent.state]
        if agent is not None and agent.ok
        else broker_pb2.AGENT_STATE_UNSPECIFIED,
        agent_detail=agent.detail if agent is not None else "",
        probed_at=stamp,
    )


def reported_sessions(sessions: list[ServerSession]) -> list[broker_pb2.ReportedSession]:
    return [
        broker_pb2.ReportedSession(
            user=s.user,
            state=broker_pb2.SESSION_STATE_DISCONNECTED
            if s.disconnected
            else broker_pb2.SESSION_STATE_ACTIVE,
        )
        for s in sessions
    ]


def probe_server_response(
    rdp_result: rdp.ProbeResult, agent: AgentResult | None
) -> health_pb2.ProbeServerResponse:
    return health_pb2.ProbeServerResponse(
        rdp_ok=rdp_result.ok,
        rdp_detail=rdp_result.kind if rdp_result.ok else rdp_result.reason,
        selected_protocol=rdp_result.selected_protocol,
        failure_code=rdp_result.failure_code,
        load=agent.load if agent is not None and agent.ok and agent.load is not None else -1,
        agent_detail=agent.detail if agent is not None else "",
        rdp_latency_ms=rdp_result.latency_ms,
    )
