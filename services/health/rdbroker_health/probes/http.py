"""HTTP probes of a server's agent: its load (`agent_url`) and its session list (`sessions_url`).

The load body is Kemp's `0`..`100` (100 = full), `101` (down), `102` (the operator disabled the server:
drain, reconnects only), or HAProxy agent-check words separated by
commas or spaces: `75%` (available capacity, so load 25), `up`/`ready`, `drain`, `maint`,
`down`/`fail`/`stopped` (a `#description` may follow). When words disagree the strongest wins:
down > maint > drain > up. Anything else is a failed probe with the reason.

Both requests carry `Authorization: Bearer <token>` when the replica has an agent token. An agent
answering 401 or 403 refused it (or wanted one): a failed probe marked `refused`, whose detail says
what to set, told apart from an agent that does not answer (a down server's silence).
"""

from __future__ import annotations

import asyncio
import enum
import json
import re
from dataclasses import dataclass, field

import httpx

# An agent answers a few bytes; a session list stays far under this even for a large server.
MAX_AGENT_BODY = 1024
MAX_SESSIONS_BODY = 1 << 20
MAX_USER_LENGTH = 256
REFUSED_STATUSES = (401, 403)
_SET_TOKEN = "set RDBROKER_AGENT_TOKEN (or --agent-token-file) on the health replicas to the agent's token"


class AgentState(enum.IntEnum):
    """What the agent says about the server, strongest last."""

    NONE = 0  # no agent, or it gave no state word
    UP = 1
    DRAIN = 2
    MAINT = 3
    DOWN = 4


_WORDS = {
    "up": AgentState.UP,
    "ready": AgentState.UP,
    "drain": AgentState.DRAIN,
    "maint": AgentState.MAINT,
    "down": AgentState.DOWN,
    "fail": AgentState.DOWN,
    "stopped": AgentState.DOWN,
}
_NUMBER = re.compile(r"\d{1,3}")
_PERCENT = re.compile(r"(\d{1,3})%")


@dataclass(frozen=True)
class AgentResult:
    ok: bool
    load: int | None = None  # 0..100 when the agent gave one
    state: AgentState = AgentState.NONE
    detail: str = ""
    refused: bool = False  # the agent refused our credentials (401/403)


@dataclass(frozen=True)
class ServerSession:
    user: str
    disconnected: bool


@dataclass(frozen=True)
class SessionsResult:
    ok: bool
    sessions: list[ServerSession] = field(default_factory=list)
    detail: str = ""
    omits_disconnected: bool = False  # the list cannot show disconnected sessions (psutil)
    refused: bool = False  # the agent refused our credentials (401/403)


def parse_agent_reply(body: str) -> AgentResult:
    """Read an agent's body into a load and a state; a malformed body is a failed result."""
    words_text, _, _description = body.partition("#")
    tokens = [t for t in re.split(r"[,\s]+", words_text.strip().lower()) if t]
    if not tokens:
        return AgentResult(ok=False, detail="empty agent reply")
    load: int | None = None
    state = AgentState.NONE
    for token in tokens:
        number = _NUMBER.fullmatch(token)
        percent = _PERCENT.fullmatch(token)
        if number or percent:
            if load is not None:
                return AgentResult(ok=False, detail=f"more than one load value in {_shown(body)}")
            if percent:
                load = max(0, 100 - int(percent.group(1)))  # available capacity -> load
            elif int(token) == 101:
                state = max(state, AgentState.DOWN)
                load = -1  # marks "seen"; reported as no load
            elif int(token) == 102:  # Kemp: administratively disabled; its users may still reconnect
                state = max(state, AgentState.DRAIN)
                load = -1
            elif int(token) <= 100:
                load = int(token)
            else:
                return AgentResult(ok=False, detail=f"load {int(token)} out of range 0..102")
        elif token in _WORDS:
            state = max(state, _WORDS[token])
        else:
            return AgentResult(ok=False, detail=f"unknown agent word {_shown(token)}")
    if load == -1:
        load = None
    if state is AgentState.NONE:
        state = AgentState.UP  # a bare load means the agent is up
    parts = [f"load={load}"] if load is not None else []
    parts.append(f"state={state.name.lower()}")
    return AgentResult(ok=True, load=load, state=state, detail=" ".join(parts))


