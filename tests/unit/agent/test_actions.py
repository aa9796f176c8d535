"""The agent's session actions (`POST /sessions/logoff|disconnect|message`) on 127.0.0.1:0, with fake
command runners: authentication, bad input, Windows' commands, and hosts that cannot do an action."""

from __future__ import annotations

import httpx
import pytest

from rdbroker_agent.actions import MAX_TEXT, NoActions, WindowsActions, matching
from rdbroker_agent.auth import AgentAuth
from rdbroker_agent.config import parse_config
from rdbroker_agent.errors import SourceError
from rdbroker_agent.host_actions import actions_for
from rdbroker_agent.routes import MAX_BODY
from rdbroker_agent.server import AgentServer
from rdbroker_agent.xrdp_actions import XrdpActions, auth_file, display_of
from rdbroker_common.bearer import Tokens
from tests.unit.agent.fakes import FakeSources

CONFIG = parse_config({"counters": [{"kind": "cpu"}]})
XRDP_CONFIG = parse_config({"counters": [{"kind": "cpu"}], "sessions": {"source": "xrdp"}})
TOKEN = "agent-token-0123456789"
QUSER = """\
 USERNAME              SESSIONNAME        ID  STATE   IDLE TIME  LOGON TIME
>administrator         console             1  Active      none   11/27/2026 9:00 AM
 alice                 rdp-tcp#3           2  Active          .  11/27/2026 9:01 AM
 bob                                       3  Disc           12  11/27/2026 8:40 AM
"""


def windows(sources: FakeSources) -> WindowsActions:
    return WindowsActions(sources.run, 5.0)


def quser(text: str = QUSER) -> FakeSources:
    return FakeSources(outputs={("quser",): text})


async def post(server: AgentServer, path: str, body: object = None, **kwargs: object) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as client:
        return await client.post(path, json=body, **kwargs)  # type: ignore[arg-type]


async def test_actions_need_the_token_as_other_paths() -> None:
    sources = quser()
    sources.outputs[("logoff", "2")] = ""
    auth = AgentAuth(tokens=Tokens(fixed=TOKEN))
    async with AgentServer(CONFIG, sources, auth=auth, actions=windows(sources)) as server:
        refused = await post(server, "/sessions/logoff", {"user": "alice"})
        assert refused.status_code == 401
        assert refused.text.startswith("missing bearer token")
        wrong = await post(
            server, "/sessions/logoff", {"user": "alice"}, headers={"Authorization": "Bearer x"}
        )
        assert wrong.status_code == 401
        assert sources.runs == []  # nothing ran for a refused request
        done = await post(
            server, "/sessions/logoff", {"user": "alice"}, headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert done.status_code == 200, done.text
        assert done.json() == {
            "action": "logoff",
            "user": "alice",
            "sessions": ["2"],
            "detail": "logged off session 2",
        }
        assert sources.runs == [("quser",), ("logoff", "2")]


@pytest.mark.parametrize(
    ("path", "body", "status", "says"),
    [
        ("/sessions/logoff", None, 400, "the body must be JSON"),
        ("/sessions/logoff", ["alice"], 400, "must be a JSON object"),
        ("/sessions/logoff", {}, 400, "'user' must be the user's name"),
        ("/sessions/logoff", {"user": "  "}, 400, "'user' must be the user's name"),
        ("/sessions/logoff", {"user": 7}, 400, "'user' must be the user's name"),
        ("/sessions/logoff", {"user": "al\nice"}, 400, "control characters"),
        ("/sessions/logoff", {"user": "alice", "text": "hi"}, 400, "'text' is for message only"),
        ("/sessions/message", {"user": "alice"}, 400, "'text' must be the message"),
        ("/sessions/message", {"user": "alice", "text": "x" * (MAX_TEXT + 1)}, 400, "'text' must be"),
        ("/sessions/message", {"user": "alice", "text": "two\nlines"}, 400, "one line"),
        ("/sessions/logoff", {"user": "a" * MAX_BODY}, 413, f"longer than {MAX_BODY} bytes"),
    ],
)
async def test_bad_input_is_refused_before_anything_runs(
    path: str, body: object, status: int, says: str
) -> None:
    sources = quser()
    async with AgentServer(CONFIG, sources, actions=windows(sources)) as server:
        response = await post(server, path, body)
        assert response.status_code == status, response.text
        assert says in response.text
        assert sources.runs == []


async def test_actions_are_post_only() -> None:
    async with AgentServer(CONFIG, FakeSources()) as server:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=5) as client:
            response = await client.get("/sessions/logoff")
        assert (response.status_code, response.headers["allow"], response.text) == (
            405,
            "POST",
            "only POST\n",
        )


async def test_a_host_that_cannot_act_says_so() -> None:
    # The default psutil source on Linux: no way to act on a session.
    async with AgentServer(CONFIG, FakeSources()) as server:
        for action in ("logoff", "disconnect"):
            response = await post(server, f"/sessions/{action}", {"user": "alice"})
            assert response.status_code == 501
            assert response.text.startswith(f"cannot {action} here: ")
            assert "source 'psutil'" in response.text
        response = await post(server, "/sessions/message", {"user": "alice", "text": "hello"})
        assert response.status_code == 501


