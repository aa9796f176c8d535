"""Command sources and their output parsers, with real subprocesses; psutil's session list."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from types import SimpleNamespace

import psutil
import pytest

from rdbroker_agent.errors import SourceError
from rdbroker_agent.sources import (
    Session,
    SystemSources,
    parse_number,
    parse_sessions,
    run_command,
    xrdp_desktops,
)

PY = sys.executable


async def test_run_command_returns_stdout() -> None:
    assert await run_command([PY, "-c", "print(42)"], 10) == "42\n"


async def test_run_command_nonzero_exit() -> None:
    with pytest.raises(SourceError, match="exited with 3: oops"):
        await run_command([PY, "-c", "import sys; sys.stderr.write('oops'); sys.exit(3)"], 10)


async def test_run_command_timeout_kills_it() -> None:
    with pytest.raises(SourceError, match=r"did not finish within 0\.5 s"):
        await run_command([PY, "-c", "import time; time.sleep(30)"], 0.5)


async def test_run_command_missing_program() -> None:
    with pytest.raises(SourceError, match="cannot run '/nonexistent/prog'"):
        await run_command(["/nonexistent/prog"], 10)


@pytest.mark.parametrize(("text", "value"), [("42", 42.0), (" 42.5\n", 42.5), ("75%", 75.0), ("-3", -3.0)])
def test_parse_number(text: str, value: float) -> None:
    assert parse_number(text, "gpu") == value


@pytest.mark.parametrize("text", ["", "abc", "42 43", "inf", "nan", "0x10"])
def test_parse_number_refuses(text: str) -> None:
    with pytest.raises(SourceError, match="gpu printed"):
        parse_number(text, "gpu")


def test_parse_sessions_list_and_wrapped() -> None:
    text = '[{"user": "CORP\\\\alice", "state": "active"}, {"user": "bob", "state": "Disconnected"}]'
    expected = [Session("CORP\\alice", "active"), Session("bob", "disconnected")]
    assert parse_sessions(text) == expected
    assert parse_sessions('{"sessions": ' + text + "}") == expected


def test_parse_sessions_query_session_states() -> None:
    text = (
        '[{"user": "", "state": "Listen"}, {"user": "carol", "state": "Disc", "id": 3},'
        ' {"user": "dave", "state": "Active"}, {"user": "services", "state": "Down"}]'
    )
    assert parse_sessions(text) == [Session("carol", "disconnected"), Session("dave", "active")]


def test_parse_sessions_state_defaults_to_active() -> None:
    assert parse_sessions('[{"user": "erin"}]') == [Session("erin", "active")]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "did not print JSON"),
        ('{"user": "a"}', "must print a JSON list"),
        ("[1]", "has no string 'user'"),
        ('[{"user": 5}]', "has no string 'user'"),
        ('[{"user": "a", "state": 1}]', "non-string state"),
    ],
)
def test_parse_sessions_refuses(text: str, message: str) -> None:
    with pytest.raises(SourceError, match=message):
        parse_sessions(text)


async def test_system_sources_read_the_machine() -> None:
    sources = SystemSources()
    assert 0.0 <= await sources.cpu_percent() <= 100.0
    assert 0.0 < await sources.memory_percent() <= 100.0
    sessions = await sources.logged_in_sessions()
    assert all(s.state == "active" for s in sessions)
    assert len({s.user for s in sessions}) == len(sessions)


async def test_psutil_errors_become_source_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    sources = SystemSources()

    def denied(*args: object, **kwargs: object) -> float:
        raise psutil.AccessDenied()

    monkeypatch.setattr(psutil, "cpu_percent", denied)
    monkeypatch.setattr(psutil, "users", denied)
    with pytest.raises(SourceError, match="psutil could not read cpu"):
        await sources.cpu_percent()
    with pytest.raises(SourceError, match="psutil could not read users"):
        await sources.logged_in_sessions()


# xrdp desktops: X servers whose parent is xrdp-sesman, read through psutil's Process API ---------------


@dataclass
class FakeProcess:
    """The part of psutil.Process that xrdp_desktops reads (`info` as process_iter fills it)."""

    comm: str
    username: str
    parent_name: str | None = "xrdp-sesman"
    connections: list[tuple[int, str]] = field(default_factory=list)  # (local port, status)
    gone: bool = False

    @property
    def info(self) -> dict[str, object]:
        return {"name": self.comm, "username": self.username}

    def name(self) -> str:
        return self.comm

    def parent(self) -> FakeProcess | None:
        if self.gone:
            raise psutil.NoSuchProcess(1)
        return None if self.parent_name is None else FakeProcess(self.parent_name, "root", None)

    def net_connections(self, kind: str) -> list[SimpleNamespace]:
        assert kind == "tcp"
        return [SimpleNamespace(laddr=SimpleNamespace(port=p), status=s) for p, s in self.connections]


LISTEN = [(5910, psutil.CONN_LISTEN), (5910, psutil.CONN_LISTEN)]  # Xvnc's VNC port, IPv4 and IPv6
CONNECTED = [*LISTEN, (5910, psutil.CONN_ESTABLISHED)]  # xrdp connected to it


def test_xrdp_desktops_are_sesmans_x_servers() -> None:
    processes = [
        FakeProcess("Xvnc", "alice", connections=CONNECTED),
        FakeProcess("Xvnc", "bob", connections=LISTEN),
        FakeProcess("Xorg", "carol"),  # xorgxrdp: a unix socket to xrdp, listed active
        FakeProcess("Xvnc", "dave", parent_name="vncserver", connections=CONNECTED),  # not xrdp's
        FakeProcess("Xvfb", "erin"),  # not an X server sesman starts
        FakeProcess("sleep", "alice"),  # the session script
        FakeProcess("Xvnc", "frank", connections=CONNECTED, gone=True),  # ended while listed
    ]
    assert xrdp_desktops(processes) == [  # type: ignore[arg-type]
        Session("alice", "active"),
        Session("bob", "disconnected"),
        Session("carol", "active"),
    ]


def test_xrdp_desktop_connected_only_on_its_own_port() -> None:
    # Xvnc's outgoing or other connections are not xrdp's: only an established one on a port it listens on.
    elsewhere = [*LISTEN, (41234, psutil.CONN_ESTABLISHED), (5910, psutil.CONN_TIME_WAIT)]
    assert xrdp_desktops([FakeProcess("Xvnc", "alice", connections=elsewhere)]) == [  # type: ignore[list-item]
        Session("alice", "disconnected")
    ]


def test_a_user_with_several_desktops_is_active_in_any() -> None:
    for order in ((LISTEN, CONNECTED), (CONNECTED, LISTEN)):
        processes = [FakeProcess("Xvnc", "alice", connections=c) for c in order]
        assert xrdp_desktops(processes) == [Session("alice", "active")]  # type: ignore[arg-type]


async def test_xrdp_sessions_on_this_machine_and_denied_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    sources = SystemSources()
    sessions = await sources.xrdp_sessions()  # whatever desktops run here: well-formed, one per user
    assert len({s.user for s in sessions}) == len(sessions)

    def denied(*args: object, **kwargs: object) -> list[object]:
        raise psutil.AccessDenied()

    monkeypatch.setattr(psutil, "process_iter", denied)
    with pytest.raises(SourceError, match="psutil could not read xrdp desktops"):
        await sources.xrdp_sessions()