def parse_sessions(body: bytes) -> SessionsResult:
    """Read a JSON session list: `[{"user": ..., "state": "active"|"disconnected"}, ...]`, or our
    agent's `{"omits_disconnected": bool, "sessions": [...]}` (a plain list is taken as complete).

    A list with anything unexpected is refused whole: reporting part of it would make the broker
    end sessions that are still there.
    """
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        return SessionsResult(ok=False, detail=f"session list is not JSON: {exc}")
    omits = False
    if isinstance(data, dict) and isinstance(data.get("sessions"), list):
        omits = data.get("omits_disconnected", False)
        if not isinstance(omits, bool):
            return SessionsResult(ok=False, detail="omits_disconnected is not true or false")
        data = data["sessions"]
    if not isinstance(data, list):
        return SessionsResult(ok=False, detail="session list is not a JSON list")
    sessions: list[ServerSession] = []
    for index, item in enumerate(data):
        if not isinstance(item, dict):
            return SessionsResult(ok=False, detail=f"session {index} is not an object")
        user, state = item.get("user"), item.get("state")
        if not isinstance(user, str) or not user.strip() or len(user) > MAX_USER_LENGTH:
            return SessionsResult(ok=False, detail=f"session {index} has no valid user")
        if not isinstance(state, str) or state.lower() not in ("active", "disconnected", "disc"):
            return SessionsResult(ok=False, detail=f"session {index} has unknown state {state!r}")
        sessions.append(ServerSession(user=user.strip(), disconnected=state.lower() != "active"))
    detail = f"{len(sessions)} sessions" + (" (disconnected ones not shown)" if omits else "")
    return SessionsResult(ok=True, sessions=sessions, detail=detail, omits_disconnected=omits)


async def probe_agent(
    client: httpx.AsyncClient, url: str, timeout_s: float, authorization: str | None = None
) -> AgentResult:
    """GET the agent URL (with `authorization` as the header, if any) and parse its body. Never raises."""
    body, error = await _get(client, url, timeout_s, MAX_AGENT_BODY, authorization)
    if error is not None:
        return AgentResult(ok=False, detail=error.detail, refused=error.refused)
    return parse_agent_reply(body.decode("utf-8", errors="replace").lstrip("\ufeff"))


async def fetch_sessions(
    client: httpx.AsyncClient, url: str, timeout_s: float, authorization: str | None = None
) -> SessionsResult:
    """GET the session list URL and parse it. Never raises."""
    body, error = await _get(client, url, timeout_s, MAX_SESSIONS_BODY, authorization)
    if error is not None:
        return SessionsResult(ok=False, detail=error.detail, refused=error.refused)
    return parse_sessions(body)


@dataclass(frozen=True)
class _Failure:
    detail: str
    refused: bool = False


def refused_detail(status: int, token_sent: bool) -> str:
    if token_sent:
        return f"agent refused our token ({status}): {_SET_TOKEN}"
    return f"agent requires a token ({status}): {_SET_TOKEN}"


async def _get(
    client: httpx.AsyncClient, url: str, timeout_s: float, limit: int, authorization: str | None
) -> tuple[bytes, _Failure | None]:
    """The body of a 2xx answer (at most `limit` bytes), or why there is none."""
    headers = {"Authorization": authorization} if authorization is not None else None
    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream(
                "GET", url, headers=headers, timeout=timeout_s, follow_redirects=False
            ) as response:
                if response.status_code in REFUSED_STATUSES:
                    detail = refused_detail(response.status_code, authorization is not None)
                    return b"", _Failure(detail, refused=True)
                if not response.is_success:
                    return b"", _Failure(f"http {response.status_code}")
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > limit:
                        return b"", _Failure(f"body longer than {limit} bytes")
                    chunks.append(chunk)
                return b"".join(chunks), None
    except (TimeoutError, httpx.TimeoutException):
        return b"", _Failure(f"timeout after {timeout_s:g}s")
    except httpx.InvalidURL as exc:
        return b"", _Failure(f"bad url: {exc}")
    except httpx.UnsupportedProtocol as exc:
        return b"", _Failure(f"bad url: {exc}")
    except httpx.ConnectError as exc:
        return b"", _Failure(f"connect failed: {exc or type(exc).__name__}")
    except (httpx.HTTPError, OSError) as exc:
        return b"", _Failure(f"{type(exc).__name__}: {str(exc) or _closed(url)}")


def _closed(url: str) -> str:
    """For an error without a message: the peer closed. An HTTPS agent does so when the TLS handshake
    did not give it the client certificate it requires (TLS 1.3 fails it after the client's part)."""
    hint = ""
    if url.lower().startswith("https:"):
        hint = " (over HTTPS: does it require a client certificate? --agent-tls-cert/--agent-tls-key)"
    return f"the agent closed the connection without an answer{hint}"


def _shown(text: str) -> str:
    """A quoted, shortened copy of untrusted text for a detail string."""
    return repr(text[:40] + ("..." if len(text) > 40 else ""))
