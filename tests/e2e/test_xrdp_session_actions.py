"""The agent's session actions on a real xrdp host: xrdp + xrdp-sesman with an Xvnc desktop (tests/support/
xrdp_server.py), a local user logged on with xfreerdp and a password, and the real agent (`source = "xrdp"`)
on 127.0.0.1. A message shows on the user's display, a disconnect closes the client's connection and leaves
the desktop `disconnected`, and a logoff ends the desktop: sesman logs `++ terminated session`, the user has
no process left, and the agent no longer lists them.

Needs root (sesman, useradd, signalling other users' processes) and Debian's xrdp, tigervnc-standalone-server,
freerdp2-x11, xvfb and x11-utils (xmessage); skips saying what is missing.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from rdbroker_agent.config import parse_config
from rdbroker_agent.server import AgentServer
from rdbroker_agent.sources import SystemSources
from tests.support import xrdp_server as xs

pytestmark = pytest.mark.slow
TOOLS = ("xrdp", "xrdp-sesman", "Xvnc", "xfreerdp", "xvfb-run", "unshare", "useradd")
CONFIG = parse_config({"counters": [{"kind": "sessions", "full_scale": 10}], "sessions": {"source": "xrdp"}})


@pytest.fixture
def xrdp(tmp_path: Path) -> Iterator[xs.XrdpServer]:
    missing = xs.missing_tools(TOOLS) + ([] if shutil.which("xmessage") else ["xmessage (x11-utils)"])
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    root = tmp_path / "xrdp"
    root.mkdir()
    server = xs.XrdpServer(root).start()
    try:
        yield server
    finally:
        server.stop()


def wait_for(check: Callable[[], object], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what} within {timeout_s} s"
        time.sleep(0.2)


async def listed(agent: AgentServer) -> list[dict[str, str]]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{agent.port}", timeout=10) as client:
        answer = await client.get("/sessions")
    assert answer.status_code == 200, answer.text
    sessions: list[dict[str, str]] = answer.json()["sessions"]
    return sessions


async def act(agent: AgentServer, action: str, body: dict[str, str]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{agent.port}", timeout=30) as client:
        return await client.post(f"/sessions/{action}", json=body)


def processes_of(user: str, name: str = "") -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["username", "name"]):
        if proc.info["username"] == user and (not name or proc.info["name"] == name):
            found.append(proc)
    return found


async def test_message_disconnect_and_logoff_a_real_xrdp_desktop(xrdp: xs.XrdpServer) -> None:
    user = xs.make_user()
    client = None
    try:
        command = ["xfreerdp", f"/v:{xrdp.address}", f"/u:{user.name}", f"/p:{user.password}", "/cert:ignore"]
        client = xs.start_x_client([*command, "/size:1024x768"])
        await asyncio.to_thread(
            wait_for,
            lambda: xs.DESKTOP_REACHED in xrdp.xrdp_text() and xs.SESSION_UP in xrdp.sesman_text(),
            f"{user.name}'s desktop\n{xrdp.log_tails()}",
        )
        async with AgentServer(CONFIG, SystemSources()) as agent:
            assert await listed(agent) == [{"user": user.name, "state": "active"}]

            shown = await act(agent, "message", {"user": f"CORP\\{user.name}", "text": "-file /etc/shadow"})
            assert shown.status_code == 200, shown.text
            assert shown.json()["user"] == user.name
            [display] = shown.json()["sessions"]
            # xmessage runs as the user on the session's display, the text read from its standard input.
            [xmessage] = processes_of(user.name, "xmessage")
            assert xmessage.environ()["DISPLAY"] == display
            assert "/etc/shadow" not in xmessage.cmdline()

            cut = await act(agent, "disconnect", {"user": user.name})
            assert cut.status_code == 200, cut.text
            assert cut.json()["detail"] == f"disconnected display {display}"
            assert await listed(agent) == [{"user": user.name, "state": "disconnected"}]
            assert processes_of(user.name, "Xvnc"), "the desktop stays for the user to come back to"
            again = await act(agent, "disconnect", {"user": user.name})
            assert (again.status_code, again.text) == (
                409,
                f"cannot disconnect: {user.name}'s desktop is already disconnected\n",
            )

            terminated = xrdp.sesman_text().count(xs.SESSION_TERMINATED)
            ended = await act(agent, "logoff", {"user": user.name})
            assert ended.status_code == 200, ended.text
            assert ended.json()["detail"] == f"logged off display {display}"
            # Answered once sesman's session process ended: the desktop is gone, and sesman knows it.
            assert await listed(agent) == []
            assert processes_of(user.name) == []
            await asyncio.to_thread(
                wait_for,
                lambda: xrdp.sesman_text().count(xs.SESSION_TERMINATED) > terminated,
                f"sesman's `{xs.SESSION_TERMINATED}`\n{xrdp.log_tails()}",
            )
            gone = await act(agent, "logoff", {"user": user.name})
            assert gone.status_code == 404
    finally:
        if client is not None:
            xs.stop_x_client(client, "xfreerdp")
            if client.stdin is not None:
                client.stdin.close()
        user.remove()
