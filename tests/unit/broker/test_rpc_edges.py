"""Error-to-status table and proto conversions, without a server."""

from __future__ import annotations

from datetime import UTC, datetime

import grpc
import pytest

from rdbroker_broker import domain as d
from rdbroker_broker import errors
from rdbroker_broker.rpc import convert
from rdbroker_broker.rpc.status import status_for
from rdbroker_proto.v1 import broker_pb2 as pb


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.NotFound("x"), grpc.StatusCode.NOT_FOUND),
        (errors.PermissionDenied("x"), grpc.StatusCode.PERMISSION_DENIED),
        (errors.NoCapacity("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.InvalidInput("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.Unavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (errors.Conflict("x"), grpc.StatusCode.ABORTED),
        (errors.BrokerError("x"), grpc.StatusCode.INTERNAL),
    ],
)
def test_status_table(error, code):
    assert status_for(error) == code


def test_agent_load_101_means_down():
    result = convert.probe_result(pb.ProbeResult(address="a", health=pb.HEALTH_STATE_UP, load=101))
    assert (result.agent_state, result.load, result.health) == (d.AgentState.DOWN, 100, d.Health.UP)
    assert result.probed_at is None


def test_unspecified_health_is_unknown_and_times_are_utc():
    when = datetime(2026, 1, 1, 12, tzinfo=UTC)
    msg = pb.ProbeResult(
        address="a", load=-7, agent_state=pb.AGENT_STATE_DRAIN, probed_at=convert.timestamp(when)
    )
    result = convert.probe_result(msg)
    assert (result.health, result.load, result.agent_state) == (d.Health.UNKNOWN, -1, d.AgentState.DRAIN)
    assert result.probed_at == when


def test_session_disconnected_at_only_when_disconnected():
    now = datetime(2026, 1, 1, tzinfo=UTC)
    active = d.Session("s", "u", "p", "a:1", d.SessionState.ACTIVE, now, now, disconnected_at=now)
    assert not convert.session(active).HasField("disconnected_at")
    assert not convert.session(active).HasField("expires_at")
