"""`rdbroker servers drain ADDR --notify ... --logoff-disconnected-after ... --then ...` against the real
broker (`rdbroker broker` on 127.0.0.1, PostgreSQL, passes every 0.2 s) and an agent on 127.0.0.1 (the
real agent's HTTP server over fake Windows commands, in a thread): the progress lines until the server
is empty, `--no-wait`, `--watch`, `--cancel`, and what bad input gets."""

from __future__ import annotations

import asyncio

import pytest

from rdbroker_broker import callers
from rdbroker_broker.db.engine import make_engine
from rdbroker_broker.service import BrokerService
from rdbroker_broker.store import Store
from rdbroker_cli import drain
from rdbroker_cli.__main__ import main as rdbroker
from tests.integration.rest.conftest import ADMIN, SERVERS, LiveBroker, place, settings_for
from tests.support.agent_thread import QUSER_ALICE, windows_agent
from tests.unit.agent.fakes import FakeSources

A, B, _ = SERVERS


@pytest.fixture
def fast_drains(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RDBROKER_DRAIN_INTERVAL_S", "0.2")
    monkeypatch.setattr(drain, "POLL_S", 0.1)


@pytest.fixture
def broker(fast_drains: None, live_broker: LiveBroker) -> LiveBroker:
    return live_broker


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = rdbroker([*argv, "--token", ADMIN])
    out, err = capsys.readouterr()
    return code, out, err


async def alice_disconnected_on_a(url: str) -> str:
    engine = make_engine(url)
    try:
        service = BrokerService(Store(engine), settings_for(url))
        with callers.use_caller(callers.Caller("test-setup")):
            decision = await place(service, "alice", "c1")
            await service.connection_opened(decision.session_id, "c1", "p1")
            await service.connection_closed(decision.session_id, "c1", bytes_from_server=100_000)
    finally:
        await engine.dispose()
    assert decision.server_address == A
    return decision.session_id


def test_drain_until_empty_from_the_command_line(
    broker: LiveBroker, pg_database_url: str, capsys, monkeypatch
):
    monkeypatch.setenv("RDBROKER_URL", broker.url)
    sources = FakeSources(outputs={("quser",): QUSER_ALICE, ("logoff", "5"): ""})
    with windows_agent(sources) as agent:
        assert (
            run(capsys, "servers", "set", A, "--sessions-url", f"http://127.0.0.1:{agent.port}/sessions")[0]
            == 0
        )
        assert run(capsys, "servers", "maintenance", B)[0] == 0
        asyncio.run(alice_disconnected_on_a(pg_database_url))

        code, out, err = run(
            capsys,
            "servers",
            "drain",
            A,
            "--notify",
            "Restart at noon",
            "--logoff-disconnected-after",
            "0",
            "--then",
            "maintenance",
        )
        assert (code, err) == (0, "")
        lines = out.splitlines()
        assert lines[0] == (
            f"draining {A}: starting, 1 session on the server; messaged 0, logged off 0, errors 0"
        )
        assert (
            lines[-1]
            == f"drained {A}: no sessions left: {A} is now maintenance (messaged 0, logged off 1, errors 0)"
        )
        assert sources.runs == [("quser",), ("logoff", "5")]
        code, out, _ = run(capsys, "servers", "list")
        assert f"{A}  maintenance" in out

    # --no-wait returns at once with the server and the drain's first line; --watch follows it.
    code, out, err = run(capsys, "servers", "drain", B, "--then", "draining", "--no-wait")
    assert (code, err) == (0, "")
    assert "draining (until empty: 0 left)" in out.splitlines()[1]
    assert out.splitlines()[-1].startswith(f"draining {B}: starting, 0 sessions on the server")
    code, out, _ = run(capsys, "servers", "drain", B, "--watch")
    assert (code, out.splitlines()[-1]) == (
        0,
        f"drained {B}: no sessions left: {B} is now draining (messaged 0, logged off 0, errors 0)",
    )
    code, _, err = run(capsys, "servers", "drain", B, "--cancel")
    assert (code, err) == (1, f"rdbroker: 409 Conflict: no drain of {B} is under way\n")


BAD = [
    (["--logoff-disconnected-after", "5x"], 2, "argument --logoff-disconnected-after: not a duration: '5x'"),
    (["--then", "off"], 2, "argument --then: invalid choice: 'off'"),
    (["--notify", ""], 1, "rdbroker: 422 Invalid request: body.notify: String should have at least 1"),
    (["--notify", " "], 1, "rdbroker: 400 Invalid input: text must be one line of 1..500 printable"),
]


def test_bad_drain_command_lines(broker: LiveBroker, capsys, monkeypatch):
    monkeypatch.setenv("RDBROKER_URL", broker.url)
    for argv, exit_code, says in BAD:
        code, out, err = run(capsys, "servers", "drain", A, *argv)
        assert (code, out) == (exit_code, ""), argv
        assert says in err, err
    code, _, err = run(capsys, "servers", "drain", "10.9.9.9:3389", "--notify", "hi")
    assert (code, err) == (1, "rdbroker: 404 Not found: no server is registered at 10.9.9.9:3389\n")
    code, out, _ = run(capsys, "servers", "list")
    assert f"{A}  enabled" in out
