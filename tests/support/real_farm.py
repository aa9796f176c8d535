"""A real two-server xrdp farm on loopback, with the whole rdbroker cluster in front of it.

Two terminal servers, each xrdp + xrdp-sesman with Xvnc desktops (`xrdp_server.XrdpServer`) in a PID and
mount namespace of its own, with the real rdbroker-agent run inside that namespace (`source = "xrdp"`), so
each agent sees its own server's desktops only, as on two machines. In front: a broker on PostgreSQL, two
health replicas and two proxies (`farm.Farm`'s), the servers registered with equal weights, their agents'
`/load` and `/sessions`, and fast probes. Local users with passwords are made by the farm and removed at
the end. Clients are xfreerdp or rdesktop processes on one Xvfb display, each killed with SIGKILL when the
test is done with it (a user's client crashing or a pulled cable, as far as the server can tell).
"""

from __future__ import annotations

import contextlib
import os
import re
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
from psycopg.rows import dict_row

from tests.support import xrdp_server as xs
from tests.support.cluster import Harness
from tests.support.farm import Farm, FarmSettings
from tests.support.postgres import create_database, drop_database, free_port

TOOLS = ("xrdp", "xrdp-sesman", "Xvnc", "xfreerdp", "Xvfb", "nmap", "unshare", "nsenter", "useradd")
AGENT_TOKEN = "real-farm-agent-token-8c1e2b"
# How often the health replicas read each agent's session list: "one agent interval".
SESSIONS_INTERVAL_S = 1.0
CONFIRM_TIMEOUT_S = 3
PROBE = FarmSettings(hosts=0, brokers=1, health=2, proxies=2, probe_interval_ms=500, probe_timeout_ms=1000)
AGENT_CONFIG = '[[counters]]\nkind = "sessions"\nfull_scale = 10\n\n[sessions]\nsource = "xrdp"\n'
# sesman logs this when a client goes back to its desktop.
SESSION_RECONNECTED = "++ reconnected session"
# Every client asks for the same size and depth: sesman reconnects a client only to a desktop of its own.
SIZE, BPP = "1024x768", "24"


