"""`rdbroker sessions logoff|disconnect|message` against the real broker (uvicorn on 127.0.0.1, PostgreSQL)
and an agent on 127.0.0.1 (the real agent's HTTP server over fake Windows commands, in a thread)."""

from __future__ import annotations

import asyncio
import json

import pytest

from rdbroker_broker import callers
from rdbroker_broker.db.engine import make_engine
from rdbroker_broker.service import BrokerService
from rdbroker_broker.store import Store
from rdbroker_cli.__main__ import main as rdbroker
from tests.integration.rest.conftest import ADMIN, SERVERS, LiveBroker, place, settings_for
from tests.support.agent_thread import QUSER_ALICE, windows_agent
from tests.unit.agent.fakes import FakeSources

A, B, _ = SERVERS


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = rdbroker([*argv, "--token", ADMIN])
    out, err = capsys.readouterr()
    return code, out, err


async def alice_on_a(url: str) -> str:
    engine = make_engine(url)
    try:
        with callers.use_caller(callers.Caller("test-setup")):
            decision = await place(BrokerService(Store(engine), settings_for(url)), "alice", "c1")
    finally:
        await engine.dispose()
    assert decision.server_address == A
    return decision.session_id


def test_operator_acts_on_a_session(live_broker: LiveBroker, pg_database_url: str, capsys, monkeypatch):
    monkeypatch.setenv("RDBROKER_URL", live_broker.url)
    sources = FakeSources(
        outputs={("quser",): QUSER_ALICE, ("msg", "5", "Saving now"): "", ("logoff", "5"): ""}
    )
    with windows_agent(sources) as agent:
        sessions_url = f"http://127.0.0.1:{agent.port}/sessions"
        assert run(capsys, "servers", "maintenance", B)[0] == 0
        session_id = asyncio.run(alice_on_a(pg_database_url))

        code, _, err = run(capsys, "sessions", "disconnect", session_id)
        assert (code, err) == (
            1,
            f"rdbroker: 409 Conflict: server {A} has no sessions_url, so no agent to act through: set it to "
            f"its rdbroker-agent's session list (e.g. `rdbroker servers set {A} --sessions-url "
            "http://<server>:8088/sessions` or sessions_url in the farm file)\n",
        )
        assert run(capsys, "servers", "set", A, "--sessions-url", sessions_url)[0] == 0

        code, out, err = run(capsys, "sessions", "message", session_id, "--text", "Saving now")
        assert (code, err) == (0, "")
        assert out.splitlines()[0] == f"sent a message to session 5 on {A} (as alice)"
        code, _, err = run(capsys, "sessions", "message", session_id)
        assert code == 2
        assert "--text" in err

        code, out, err = run(capsys, "sessions", "logoff", session_id, "--json")
        assert (code, err) == (0, "")
        done = json.loads(out)
        assert (done["detail"], done["session"]["state"]) == ("logged off session 5", "ended")

        code, _, err = run(capsys, "sessions", "logoff", session_id)
        assert (code, err) == (
            1,
            f"rdbroker: 409 Conflict: session {session_id} is ended (logged_off): "
            "there is nothing to logoff\n",
        )
    assert sources.runs == [("quser",), ("msg", "5", "Saving now"), ("quser",), ("logoff", "5")]
    code, _, err = run(capsys, "sessions", "logoff", "no-such-session")
    assert (code, err) == (1, "rdbroker: 404 Not found: unknown session 'no-such-session'\n")
