"""Where readings come from: psutil for CPU, memory, logged-in users and xrdp desktops, and operator commands.

`Sources` is the seam tests replace with fixed values; `SystemSources` is the real machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import psutil

from .errors import SourceError

log = logging.getLogger(__name__)

SessionState = Literal["active", "disconnected"]
MAX_OUTPUT = 1 << 20  # bytes kept from a command's output
_STATES: dict[str, SessionState] = {
    "active": "active",
    "disconnected": "disconnected",
    "disc": "disconnected",
}


@dataclass(frozen=True, slots=True)
class Session:
    user: str
    state: SessionState


class Sources(Protocol):
    async def cpu_percent(self) -> float: ...
    async def memory_percent(self) -> float: ...
    async def logged_in_sessions(self) -> list[Session]: ...
    async def xrdp_sessions(self) -> list[Session]: ...
    async def run(self, command: Sequence[str], timeout_s: float) -> str: ...


class SystemSources:
    def __init__(self) -> None:
        psutil.cpu_percent(interval=None)  # the first call only sets the reference point

    async def cpu_percent(self) -> float:
        with _psutil_errors("cpu"):
            return float(psutil.cpu_percent(interval=None))  # since the previous call: no sleeping here

    async def memory_percent(self) -> float:
        with _psutil_errors("memory"):
            return float(psutil.virtual_memory().percent)

    async def logged_in_sessions(self) -> list[Session]:
        # psutil cannot tell disconnected sessions apart, and lists one entry per terminal:
        # one active session per user name is what it can honestly say.
        with _psutil_errors("users"):
            names = dict.fromkeys(u.name for u in psutil.users() if u.name)
        return [Session(name, "active") for name in names]

    async def xrdp_sessions(self) -> list[Session]:
        with _psutil_errors("xrdp desktops"):
            return xrdp_desktops(psutil.process_iter(["name", "username"]))

    async def run(self, command: Sequence[str], timeout_s: float) -> str:
        return await run_command(command, timeout_s)


# X servers xrdp-sesman starts for a desktop: Xvnc (sesman's [Xvnc]) and Xorg with xorgxrdp ([Xorg]).
XRDP_X_SERVERS = ("Xvnc", "Xorg")


def xrdp_desktops(processes: Iterable[psutil.Process]) -> list[Session]:
    """The desktops xrdp-sesman holds, one session per user: each X server whose parent is sesman.

    xrdp-sesman writes no utmp entry and, without systemd-logind, nothing else records its sessions, so
    psutil's users cannot see them; its X servers can. An Xvnc desktop is `active` while xrdp holds a TCP
    connection to its VNC port (xrdp 0.9 connects over TCP) and `disconnected` without one. An Xorg desktop
    talks to xrdp over a unix socket this source does not read: it is listed `active`. Reading other users'
    sockets needs root.
    """
    states: dict[str, SessionState] = {}
    for proc in processes:
        with contextlib.suppress(psutil.NoSuchProcess):  # ended while we looked: not a session any more
            if proc.info["name"] not in XRDP_X_SERVERS or not proc.info["username"]:
                continue
            parent = proc.parent()
            if parent is None or parent.name() != "xrdp-sesman":
                continue
            user: str = proc.info["username"]
            if proc.info["name"] == "Xvnc":
                connections = proc.net_connections("tcp")
                listening = {c.laddr.port for c in connections if c.status == psutil.CONN_LISTEN}
                connected = any(
                    c.status == psutil.CONN_ESTABLISHED and c.laddr.port in listening for c in connections
                )
                state: SessionState = "active" if connected else "disconnected"
            else:
                state = "active"
            if states.get(user) != "active":  # a user with several desktops is active in any of them
                states[user] = state
    return [Session(user, state) for user, state in states.items()]


@contextlib.contextmanager
def _psutil_errors(what: str) -> Iterator[None]:
    try:
        yield
    except (psutil.Error, OSError) as exc:
        raise SourceError(f"psutil could not read {what}: {exc}") from exc


async def run_command(command: Sequence[str], timeout_s: float) -> str:
    """Run `command` (argv, no shell) and return its stdout; SourceError on failure or timeout."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise SourceError(f"cannot run {command[0]!r}: {exc.strerror or exc}") from exc
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await proc.communicate()
    except TimeoutError as exc:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise SourceError(f"{command[0]!r} did not finish within {timeout_s:g} s") from exc
    if proc.returncode != 0:
        detail = err[:200].decode("utf-8", errors="replace").strip()
        raise SourceError(f"{command[0]!r} exited with {proc.returncode}: {detail}")
    if len(out) > MAX_OUTPUT:
        raise SourceError(f"{command[0]!r} printed more than {MAX_OUTPUT} bytes")
    return out.decode("utf-8", errors="replace")


def parse_number(text: str, what: str) -> float:
    """A command counter's output: one number, optionally followed by '%'."""
    value = text.strip().removesuffix("%").strip()
    try:
        number = float(value)
    except ValueError:
        raise SourceError(f"{what} printed {text.strip()[:40]!r}, not a number") from None
    if not math.isfinite(number):
        raise SourceError(f"{what} printed {number}, not a finite number")
    return number


def parse_sessions(text: str) -> list[Session]:
    """A session command's output: `[{"user": ..., "state": ...}, ...]` or `{"sessions": [...]}`.

    States are `active` and `disconnected` (`disc`, as `query session` prints it, too), any case.
    Entries without a user or in another state (`listen`, `down`, ...) are not user sessions and are left out.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SourceError(f"session command did not print JSON: {exc}") from exc
    if isinstance(data, dict) and "sessions" in data:
        data = data["sessions"]
    if not isinstance(data, list):
        raise SourceError("session command must print a JSON list of {user, state} objects")
    sessions: list[Session] = []
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("user"), str):
            raise SourceError(f"session entry {str(item)[:60]} has no string 'user'")
        state = item.get("state", "active")
        if not isinstance(state, str):
            raise SourceError(f"session entry for {item['user']!r} has a non-string state")
        user = item["user"].strip()
        normal = _STATES.get(state.strip().lower())
        if user and normal is not None:
            sessions.append(Session(user, normal))
        else:
            log.debug("skipped session entry %r", item)
    return sessions
