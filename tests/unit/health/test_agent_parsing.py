"""Agent bodies (Kemp numbers, HAProxy words) and session lists: every accepted form and the bad ones."""

from __future__ import annotations

import pytest

from rdbroker_health.probes.http import AgentState, parse_agent_reply, parse_sessions


@pytest.mark.parametrize(
    ("body", "load", "state"),
    [
        ("0", 0, AgentState.UP),
        ("42", 42, AgentState.UP),
        ("100", 100, AgentState.UP),
        ("42\n", 42, AgentState.UP),
        ("  7 \r\n", 7, AgentState.UP),
        ("101", None, AgentState.DOWN),
        ("102", None, AgentState.DRAIN),  # Kemp: the operator disabled the server; reconnects only
        ("102\r\n", None, AgentState.DRAIN),
        ("102 maint", None, AgentState.MAINT),  # the strongest word still wins
        ("75%", 25, AgentState.UP),
        ("100%", 0, AgentState.UP),
        ("0%", 100, AgentState.UP),
        ("150%", 0, AgentState.UP),
        ("drain", None, AgentState.DRAIN),
        ("maint", None, AgentState.MAINT),
        ("up", None, AgentState.UP),
        ("ready", None, AgentState.UP),
        ("down", None, AgentState.DOWN),
        ("stopped", None, AgentState.DOWN),
        ("fail", None, AgentState.DOWN),
        ("DRAIN", None, AgentState.DRAIN),
        ("75%,drain", 25, AgentState.DRAIN),
        ("up 60%", 40, AgentState.UP),
        ("ready,up,80%", 20, AgentState.UP),
        ("drain, maint", None, AgentState.MAINT),
        ("up down", None, AgentState.DOWN),
        ("down #disk full", None, AgentState.DOWN),
        ("fail#no service", None, AgentState.DOWN),
        ("50 drain", 50, AgentState.DRAIN),
    ],
)
def test_accepted_agent_forms(body: str, load: int | None, state: AgentState) -> None:
    result = parse_agent_reply(body)
    assert result.ok, result.detail
    assert result.load == load
    assert result.state is state


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("", "empty"),
        ("   \n", "empty"),
        ("#only a comment", "empty"),
        ("103", "out of range"),
        ("102 50", "more than one load"),
        ("999", "out of range"),
        ("-1", "unknown agent word"),
        ("4.5", "unknown agent word"),
        ("abc", "unknown agent word"),
        ("<html>busy</html>", "unknown agent word"),
        ("weight:10", "unknown agent word"),
        ("maxconn:30", "unknown agent word"),
        ("50 60", "more than one load"),
        ("50 60%", "more than one load"),
        ("1000", "unknown agent word"),
    ],
)
def test_bad_agent_bodies_fail_with_a_reason(body: str, reason: str) -> None:
    result = parse_agent_reply(body)
    assert not result.ok
    assert reason in result.detail
    assert result.load is None


def test_detail_names_load_and_state() -> None:
    assert parse_agent_reply("75%,drain").detail == "load=25 state=drain"
    assert parse_agent_reply("101").detail == "state=down"


def test_long_garbage_is_shortened_in_the_detail() -> None:
    result = parse_agent_reply("x" * 500)
    assert not result.ok
    assert len(result.detail) < 80


def test_sessions_list() -> None:
    result = parse_sessions(
        b'[{"user": "CORP\\\\alice", "state": "active"}, {"user": "bob", "state": "Disconnected"}]'
    )
    assert result.ok, result.detail
    assert [(s.user, s.disconnected) for s in result.sessions] == [("CORP\\alice", False), ("bob", True)]


def test_sessions_wrapped_and_empty() -> None:
    assert parse_sessions(b'{"sessions": []}').sessions == []
    assert parse_sessions(b"[]").ok


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b'{"user": "a"}', "not a JSON list"),
        (b'["alice"]', "not an object"),
        (b'[{"state": "active"}]', "no valid user"),
        (b'[{"user": "", "state": "active"}]', "no valid user"),
        (b'[{"user": "a", "state": "listen"}]', "unknown state"),
        (b'[{"user": "a"}]', "unknown state"),
        (b'[{"user": "a", "state": "active"}, {"user": 5, "state": "active"}]', "no valid user"),
    ],
)
def test_bad_session_lists_are_refused_whole(body: bytes, reason: str) -> None:
    result = parse_sessions(body)
    assert not result.ok
    assert reason in result.detail
    assert result.sessions == []