def test_actions_by_host() -> None:
    sources = FakeSources()
    assert isinstance(actions_for(CONFIG, sources.run, platform="win32"), WindowsActions)
    assert isinstance(actions_for(XRDP_CONFIG, sources.run, platform="linux"), XrdpActions)
    assert isinstance(actions_for(CONFIG, sources.run, platform="linux"), NoActions)


async def test_windows_disconnect_and_message_by_any_spelling_of_the_account() -> None:
    sources = quser()
    sources.outputs[("tsdiscon", "2")] = ""
    sources.outputs[("msg", "2", "-file /etc/shadow")] = ""
    async with AgentServer(CONFIG, sources, actions=windows(sources)) as server:
        done = await post(server, "/sessions/disconnect", {"user": "CORP\\Alice"})
        assert done.status_code == 200, done.text
        assert done.json()["sessions"] == ["2"]
        # The text is one argument of its own, never a shell's word.
        sent = await post(
            server, "/sessions/message", {"user": "alice@corp.example", "text": "-file /etc/shadow"}
        )
        assert sent.status_code == 200, sent.text
    assert sources.runs == [("quser",), ("tsdiscon", "2"), ("quser",), ("msg", "2", "-file /etc/shadow")]


@pytest.mark.parametrize(
    ("action", "body", "outputs", "status", "says"),
    [
        ("logoff", {"user": "carol"}, {}, 404, "cannot logoff: carol has no session on this host"),
        (
            "disconnect",
            {"user": "bob"},
            {},
            409,
            "cannot disconnect: bob's session is disconnected (nothing to do)",
        ),
        (
            "message",
            {"user": "bob", "text": "hi"},
            {},
            409,
            "cannot message: bob's session is disconnected (nobody would see the message)",
        ),
        (
            "message",
            {"user": "alice", "text": "/time:0"},
            {},
            400,
            "cannot message: msg reads a text starting with '/' as an option: reword it",
        ),
        (
            "logoff",
            {"user": "alice"},
            {("logoff", "2"): SourceError("'logoff' exited with 1: Access is denied.")},
            503,
            "cannot logoff session 2: 'logoff' exited with 1: Access is denied.",
        ),
    ],
)
async def test_windows_errors_say_which_action_and_why(
    action: str, body: object, outputs: dict[tuple[str, ...], str | Exception], status: int, says: str
) -> None:
    sources = quser()
    sources.outputs.update(outputs)
    async with AgentServer(CONFIG, sources, actions=windows(sources)) as server:
        response = await post(server, f"/sessions/{action}", body)
        assert (response.status_code, response.text) == (status, says + "\n")


async def test_windows_with_nobody_logged_on_or_quser_failing() -> None:
    nobody = FakeSources(outputs={("quser",): SourceError("'quser' exited with 1: No User exists for *")})
    async with AgentServer(CONFIG, nobody, actions=windows(nobody)) as server:
        response = await post(server, "/sessions/logoff", {"user": "alice"})
        assert response.status_code == 404
    broken = FakeSources(outputs={("quser",): SourceError("'quser' did not finish within 5 s")})
    async with AgentServer(CONFIG, broken, actions=windows(broken)) as server:
        response = await post(server, "/sessions/logoff", {"user": "alice"})
        assert response.status_code == 503
        assert response.text == "cannot logoff: cannot list the sessions: 'quser' did not finish within 5 s\n"


async def test_xrdp_without_that_users_desktop_is_404() -> None:
    actions = XrdpActions(5.0, processes=lambda: [])
    async with AgentServer(XRDP_CONFIG, FakeSources(), actions=actions) as server:
        response = await post(server, "/sessions/logoff", {"user": "alice"})
        assert (response.status_code, response.text) == (
            404,
            "cannot logoff: alice has no xrdp desktop on this host\n",
        )


def test_xrdp_display_and_auth_file_from_the_x_server_command_line() -> None:
    argv = ["Xvnc", ":10", "-auth", ".Xauthority", "-geometry", "1024x768", "-rfbauth", "/home/a/.vnc/p"]
    assert display_of(argv) == 10
    assert display_of(["Xvnc", "-geometry", "1x1"]) is None
    assert auth_file(argv, "/home/alice") == "/home/alice/.Xauthority"
    assert auth_file(["Xorg", ":11", "-auth", "/run/x/auth"], "/") == "/run/x/auth"
    assert auth_file(["Xorg", ":11"], "/") is None


def test_account_matching() -> None:
    listed = ["alice", "ALICE2", "bob"]
    assert matching("Alice", listed) == ["alice"]
    assert matching("CORP\\alice", listed) == ["alice"]
    assert matching("alice@corp.example", listed) == ["alice"]
    assert matching("CORP\\alic", listed) == []  # a cut name is never guessed at
    assert matching("CORP\\bob", ["CORP\\bob", "OTHER\\bob"]) == ["CORP\\bob"]