class LogWatch:
    """What a log file gained since the watch was made."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def text(self) -> str:
        with contextlib.suppress(OSError), open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read().decode(errors="replace")
        return ""

    def count(self, needle: str) -> int:
        return self.text().count(needle)


@dataclass
class Logon:
    """One client: which server it reached, how long until its desktop was connected."""

    server: xs.XrdpServer
    seconds: float
    process: subprocess.Popen[bytes]
    sesman: str  # what that server's sesman logged for it

    def kill(self) -> float:
        """SIGKILL the client (no RDP goodbye, its TCP connection closes); answers the monotonic time of
        the kill."""
        killed = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        self.process.wait(timeout=10)
        return killed


@dataclass
class RealFarm(Farm):
    servers: list[xs.XrdpServer] = field(default_factory=list)
    agents: list[str] = field(default_factory=list)  # each server's agent, http://127.0.0.1:port
    users: dict[str, xs.LocalUser] = field(default_factory=dict)
    display: subprocess.Popen[bytes] | None = None
    display_name: str = ""
    clients: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start_real(self, pg_server_url: str, user_names: tuple[str, ...]) -> RealFarm:
        self.harness.supervisor.env["RDBROKER_AGENT_TOKEN"] = AGENT_TOKEN  # agents and health replicas
        self.dsn = create_database(pg_server_url)
        sup = self.harness.supervisor
        sup.run("migrate", ["-m", "rdbroker_cli", "migrate", "--database-url", self.dsn])
        for i in range(2):
            root = self.harness.root / f"xrdp{i}"
            root.mkdir()
            server = xs.XrdpServer(root)
            self.servers.append(server)
            server.start()
            self.hosts.append(server.address)
            config = root / "agent.toml"
            config.write_text(AGENT_CONFIG)
            port = free_port()
            sup.start(
                f"agent{i}",
                ["-m", "rdbroker_agent", "--config", str(config), "--listen", f"127.0.0.1:{port}"],
                ports={"http": port},
                tcp_ready=["http"],
                prefix=server.inside(),
            )
            self.agents.append(f"http://127.0.0.1:{port}")
        farm_file = sup.root / "farm.yaml"
        farm_file.write_text(self.farm_yaml())
        sup.run("apply", ["-m", "rdbroker_cli", "apply", "--database-url", self.dsn, "-f", str(farm_file)])
        self.start_broker(0)
        for i in range(self.settings.health):
            self.start_health(i)
        for i in range(self.settings.proxies):
            self.start_proxy(i)
        for name in user_names:
            self.users[name] = xs.make_user(name)
        self.start_display()
        wait_for(lambda: all(s["load"] >= 0 for s in self.server_rows()), "the agents' first loads", 30)
        return self

    def farm_yaml(self) -> str:
        s = self.settings
        lines = [
            "pools:",
            "  - name: default",
            "    default: true",
            "    disconnect_timeout: 1h",
            f"    confirm_timeout: {CONFIRM_TIMEOUT_S}s",
            f"    probe: {{interval: {s.probe_interval_ms}ms, timeout: {s.probe_timeout_ms}ms,"
            f" rise: {s.rise}, fall: {s.fall}, sessions_interval: {int(SESSIONS_INTERVAL_S * 1000)}ms}}",
            "servers:",
        ]
        for address, agent in zip(self.hosts, self.agents, strict=True):
            lines += [
                f"  - address: {address}",
                "    pool: default",
                "    weight: 100",
                f"    agent_url: {agent}/load",
                f"    sessions_url: {agent}/sessions",
            ]
        return "\n".join(lines) + "\n"

    def start_display(self) -> None:
        """One Xvfb for every client (xfreerdp needs an X display; none is shown)."""
        read, write = os.pipe()
        self.display = subprocess.Popen(
            ["Xvfb", "-displayfd", str(write), "-screen", "0", "1280x1024x24", "-nolisten", "tcp"],
            pass_fds=(write,),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        os.close(write)
        with os.fdopen(read) as f:
            self.display_name = ":" + f.readline().strip()

    def stop(self) -> None:
        for client in self.clients:
            with contextlib.suppress(ProcessLookupError):
                client.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                client.wait(timeout=5)
        if self.display is not None:
            self.display.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.display.wait(timeout=5)
        for server in self.servers:
            server.stop()
        for user in self.users.values():
            user.remove()
        self.harness.cleanup()
        if self.dsn:
            drop_database(self.dsn)

    # Clients --------------------------------------------------------------------------------------

    def server_at(self, address: str) -> xs.XrdpServer:
        (server,) = [s for s in self.servers if s.address == address]
        return server

    def other(self, server: xs.XrdpServer) -> xs.XrdpServer:
        (other,) = [s for s in self.servers if s is not server]
        return other

    def logon(
        self,
        address: str,
        name: str,
        password: str | None = None,
        timeout_s: float = 40,
        client_program: str = "xfreerdp",
    ) -> Logon:
        """`client_program` (xfreerdp or rdesktop) with the user's password to `address` (a proxy or a
        server), held until a server's xrdp logs its desktop connected (`xs.DESKTOP_REACHED`). The client
        stays connected: kill it."""
        user = self.users[name]
        xrdp = [LogWatch(s.xrdp_log) for s in self.servers]
        sesman = [LogWatch(s.sesman_log) for s in self.servers]
        command, answer = self.client_command(client_program, address, user.name, password or user.password)
        started = time.monotonic()
        client = subprocess.Popen(
            command,
            env={**os.environ, "DISPLAY": self.display_name, "HOME": str(self.client_home())},
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        assert client.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            client.stdin.write(answer)
        client.stdin.close()
        self.clients.append(client)
        while True:
            reached = [i for i, w in enumerate(xrdp) if xs.DESKTOP_REACHED in w.text()]
            if reached:
                seconds = time.monotonic() - started
                break
            if client.poll() is not None or time.monotonic() - started > timeout_s:
                client.kill()
                client.wait(timeout=10)
                raise AssertionError(
                    f"{name}'s logon at {address} reached no desktop (client exit {client.returncode}):\n"
                    + "\n".join(s.log_tails() for s in self.servers)
                )
            time.sleep(0.02)
        (i,) = reached
        return Logon(self.servers[i], seconds, client, sesman[i].text())

    def client_command(self, program: str, address: str, user: str, password: str) -> tuple[list[str], bytes]:
        """The command line of a full logon by `program`, and what goes to its standard input."""
        if program == "xfreerdp":
            return [
                "xfreerdp",
                f"/v:{address}",
                f"/u:{user}",
                f"/p:{password}",
                "/cert:ignore",
                f"/size:{SIZE}",
                f"/bpp:{BPP}",
            ], b""
        if program == "rdesktop":
            # `-p -`: the password from standard input (one line); then rdesktop asks whether to trust
            # xrdp's self-signed certificate, the first time it sees it (its store is in HOME): yes.
            command = ["rdesktop", "-u", user, "-p", "-", "-g", SIZE, "-a", BPP, address]
            return command, f"{password}\nyes\n".encode()
        raise ValueError(f"no such client: {program!r} (xfreerdp or rdesktop)")

    def client_home(self) -> Path:
        """The clients' HOME: rdesktop keeps the certificates it was told to trust there, not in root's."""
        home = self.harness.root / "client-home"
        home.mkdir(exist_ok=True)
        return home

    def failed_logon(self, address: str, name: str, hold_s: float) -> None:
        """xfreerdp with a wrong password, killed after `hold_s` (xrdp shows its login failure meanwhile)."""
        client = subprocess.Popen(
            [
                "xfreerdp",
                f"/v:{address}",
                f"/u:{self.users[name].name}",
                "/p:not-the-password",
                "/cert:ignore",
            ],
            env={**os.environ, "DISPLAY": self.display_name},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.clients.append(client)
        time.sleep(hold_s)
        client.kill()
        client.wait(timeout=10)

    # Reading the directory and the agents --------------------------------------------------------

    def rows(self, sql: str, *args: object) -> list[dict[str, Any]]:
        with psycopg.connect(self.dsn, row_factory=dict_row, autocommit=True) as conn:
            return conn.execute(sql, args).fetchall()

    def server_rows(self) -> list[dict[str, Any]]:
        return self.rows("SELECT * FROM servers ORDER BY address")

    def server_row(self, server: xs.XrdpServer) -> dict[str, Any]:
        (row,) = self.rows("SELECT * FROM servers WHERE address = %s", server.address)
        return row

    def live_session(self, name: str) -> dict[str, Any] | None:
        rows = self.rows(
            "SELECT * FROM sessions WHERE account_name = %s AND state <> 'ended'", self.users[name].name
        )
        assert len(rows) <= 1, rows  # one account, one live session
        return rows[0] if rows else None

    def live_sessions(self) -> list[dict[str, Any]]:
        return self.rows("SELECT * FROM sessions WHERE state <> 'ended' ORDER BY created_at")

    def session(self, session_id: object) -> dict[str, Any]:
        (row,) = self.rows("SELECT * FROM sessions WHERE id = %s", session_id)
        return row

    def agent_sessions(self, server: xs.XrdpServer) -> dict[str, str]:
        """What the server's agent lists: user -> state."""
        url = self.agents[self.servers.index(server)] + "/sessions"
        answer = httpx.get(url, headers={"Authorization": f"Bearer {AGENT_TOKEN}"}, timeout=5)
        answer.raise_for_status()
        return {s["user"]: s["state"] for s in answer.json()["sessions"]}

    @property
    def broker_http(self) -> str:
        return "http://" + self.harness.supervisor.services["broker0"].address("http")


