"""Session actions on a Linux xrdp host (xrdp 0.9, as Debian 12 ships it).

sesman 0.9 offers no command to end or disconnect a session, so the agent does what the host shows.
For each desktop sesman's session process (a child `xrdp-sesman`, running as root) has three children:
the X server (`Xvnc :N` or `Xorg :N`, as the user), the window manager (sesman's startwm.sh, as the
user) and `xrdp-chansrv`. It waits for the window manager to exit, then ends the X server and chansrv
and the session is over (sesman logs `++ terminated session`). xrdp itself serves each connection in a
process of its own (`fork=true`), which for an Xvnc desktop holds a TCP connection to the display's
VNC port.

- logoff: SIGTERM the session's processes (the window manager with everything under it, the user's
  processes whose DISPLAY is the session's, and the X server), SIGKILL what is left after half of
  `command_timeout_s`, and answer once sesman's session process has ended (503 if it has not within
  `command_timeout_s`). sesman then cleans up and ends chansrv itself.
- disconnect: SIGTERM (then SIGKILL) the xrdp process connected to the desktop's VNC port: the client
  loses its connection, the desktop stays for the user to come back to. 409 when nothing is connected;
  501 for an Xorg (xorgxrdp) desktop, which xrdp reaches over a unix socket whose peer the agent cannot
  find, and when xrdp runs without `fork=true` (its one process serves every connection).
- message: `xmessage` on the session's display, run as the user (`runuser`) with the X server's
  `-auth` file, the text on its standard input (never parsed as options), shown for MESSAGE_SHOWN_S
  or until the user closes it. 501 when xmessage (Debian's x11-utils) is not installed; 409 when the
  desktop is disconnected.

The agent runs as root on such a host (it reads other users' processes and sockets, and signals them).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import psutil

from .actions import Action, ActionError, Done, matching
from .sources import XRDP_X_SERVERS

log = logging.getLogger(__name__)

MESSAGE_SHOWN_S = 600  # xmessage closes itself after this long
MESSAGE_START_S = 1.0  # an xmessage still running this long after its start is showing
Processes = Callable[[], Iterable[psutil.Process]]


@dataclass(frozen=True)
class Desktop:
    user: str
    display: int
    server: psutil.Process  # Xvnc or Xorg
    session: psutil.Process  # sesman's session process, the X server's parent

    @property
    def name(self) -> str:
        return f":{self.display}"


def _all_processes() -> Iterable[psutil.Process]:
    return psutil.process_iter(["name", "username"])


def display_of(cmdline: list[str]) -> int | None:
    """The display number an X server was started for (`Xvnc :10 ...`)."""
    for arg in cmdline[1:]:
        if arg.startswith(":") and arg[1:].isdigit():
            return int(arg[1:])
    return None


def auth_file(cmdline: list[str], cwd: str) -> str | None:
    """The X server's `-auth` file; sesman gives `.Xauthority`, relative to the user's home (its cwd)."""
    for flag, value in itertools.pairwise(cmdline):
        if flag == "-auth":
            return os.path.join(cwd, value)
    return None


def find_desktops(processes: Iterable[psutil.Process]) -> list[Desktop]:
    """Each X server whose parent is xrdp-sesman (as sources.xrdp_desktops finds them), with its display."""
    desktops = []
    for proc in processes:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if proc.info["name"] not in XRDP_X_SERVERS or not proc.info["username"]:
                continue
            parent = proc.parent()
            if parent is None or parent.name() != "xrdp-sesman":
                continue
            display = display_of(proc.cmdline())
            if display is not None:
                desktops.append(Desktop(proc.info["username"], display, proc, parent))
    return desktops


def vnc_peers(server: psutil.Process) -> set[tuple[str, int]]:
    """The far ends of the connections to an Xvnc's listening ports: xrdp's side of each."""
    connections = server.net_connections("tcp")
    listening = {c.laddr.port for c in connections if c.status == psutil.CONN_LISTEN}
    return {
        (_address(c.raddr.ip), c.raddr.port)
        for c in connections
        if c.status == psutil.CONN_ESTABLISHED and c.laddr.port in listening and c.raddr
    }


def _address(ip: str) -> str:
    """One spelling per address: xrdp's IPv6 socket sees 127.0.0.1 as ::ffff:127.0.0.1."""
    with contextlib.suppress(ValueError):
        parsed = ipaddress.ip_address(ip.split("%", 1)[0])
        if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(parsed)
    return ip


def xrdp_serving(peers: set[tuple[str, int]], processes: Iterable[psutil.Process]) -> list[psutil.Process]:
    """The xrdp processes holding one of `peers` as their local end."""
    found = []
    for proc in processes:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if proc.info["name"] != "xrdp":
                continue
            if any((_address(c.laddr.ip), c.laddr.port) in peers for c in proc.net_connections("tcp")):
                found.append(proc)
    return found


def _display_processes(user: str, display: int) -> list[psutil.Process]:
    """The user's processes on `display` (by their DISPLAY), those that left the session's tree too."""
    names = {f":{display}", f":{display}.0"}
    found = []
    for proc in psutil.process_iter(["username"]):
        if proc.info["username"] != user:
            continue
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if proc.environ().get("DISPLAY") in names:
                found.append(proc)
    return found


def _stop(procs: list[psutil.Process], grace_s: float) -> None:
    """SIGTERM, then SIGKILL what is left after `grace_s`."""
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace_s)


