"""A real terminal server on loopback: Debian's xrdp + xrdp-sesman with Xvnc sessions, and local users.

xrdp 0.9 reads sesman's port from /etc/xrdp/sesman.ini whatever `--config` says, so each server runs
xrdp and sesman in a private mount namespace (`unshare --mount`) where its own directory is bind-mounted
over /etc/xrdp and /run/xrdp: servers on one host, and the host's own xrdp, never see each other's
configuration, pid files or sockets. The namespace is a PID namespace too, with its own /proc, so an
agent run in it (`XrdpServer.inside()`) sees that server's desktops only, as on a machine of its own.
xrdp listens on 127.0.0.1 and a free port (`autorun=Xvnc`, so a client that sends a user and password
logs on without xrdp's login dialog); sesman listens on 127.0.0.1 and another free port. A logon's
desktop is an Xvnc display whose session script only waits (no window manager is needed, and the session
lives until it is killed or logged off); it first appends its display to ~/rdbroker-desktops, so a test
can tell a reconnected desktop from a new one.

Users are made with `useradd -m` and `chpasswd` (the stock PAM set-up accepts them) and removed with
their processes and home. Everything here needs root; `missing_tools()` says what is not installed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.support.postgres import free_port

# Debian package of each program the real-server tests run.
PACKAGES = {
    "xrdp": "xrdp",
    "xrdp-sesman": "xrdp",
    "Xvnc": "tigervnc-standalone-server",
    "xfreerdp": "freerdp2-x11",
    "rdesktop": "rdesktop",
    "xvfb-run": "xvfb",
    "Xvfb": "xvfb",
    "nmap": "nmap",
    "unshare": "util-linux",
    "nsenter": "util-linux",
    "useradd": "passwd",
}
# sesman logs these (xrdp 0.9.21) when a desktop is made and when it goes away.
SESSION_CREATED = "++ created session"
SESSION_UP = "Session in progress on display"
SESSION_TERMINATED = "++ terminated session"
# The session script: note the display, hold it open until the session is ended.
DESKTOPS_FILE = "rdbroker-desktops"
STARTWM = f'#!/bin/sh\necho "$DISPLAY" >> "$HOME/{DESKTOPS_FILE}"\nexec sleep 86400\n'


def missing_tools(tools: tuple[str, ...] = tuple(PACKAGES)) -> list[str]:
    """`program (package)` for each program that is not installed, and `root` when not run as root."""
    missing = [f"{tool} ({PACKAGES.get(tool, tool)})" for tool in tools if shutil.which(tool) is None]
    if os.geteuid() != 0:
        missing.append("root (xrdp-sesman and useradd need it)")
    return missing


@dataclass
class LocalUser:
    name: str
    password: str

    def remove(self) -> None:
        """End the user's processes (the desktops sesman started for them), then the account and home."""
        stop_pids(user_pids(self.name))
        subprocess.run(["userdel", "-r", "-f", self.name], capture_output=True, check=False)


def make_user(prefix: str = "rdbt") -> LocalUser:
    user = LocalUser(f"{prefix}{secrets.token_hex(3)}", secrets.token_urlsafe(12))
    subprocess.run(["useradd", "-m", "-s", "/bin/sh", user.name], check=True, capture_output=True)
    subprocess.run(
        ["chpasswd"], input=f"{user.name}:{user.password}\n".encode(), check=True, capture_output=True
    )
    return user


def user_pids(name: str) -> list[int]:
    pids = []
    for proc in psutil.process_iter(["pid", "username"]):
        if proc.info.get("username") == name:
            pids.append(proc.info["pid"])
    return pids


def stop_pids(pids: list[int], timeout_s: float = 5.0) -> None:
    """SIGTERM (Xvnc then removes its display's lock files), SIGKILL what is left after the timeout."""
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc = psutil.Process(pid)
            proc.send_signal(signal.SIGTERM)
            procs.append(proc)
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=timeout_s)


