"""The broker's client of the agents' session actions: where an action goes, and what each answer means."""

from __future__ import annotations

import pytest

from rdbroker_broker.agents import MAX_REASON, _answer, action_url
from rdbroker_broker.errors import AgentFailed, Conflict

WHERE = "the agent at http://a:8088/sessions/logoff"


@pytest.mark.parametrize(
    ("sessions_url", "url"),
    [
        ("http://10.0.0.11:8088/sessions", "http://10.0.0.11:8088/sessions/logoff"),
        ("https://ts1.corp.example:8443/sessions/", "https://ts1.corp.example:8443/sessions/logoff"),
        ("http://10.0.0.11:8088/agent/sessions?x=1", "http://10.0.0.11:8088/agent/sessions/logoff"),
    ],
)
def test_an_action_goes_beside_the_session_list(sessions_url: str, url: str) -> None:
    assert action_url(sessions_url, "logoff", "10.0.0.11:3389") == url


def test_no_usable_session_list_is_a_conflict_saying_what_to_set() -> None:
    with pytest.raises(Conflict, match=r"has no sessions_url, so no agent to act through: set it"):
        action_url("", "logoff", "10.0.0.11:3389")
    with pytest.raises(Conflict, match=r"is not an rdbroker-agent's /sessions"):
        action_url("http://10.0.0.11:9000/users", "logoff", "10.0.0.11:3389")


def test_a_done_answer() -> None:
    body = b'{"action": "logoff", "user": "alice", "sessions": ["2", 3], "detail": "logged off session 2, 3"}'
    answer = _answer(200, body, WHERE)
    assert (answer.user, answer.sessions, answer.detail) == ("alice", ("2", "3"), "logged off session 2, 3")


@pytest.mark.parametrize(
    ("status", "body", "says"),
    [
        (401, b"wrong bearer token", f"{WHERE} refused our credentials (401): set RDBROKER_AGENT_TOKEN"),
        (
            404,
            b"not found: try /load, /sessions or /healthz\n",
            f"{WHERE} has no such action (404): is it an rdbroker-agent",
        ),
        (501, b"cannot logoff here: no way\n", f"{WHERE} answered 501: cannot logoff here: no way"),
        (503, b"", f"{WHERE} answered 503: (no reason given)"),
        (500, b"line\x1b[31m\nnext", f"{WHERE} answered 500: line [31m next"),
        (200, b"OK", f"{WHERE} answered 200 without its JSON result (JSONDecodeError)"),
        (200, b'{"user": "alice"}', f"{WHERE} answered 200 without its JSON result (KeyError)"),
    ],
)
def test_anything_else_is_the_agent_failing_with_its_reason(status: int, body: bytes, says: str) -> None:
    with pytest.raises(AgentFailed) as failed:
        _answer(status, body, WHERE)
    assert str(failed.value).startswith(says)


def test_a_long_reason_is_cut() -> None:
    with pytest.raises(AgentFailed) as failed:
        _answer(503, b"x" * 5000, WHERE)
    assert str(failed.value) == f"{WHERE} answered 503: " + "x" * MAX_REASON