class XrdpActions:
    def __init__(
        self, timeout_s: float, processes: Processes = _all_processes, xmessage: str = "xmessage"
    ) -> None:
        self.timeout_s = timeout_s
        self.processes = processes
        self.xmessage = xmessage
        # Messages on screen (display, runuser's process): reaped once closed, ended by a logoff.
        self._shown: list[tuple[int, subprocess.Popen[bytes]]] = []

    async def act(self, action: Action, user: str, text: str) -> Done:
        desktops = await asyncio.to_thread(lambda: find_desktops(self.processes()))
        names = matching(user, [d.user for d in desktops])
        if not names:
            raise ActionError(404, f"cannot {action}: {user} has no xrdp desktop on this host")
        mine = [d for d in desktops if d.user in names]
        try:
            if action == "logoff":
                for desktop in mine:
                    await asyncio.to_thread(self._logoff, desktop)
                verb = "logged off"
            elif action == "disconnect":
                for desktop in mine:
                    await asyncio.to_thread(self._disconnect, desktop)
                verb = "disconnected"
            else:
                for desktop in mine:
                    await self._message(desktop, text)
                verb = "sent a message to"
        except psutil.Error as exc:
            raise ActionError(503, f"cannot {action}: {exc}") from exc
        displays = tuple(d.name for d in mine)
        return Done(action, mine[0].user, displays, f"{verb} display {', '.join(displays)}")

    def _logoff(self, desktop: Desktop) -> None:
        server_pid = desktop.server.pid
        procs: dict[int, psutil.Process] = {}
        with contextlib.suppress(psutil.NoSuchProcess):
            for proc in desktop.session.children(recursive=True):
                if proc.pid != server_pid and proc.name() != "xrdp-chansrv":
                    procs[proc.pid] = proc
        for proc in _display_processes(desktop.user, desktop.display):
            procs.setdefault(proc.pid, proc)
        procs[server_pid] = desktop.server
        _stop(list(procs.values()), self.timeout_s / 2)
        for display, shown in self._shown:
            if display == desktop.display and shown.poll() is None:
                shown.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    shown.wait(self.timeout_s / 2)
        try:
            desktop.session.wait(self.timeout_s)
        except psutil.NoSuchProcess:
            pass
        except psutil.TimeoutExpired as exc:
            raise ActionError(
                503,
                f"cannot logoff: sesman's session process {desktop.session.pid} for display "
                f"{desktop.name} did not end within {self.timeout_s:g} s of its processes' end",
            ) from exc
        log.info("logged %s off display %s", desktop.user, desktop.name)

    def _disconnect(self, desktop: Desktop) -> None:
        if desktop.server.name() != "Xvnc":
            raise ActionError(
                501,
                f"cannot disconnect {desktop.name}: xrdp reaches an {desktop.server.name()} desktop over a "
                "unix socket whose connection the agent cannot find (Xvnc desktops only)",
            )
        serving = xrdp_serving(vnc_peers(desktop.server), self.processes())
        if not serving:
            raise ActionError(409, f"cannot disconnect: {desktop.user}'s desktop is already disconnected")
        for proc in serving:
            parent = proc.parent()
            if parent is None or parent.name() != "xrdp":
                raise ActionError(
                    501,
                    "cannot disconnect: xrdp runs without fork=true, so its one process serves every "
                    "connection and ending it would disconnect everyone",
                )
        _stop(serving, self.timeout_s / 2)
        log.info("disconnected %s from display %s", desktop.user, desktop.name)

    async def _message(self, desktop: Desktop, text: str) -> None:
        program = shutil.which(self.xmessage)
        if program is None:
            raise ActionError(
                501, f"cannot message: {self.xmessage} is not installed on this host (Debian: x11-utils)"
            )
        if desktop.server.name() == "Xvnc" and not vnc_peers(desktop.server):
            raise ActionError(
                409, f"cannot message: {desktop.user}'s desktop is disconnected (nobody would see it)"
            )
        auth = auth_file(desktop.server.cmdline(), desktop.server.cwd())
        env = [f"DISPLAY={desktop.name}"] + ([f"XAUTHORITY={auth}"] if auth else [])
        argv = ["runuser", "-u", desktop.user, "--", "env", *env, program]
        argv += ["-center", "-timeout", str(MESSAGE_SHOWN_S), "-file", "-"]
        proc = await asyncio.to_thread(self._show, argv, text)
        self._shown = [(display, shown) for display, shown in self._shown if shown.poll() is None]
        if proc.returncode is None:
            self._shown.append((desktop.display, proc))

    def _show(self, argv: list[str], text: str) -> subprocess.Popen[bytes]:
        """Start xmessage; ActionError when it exits with an error within MESSAGE_START_S. Not an asyncio
        child: a message left on screen needs nothing of the agent's loop until it closes."""
        with tempfile.TemporaryFile() as errors:
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=errors,
                    start_new_session=True,
                )
            except OSError as exc:
                raise ActionError(
                    503, f"cannot message: cannot run {argv[0]!r}: {exc.strerror or exc}"
                ) from exc
            assert proc.stdin is not None
            with contextlib.suppress(OSError):  # it failed at once: its exit code says why
                proc.stdin.write((text + "\n").encode())
            with contextlib.suppress(OSError):
                proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):  # still showing
                proc.wait(MESSAGE_START_S)
            if proc.returncode not in (None, 0):
                errors.seek(0)
                detail = errors.read(200).decode("utf-8", errors="replace").strip()
                raise ActionError(
                    503, f"cannot message: {self.xmessage} exited with {proc.returncode}: {detail}"
                )
        return proc