@dataclass
class XrdpServer:
    """One xrdp + sesman pair under `root` (its config in root/etc, its sockets in root/run, logs)."""

    root: Path
    port: int = field(default_factory=free_port)
    sesman_port: int = field(default_factory=free_port)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    holder: subprocess.Popen[bytes] | None = None  # unshare: the namespaces' pid 1 is its child
    namespace_pid: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def xrdp_log(self) -> Path:
        return self.root / "xrdp.log"

    @property
    def sesman_log(self) -> Path:
        return self.root / "sesman.log"

    def xrdp_text(self) -> str:
        with contextlib.suppress(OSError):
            return self.xrdp_log.read_text(errors="replace")
        return ""

    def sesman_text(self) -> str:
        with contextlib.suppress(OSError):
            return self.sesman_log.read_text(errors="replace")
        return ""

    def log_tails(self, lines: int = 15) -> str:
        """The end of xrdp's and sesman's logs, for an assertion's message."""
        return "\n".join(
            f"--- {name}:\n" + "\n".join(text.splitlines()[-lines:])
            for name, text in (("xrdp", self.xrdp_text()), ("sesman", self.sesman_text()))
        )

    def sessions_created(self) -> int:
        return self.sesman_text().count(SESSION_CREATED)

    def end_desktops(self, user: str, timeout_s: float = 20.0) -> None:
        """End every desktop of `user` and wait until sesman has seen them go. Each must be up first:
        sesman waits 10 s for an X server killed while it starts."""
        deadline = time.monotonic() + timeout_s
        text = self.sesman_text
        while text().count(SESSION_UP) < text().count(SESSION_CREATED):
            if time.monotonic() > deadline:
                raise TimeoutError(f"a desktop did not come up within {timeout_s} s")
            time.sleep(0.1)
        pids = user_pids(user)
        desktops = sum(1 for p in map(_process, pids) if p is not None and p.name() in ("Xvnc", "Xorg"))
        ended = text().count(SESSION_TERMINATED) + desktops  # other users' desktops stay
        stop_pids(pids)
        while text().count(SESSION_TERMINATED) < ended:
            if time.monotonic() > deadline:
                raise TimeoutError(f"sesman did not end the desktops within {timeout_s} s")
            time.sleep(0.1)

    def configure(self) -> None:
        etc, run = self.root / "etc", self.root / "run"
        shutil.copytree("/etc/xrdp", etc, symlinks=False)
        (run / "sockdir").mkdir(parents=True)
        (run / "sockdir").chmod(0o1777)
        rewrite(
            etc / "xrdp.ini",
            "Globals",
            {
                "port": f"tcp://127.0.0.1:{self.port}",
                "autorun": "Xvnc",
                "fork": "true",
            },
        )
        rewrite(etc / "xrdp.ini", "Logging", {"LogFile": str(self.xrdp_log), "EnableSyslog": "false"})
        rewrite(
            etc / "sesman.ini", "Globals", {"ListenAddress": "127.0.0.1", "ListenPort": str(self.sesman_port)}
        )
        rewrite(etc / "sesman.ini", "Logging", {"LogFile": str(self.sesman_log), "EnableSyslog": "false"})
        rewrite(etc / "sesman.ini", "ChansrvLogging", {"EnableSyslog": "false"})
        (etc / "startwm.sh").write_text(STARTWM)
        (etc / "startwm.sh").chmod(0o755)

    def start(self, timeout_s: float = 20.0) -> XrdpServer:
        """xrdp and sesman in one private PID and mount namespace, as on a machine of their own: an agent
        started there with `inside()` sees this server's processes only (its own /proc)."""
        self.configure()
        etc, run = self.root / "etc", self.root / "run"
        # /run is a tmpfs: after a reboot the package's /run/xrdp is gone until its service starts once.
        mounts = f"mkdir -p /run/xrdp && mount --bind {etc} /etc/xrdp && mount --bind {run} /run/xrdp"
        self.holder = subprocess.Popen(
            [
                "unshare",
                "--pid",
                "--fork",
                "--mount-proc",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                f"{mounts} && exec sleep 86400",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while not self._namespace_ready(self.holder):
            if self.holder.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the server's namespace (unshare --pid --mount) did not come up")
            time.sleep(0.05)
        for program in ("xrdp-sesman", "xrdp"):
            with open(self.root / f"{program}.out", "ab") as out:
                self.processes.append(
                    subprocess.Popen(
                        [*self.inside(), program, "--nodaemon"],
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        while not (f"listening to port {self.port}" in self.xrdp_text() and listening(self.sesman_port)):
            for proc, program in zip(self.processes, ("xrdp-sesman", "xrdp"), strict=True):
                if proc.poll() is not None:
                    output = (self.root / f"{program}.out").read_text(errors="replace")
                    self.stop()
                    raise RuntimeError(f"{program} exited with {proc.returncode}: {output}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"xrdp/sesman did not start listening within {timeout_s} s")
            time.sleep(0.1)
        return self

    def _namespace_ready(self, holder: subprocess.Popen[bytes]) -> bool:
        """The holder's child (pid 1 inside) has made the bind mounts and sleeps."""
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(holder.pid).children():
                if child.name() == "sleep":
                    self.namespace_pid = child.pid
                    return True
        return False

    def inside(self) -> list[str]:
        """The command prefix that runs a program in this server's namespaces (nsenter)."""
        return ["nsenter", "-t", str(self.namespace_pid), "--pid", "--mount", f"--wd={self.root}", "--"]

    def pids(self, name: str) -> list[int]:
        """Host pids of this server's processes called `name` (xrdp, xrdp-sesman, Xvnc...)."""
        found = []
        for proc in self.processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        if p.name() == name:
                            found.append(p.pid)
        return found

    def kill_xrdp(self) -> None:
        """SIGKILL xrdp (the listener and its per-connection children): the RDP service is gone,
        sesman and its desktops stay."""
        pids = self.pids("xrdp")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        psutil.wait_procs([p for p in map(_process, pids) if p is not None], timeout=5)

    def stop(self) -> None:
        """Stop xrdp, sesman and every process they started (the session waiters, Xvnc, chansrv), then
        the namespace (its pid 1 takes anything left with it)."""
        pids: list[int] = []
        for proc in self.processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                pids += [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
            pids.append(proc.pid)
        stop_pids(pids)
        for proc in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self.processes = []
        if self.holder is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.holder.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.holder.wait(timeout=5)
            self.holder = None


def _process(pid: int) -> psutil.Process | None:
    with contextlib.suppress(psutil.NoSuchProcess):
        return psutil.Process(pid)
    return None


def listening(port: int) -> bool:
    """xrdp's IPv6 build binds sesman's `127.0.0.1` as ::1 when it can (and connects to it the same way)."""
    for host in ("::1", "127.0.0.1"):
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return True
    return False


def rewrite(path: Path, section: str, values: dict[str, str]) -> None:
    """Set `key=value` in one [section] of an xrdp ini file; keys it lacks go at the section's end."""
    out: list[str] = []
    current = ""
    pending = dict(values)
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            if current == section:
                out += [f"{k}={v}" for k, v in pending.items()]
                pending = {}
            current = stripped.strip("[]")
        elif current == section and "=" in stripped and not stripped.startswith(("#", ";")):
            key = stripped.split("=", 1)[0].strip()
            if key in pending:
                line = f"{key}={pending.pop(key)}"
        out.append(line)
    if current == section:
        out += [f"{k}={v}" for k, v in pending.items()]
        pending = {}
    if pending:
        out += [f"[{section}]", *(f"{k}={v}" for k, v in pending.items())]
    path.write_text("\n".join(out) + "\n")


# Clients ----------------------------------------------------------------------------------------------
# Each one connects to `address` (the proxy or a server), does one thing a real client or scanner does,
# and returns once its connections are closed. The X clients run under `xvfb-run -a` (a display of their
# own) in their own process group, killed whole at the end.

# xrdp logs this once a logon's desktop (the Xvnc display) is connected to the client.
DESKTOP_REACHED = "VNC connection complete"


def bare_request(address: str, timeout_s: float = 5.0) -> bytes:
    """A Connection Request (NEG_REQ for TLS|CredSSP, no cookie), read the Confirm, close."""
    from rdbroker_rdp import PROTOCOL_HYBRID, PROTOCOL_SSL, build_connection_request

    host, port = address.rsplit(":", 1)
    answer = b""
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        sock.sendall(build_connection_request(requested_protocols=PROTOCOL_SSL | PROTOCOL_HYBRID))
        with contextlib.suppress(TimeoutError, OSError):
            while len(answer) < 19:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
    return answer


def health_probe(address: str, timeout_s: float = 5.0) -> bool:
    """rdbroker's own health probe (one Connection Request, the Confirm, close)."""
    import asyncio

    from rdbroker_health.probes.rdp import probe_rdp

    return asyncio.run(probe_rdp(address, timeout_s=timeout_s)).ok


def nmap_enum_encryption(address: str, timeout_s: float = 60.0) -> str:
    """nmap's rdp-enum-encryption script (`+` runs it on a port other than 3389). Answers its report."""
    host, port = address.rsplit(":", 1)
    done = subprocess.run(
        ["nmap", "-Pn", "-n", "--script", "+rdp-enum-encryption", "-p", port, host],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    return done.stdout


def freerdp_auth_only(address: str, user: str, password: str, timeout_s: float = 30.0) -> int:
    """`xfreerdp +auth-only`: the connection sequence and the logon info, then it leaves. Its exit code."""
    return run_x_client(
        ["xfreerdp", "+auth-only", f"/v:{address}", f"/u:{user}", f"/p:{password}", "/cert:ignore"],
        until=None,
        hold_s=0,
        timeout_s=timeout_s,
    )


def freerdp_logon(
    address: str,
    user: str,
    password: str,
    *,
    until: Callable[[], bool] | None,
    hold_s: float,
    timeout_s: float = 40.0,
) -> int:
    """A full xfreerdp client: once `until()` holds (None: at once), keep it `hold_s` more, then kill it."""
    return run_x_client(
        ["xfreerdp", f"/v:{address}", f"/u:{user}", f"/p:{password}", "/cert:ignore", "/size:1024x768"],
        until=until,
        hold_s=hold_s,
        timeout_s=timeout_s,
    )


def rdesktop_logon(
    address: str, user: str, password: str, *, until: Callable[[], bool] | None, hold_s: float
) -> int:
    """rdesktop with a password (it asks on stdin whether to trust the certificate: yes)."""
    return run_x_client(
        ["rdesktop", "-u", user, "-p", password, "-g", "1024x768", address],
        until=until,
        hold_s=hold_s,
        timeout_s=40.0,
        answer=b"yes\n",
    )


def run_x_client(
    command: list[str],
    *,
    until: Callable[[], bool] | None,
    hold_s: float,
    timeout_s: float,
    answer: bytes = b"",
) -> int:
    """Run `command` under Xvfb. With `until`, wait for it (bounded), hold, kill: answers -9. Without,
    wait `hold_s` and kill, or (hold_s=0) let it exit by itself within the timeout: its exit code."""
    client = start_x_client(command, answer)
    assert client.stdin is not None
    try:
        deadline = time.monotonic() + timeout_s
        if until is not None:
            while not until():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{command[0]}: the expected state was not reached in {timeout_s} s")
                if client.poll() is not None:
                    raise RuntimeError(f"{command[0]} exited with {client.returncode} too early")
                time.sleep(0.1)
        if until is not None or hold_s > 0:
            time.sleep(hold_s)
            return -9
        return client.wait(timeout=timeout_s)
    finally:
        stop_x_client(client, command[0])
        client.stdin.close()


def start_x_client(command: list[str], answer: bytes = b"") -> subprocess.Popen[bytes]:
    """`command` under its own Xvfb, in a session of its own; `answer` goes to its standard input
    (rdesktop asks whether to trust the certificate). Stop it with `stop_x_client`."""
    client = subprocess.Popen(
        ["xvfb-run", "-a", *command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.PIPE,
        start_new_session=True,
    )
    assert client.stdin is not None
    with contextlib.suppress(BrokenPipeError):
        client.stdin.write(answer)
        client.stdin.flush()
    return client


def stop_x_client(client: subprocess.Popen[bytes], name: str) -> None:
    """SIGKILL the client itself (a client killed, as a user's crash or pulled cable), then let
    xvfb-run stop its Xvfb (which removes its display's lock file); the whole group if that hangs."""
    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(client.pid).children(recursive=True):
            if child.name() == name:
                child.kill()
    try:
        client.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(client.pid, signal.SIGKILL)
        client.wait(timeout=10)
