"""Session actions on this host: log a user's session off, disconnect it, show it a message.

The broker names the session by its user, as the directory holds it; the agent resolves the user's
session(s) on this host itself (its own session ids never leave it). A name matches a listed user
case-insensitively, either as given or, when nothing matches so, by its bare account name
(`CORP\\alice` and `alice@corp.example` both match `alice`, as quser prints it). Every session of the
user is acted on.

Which host this is decides how (host_actions.py picks):
- Windows (`sys.platform == "win32"`): `quser` lists the sessions with their ids, then `logoff <id>`,
  `tsdiscon <id>` or `msg <id> <text>`, each an argv (no shell) under `command_timeout_s`;
- a Linux xrdp host (`[sessions] source = "xrdp"`): xrdp_actions.py, built on this module;
- anything else: each action answers 501, saying why.

Errors carry the HTTP status the agent answers, and say which action failed and why.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from .errors import AgentError, SourceError
from .quser import QuserEntry, nobody_logged_on, quser_entries

Action = Literal["logoff", "disconnect", "message"]
ACTIONS: tuple[Action, ...] = ("logoff", "disconnect", "message")
MAX_USER = 256
MAX_TEXT = 500  # characters of a message
Run = Callable[[Sequence[str], float], Awaitable[str]]


class ActionError(AgentError):
    """An action that was not done: `status` is the agent's answer (400, 404, 409, 501, 503)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Done:
    action: Action
    user: str  # as the host knows the user
    sessions: tuple[str, ...]  # the host's ids of the sessions acted on (Windows ids, xrdp `:N` displays)
    detail: str


class SessionActions(Protocol):
    async def act(self, action: Action, user: str, text: str) -> Done: ...


def check_request(action: Action, user: object, text: object) -> tuple[str, str]:
    """The user and text of a request, or ActionError(400) saying what is wrong."""
    if not isinstance(user, str) or not user.strip() or len(user) > MAX_USER:
        raise ActionError(400, f"'user' must be the user's name (1..{MAX_USER} characters)")
    if not user.isprintable():
        raise ActionError(400, "'user' must not contain control characters")
    if action != "message":
        if text is not None:
            raise ActionError(400, f"'text' is for message only, not {action}")
        return user.strip(), ""
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT:
        raise ActionError(400, f"'text' must be the message (1..{MAX_TEXT} characters)")
    if not text.isprintable():
        raise ActionError(400, "'text' must be one line without control characters")
    return user.strip(), text.strip()


def bare(name: str) -> str:
    """`CORP\\alice` and `alice@corp.example` -> `alice`, case-folded."""
    return name.rsplit("\\", 1)[-1].split("@", 1)[0].casefold()


def matching(asked: str, listed: Sequence[str]) -> list[str]:
    """The listed names that are `asked`: the same name, else the same bare account name."""
    same = [name for name in listed if name.casefold() == asked.casefold()]
    return same or [name for name in listed if bare(name) == bare(asked)]


class NoActions:
    """A host this agent cannot act on: every action answers 501 with why."""

    def __init__(self, why: str) -> None:
        self.why = why

    async def act(self, action: Action, user: str, text: str) -> Done:
        raise ActionError(501, f"cannot {action} here: {self.why}")


class WindowsActions:
    """`quser` for the session ids, then `logoff`, `tsdiscon` or `msg` on each of the user's sessions."""

    def __init__(self, run: Run, timeout_s: float) -> None:
        self.run = run
        self.timeout_s = timeout_s

    async def act(self, action: Action, user: str, text: str) -> Done:
        if action == "message" and text.startswith("/"):
            raise ActionError(
                400, "cannot message: msg reads a text starting with '/' as an option: reword it"
            )
        entries = await self._sessions(action)
        names = matching(user, [e.user for e in entries])
        if not names:
            raise ActionError(404, f"cannot {action}: {user} has no session on this host")
        mine = [e for e in entries if e.user in names]
        if action != "logoff":
            mine = [e for e in mine if e.state == "active"]
            if not mine:
                why = "nobody would see the message" if action == "message" else "nothing to do"
                raise ActionError(409, f"cannot {action}: {names[0]}'s session is disconnected ({why})")
        for entry in mine:
            await self._one(action, entry, text)
        ids = tuple(e.session_id for e in mine)
        verb = {"logoff": "logged off", "disconnect": "disconnected", "message": "sent a message to"}[action]
        return Done(action, mine[0].user, ids, f"{verb} session {', '.join(ids)}")

    async def _sessions(self, action: Action) -> list[QuserEntry]:
        try:
            return quser_entries(await self.run(["quser"], self.timeout_s))
        except SourceError as exc:
            if nobody_logged_on(str(exc)):
                return []
            raise ActionError(503, f"cannot {action}: cannot list the sessions: {exc}") from exc

    async def _one(self, action: Action, entry: QuserEntry, text: str) -> None:
        commands = {
            "logoff": ["logoff", entry.session_id],
            "disconnect": ["tsdiscon", entry.session_id],
            "message": ["msg", entry.session_id, text],
        }
        try:
            await self.run(commands[action], self.timeout_s)
        except SourceError as exc:
            raise ActionError(503, f"cannot {action} session {entry.session_id}: {exc}") from exc