class Trace:
    """Polls (the directory's state of a user's session, the user's state in an agent's list) every 50 ms
    in a thread, keeping each change: `with Trace(farm, "alice", server) as trace: ...; trace.seen`."""

    def __init__(self, farm: RealFarm, name: str, server: xs.XrdpServer) -> None:
        self.farm, self.name, self.server = farm, name, server
        self.seen: list[tuple[float, str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set():
            live = self.farm.live_session(self.name)
            directory = live["state"] if live else "none"
            agent = self.farm.agent_sessions(self.server).get(self.farm.users[self.name].name, "none")
            if not self.seen or self.seen[-1][1:] != (directory, agent):
                self.seen.append((round(time.monotonic() - started, 2), directory, agent))
            time.sleep(0.05)

    def __enter__(self) -> Trace:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def directory_states(self) -> set[str]:
        return {directory for _, directory, _ in self.seen}


def sesman_display(sesman_text: str) -> str:
    """The display of the desktop sesman made or reconnected, from what it logged for one logon."""
    found = re.findall(r"display :?(\d+)", sesman_text)
    assert found, f"sesman logged no display:\n{sesman_text}"
    return str(found[-1])


def displays_written(farm: RealFarm, name: str) -> list[str]:
    """The display numbers the user's session scripts wrote: one per desktop made, none per reconnect."""
    path = Path(f"/home/{farm.users[name].name}") / xs.DESKTOPS_FILE
    lines = path.read_text().split() if path.exists() else []
    return [line.removeprefix(":").split(".")[0] for line in lines]  # `:10.0` -> `10`


def wait_session(farm: RealFarm, name: str, timeout_s: float = 5) -> dict[str, Any]:
    """The user's live session, once the directory has one."""
    wait_for(lambda: farm.live_session(name), f"{name}'s live session", timeout_s)
    session = farm.live_session(name)
    assert session is not None
    return session


def wait_for(check: Callable[[], object], what: str, timeout_s: float) -> float:
    """Poll `check` every 20 ms until it is truthy (bounded); answers the seconds it took."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout_s, f"{what}: not within {timeout_s} s"
        time.sleep(0.02)
    return time.monotonic() - started


def median_ms(values: list[float]) -> str:
    """`median ms (n=N, min-max)`."""
    low, high = min(values) * 1000, max(values) * 1000
    return f"{statistics.median(values) * 1000:.0f} ms (n={len(values)}, {low:.0f}-{high:.0f})"


def user_processes(name: str) -> list[psutil.Process]:
    return [psutil.Process(pid) for pid in xs.user_pids(name)]


def real_farm(pg_server_url: str, user_names: tuple[str, ...]) -> RealFarm:
    """Start the farm; the caller stops it (`stop()`), also when this raises half-way."""
    farm = RealFarm(Harness(), PROBE)
    try:
        return farm.start_real(pg_server_url, user_names)
    except BaseException:
        farm.stop()
        raise
