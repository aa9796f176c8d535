"""Session lists that cannot show disconnected sessions say so, and the replica passes it on."""

from __future__ import annotations

import httpx
import pytest

from rdbroker_health.probes.http import parse_sessions
from tests.unit.health.fake_broker import serving
from tests.unit.health.support import ProbeLog, fast_settings, replica, wait_until
from tests.unit.health.test_scheduler import broker_with


def test_the_agents_object_form_says_whether_disconnected_sessions_are_shown() -> None:
    omitted = parse_sessions(b'{"omits_disconnected": true, "sessions": [{"user": "a", "state": "active"}]}')
    assert omitted.ok
    assert omitted.omits_disconnected
    assert [s.user for s in omitted.sessions] == ["a"]
    assert "not shown" in omitted.detail
    complete = parse_sessions(b'{"omits_disconnected": false, "sessions": []}')
    assert complete.ok
    assert not complete.omits_disconnected


@pytest.mark.parametrize("body", [b"[]", b'{"sessions": []}'])
def test_other_agents_lists_are_complete(body: bytes) -> None:
    result = parse_sessions(body)
    assert result.ok
    assert not result.omits_disconnected


@pytest.mark.parametrize("flag", [b'"yes"', b"1", b"null"])
def test_a_flag_that_is_not_a_boolean_is_refused(flag: bytes) -> None:
    result = parse_sessions(b'{"omits_disconnected": ' + flag + b', "sessions": []}')
    assert not result.ok
    assert "omits_disconnected" in result.detail


@pytest.mark.parametrize("omits", [True, False])
async def test_the_replica_passes_the_flag_to_the_broker(omits: bool) -> None:
    broker = broker_with(1, sessions_url="http://agent.test/sessions")
    flag = b"true" if omits else b"false"
    body = b'{"omits_disconnected": ' + flag + b', "sessions": [{"user": "alice", "state": "active"}]}'
    http = httpx.AsyncClient(transport=httpx.MockTransport(lambda request: httpx.Response(200, content=body)))
    probes = ProbeLog()
    async with serving(broker) as address:
        settings = fast_settings(address, sessions_interval_s=0.5)
        async with replica(settings, "r1", probes.probe_for("r1"), http):
            await wait_until(lambda: len(broker.session_reports) >= 1)
    assert broker.session_reports[0].omits_disconnected is omits
    assert [s.user for s in broker.session_reports[0].sessions] == ["alice"]
