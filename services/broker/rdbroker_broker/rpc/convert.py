"""Domain objects <-> rdbroker.v1 messages. Only the rpc edge imports the generated code."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from rdbroker_broker import domain as d
from rdbroker_broker.errors import InvalidInput
from rdbroker_proto.v1 import broker_pb2 as pb

REASON = {
    d.RouteReason.TOKEN: pb.ROUTE_REASON_TOKEN,
    d.RouteReason.RECONNECT: pb.ROUTE_REASON_RECONNECT,
    d.RouteReason.NEW: pb.ROUTE_REASON_NEW,
    d.RouteReason.NO_IDENTITY: pb.ROUTE_REASON_NO_IDENTITY,
}
SESSION_STATE = {
    d.SessionState.PENDING: pb.SESSION_STATE_PENDING,
    d.SessionState.ACTIVE: pb.SESSION_STATE_ACTIVE,
    d.SessionState.DISCONNECTED: pb.SESSION_STATE_DISCONNECTED,
    d.SessionState.ENDED: pb.SESSION_STATE_ENDED,
}
SESSION_STATE_IN = {v: k for k, v in SESSION_STATE.items()}
ADMIN = {
    d.AdminState.ENABLED: pb.ADMIN_STATE_ENABLED,
    d.AdminState.DRAINING: pb.ADMIN_STATE_DRAINING,
    d.AdminState.MAINTENANCE: pb.ADMIN_STATE_MAINTENANCE,
}
ADMIN_IN = {v: k for k, v in ADMIN.items()}
HEALTH = {
    d.Health.UNKNOWN: pb.HEALTH_STATE_UNKNOWN,
    d.Health.UP: pb.HEALTH_STATE_UP,
    d.Health.DOWN: pb.HEALTH_STATE_DOWN,
}
HEALTH_IN = {v: k for k, v in HEALTH.items()}
POWER = {
    d.PowerState.ON: pb.POWER_STATE_ON,
    d.PowerState.STARTING: pb.POWER_STATE_STARTING,
    d.PowerState.STOPPING: pb.POWER_STATE_STOPPING,
    d.PowerState.OFF: pb.POWER_STATE_OFF,
}
AGENT_IN = {
    pb.AGENT_STATE_UNSPECIFIED: d.AgentState.NONE,
    pb.AGENT_STATE_UP: d.AgentState.UP,
    pb.AGENT_STATE_DRAIN: d.AgentState.DRAIN,
    pb.AGENT_STATE_MAINT: d.AgentState.MAINT,
    pb.AGENT_STATE_DOWN: d.AgentState.DOWN,
}


def timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def route_request(msg: pb.RouteRequest) -> d.RouteRequest:
    return d.RouteRequest(
        connection_id=msg.connection_id,
        proxy_id=msg.proxy_id,
        pool=msg.pool,
        cookie=msg.cookie,
        routing_token=msg.routing_token,
        preconnection_blob=msg.preconnection_blob,
        client_address=msg.client_address,
        preconnection_id=msg.preconnection_id,
        attempt=msg.attempt,
        failed_server_address=msg.failed_server_address,
    )


def route_response(decision: d.RouteDecision) -> pb.RouteResponse:
    return pb.RouteResponse(
        server_address=decision.server_address,
        session_id=decision.session_id,
        reason=REASON[decision.reason],
        user=decision.user,
        pool=decision.pool,
    )


def session(s: d.Session) -> pb.Session:
    return pb.Session(
        session_id=s.session_id,
        user=s.user,
        pool=s.pool,
        server_address=s.server_address,
        state=SESSION_STATE[s.state],
        created_at=timestamp(s.created_at),
        updated_at=timestamp(s.updated_at),
        disconnected_at=timestamp(s.disconnected_at) if s.state is d.SessionState.DISCONNECTED else None,
        expires_at=timestamp(s.expires_at),
        confirmed=s.confirmed,
    )


def server(found: d.Server, now: datetime) -> pb.Server:
    """The server as routing sees it at `now`: a stale result reads as no result (HEALTH_STATE_UNKNOWN,
    load -1), `stale` says so and `probed_at` says when that result was."""
    s = d.as_seen_at(found, now)
    return pb.Server(
        address=s.address,
        pool=s.pool,
        weight=s.weight,
        max_sessions=s.max_sessions,
        admin_state=ADMIN[s.admin_state],
        health=HEALTH[s.health],
        load=s.load,
        live_sessions=s.live_sessions,
        agent_url=s.agent_url,
        sessions_url=s.sessions_url,
        health_detail=s.health_detail,
        agent_detail=s.agent_detail,
        health_changed_at=timestamp(s.health_changed_at),
        held_sessions=s.held_sessions,
        probed_at=timestamp(s.probed_at),
        stale=d.result_is_stale(found, now),
        power=POWER[s.power],
    )


def probe_result(msg: pb.ProbeResult) -> d.ProbeResult:
    agent_state = AGENT_IN.get(msg.agent_state, d.AgentState.NONE)
    load = msg.load
    if load > 100:  # 101 is the agent's "down"
        agent_state, load = d.AgentState.DOWN, 100
    return d.ProbeResult(
        address=msg.address,
        health=HEALTH_IN.get(msg.health, d.Health.UNKNOWN),
        rdp_ok=msg.rdp_ok,
        rdp_detail=msg.rdp_detail,
        load=max(load, -1),
        agent_state=agent_state,
        agent_detail=msg.agent_detail,
        probed_at=msg.probed_at.ToDatetime(tzinfo=UTC) if msg.HasField("probed_at") else None,
    )


def listed_at(request: pb.ReportServerSessionsRequest) -> datetime | None:
    """When the session list was taken; None when unset (the broker then uses its receipt time)."""
    if not request.HasField("listed_at"):
        return None
    try:
        return request.listed_at.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError) as exc:
        raise InvalidInput(f"listed_at is not a valid time: {exc}") from exc


def reconcile_counts(counts: d.ReconcileCounts) -> pb.ReportServerSessionsResponse:
    return pb.ReportServerSessionsResponse(
        ended=counts.ended, recorded=counts.recorded, linked=counts.linked, ambiguous=counts.ambiguous
    )
