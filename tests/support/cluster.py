"""What the fault-injection tests stand on: a PostgreSQL primary with a synchronous streaming standby,
and a supervisor for service processes, both in one temporary directory that cleanup removes.

Everything listens on 127.0.0.1 and free ports. Faults are signals: SIGKILL of every process of a
PostgreSQL cluster (the machine is gone), SIGSTOP/SIGCONT of them (the machine hangs, then comes back),
SIGKILL of a service's process group. `cleanup()` kills whatever is left and `leaked_processes()` says
whether anything the harness started still runs, so every test can assert that nothing leaked.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.postgres import Cluster, free_port, pg_bindir

REPO = Path(__file__).resolve().parents[2]


class HarnessError(RuntimeError):
    """A piece of the cluster under test did not come up or did not go away as expected."""


def make_root(prefix: str = "rdbroker-e2e-") -> Path:
    """A temporary directory the `postgres` user can enter (its clusters live below it)."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    return root


def _cluster_pids(cluster: Cluster) -> list[int]:
    """The postmaster and every process it started (backends, walsender, checkpointer...)."""
    pid = cluster.postmaster_pid()
    if pid is None:
        return []
    try:
        parent = psutil.Process(pid)
        if parent.cwd() != str(cluster.datadir):  # a stale pid file naming someone else's process
            return []
        return [pid, *(child.pid for child in parent.children(recursive=True))]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def _signal_all(pids: Sequence[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


@dataclass
class PgPair:
    """A primary and a synchronous streaming standby (pg_basebackup -R), on two free ports.

    A commit on the primary returns only once the standby has flushed it (synchronous_commit=on
    with synchronous_standby_names='*'), so a promoted standby holds every committed row.
    """

    root: Path
    primary: Cluster = field(init=False)
    standby: Cluster = field(init=False)
    _stopped: list[int] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        for name in ("pg1", "pg2"):
            (self.root / name).mkdir()
        self.primary = Cluster(root=self.root / "pg1")
        self.standby = Cluster(root=self.root / "pg2")

    def start(self) -> PgPair:
        self.primary.extra_conf = (
            "synchronous_standby_names = '*'\nsynchronous_commit = on\nwal_level = replica\n"
            "max_wal_senders = 4\nwal_keep_size = 64MB\n"
        )
        self.primary.init().start()
        self.standby._own()
        self.standby._run(
            str(pg_bindir() / "pg_basebackup"),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.primary.port),
            "-U",
            "postgres",
            "-D",
            str(self.standby.datadir),
            "-R",
            "-X",
            "stream",
            "--no-sync",
        )
        # Once promoted, the standby must not wait for a standby of its own.
        self.standby.configure(
            f"port = {self.standby.port}\nunix_socket_directories = '{self.standby.root}'\n"
            "synchronous_standby_names = ''\n"
        )
        self.standby.start()
        self.wait_sync()
        return self

    def wait_sync(self, timeout_s: float = 30.0) -> None:
        """Wait until the primary reports the standby as its synchronous standby."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with psycopg.connect(f"{self.primary.url}/postgres", connect_timeout=2) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'"
                ).fetchone()
            if row is not None and row[0] >= 1:
                return
            time.sleep(0.1)
        raise HarnessError("the standby never became synchronous")

    def dsn(self, database: str) -> str:
        """The multi-host libpq URL services use: whichever host accepts writes."""
        return (
            f"postgresql://postgres@127.0.0.1:{self.primary.port},127.0.0.1:{self.standby.port}"
            f"/{database}?target_session_attrs=read-write&connect_timeout=2"
        )

    def create_database(self, name: str) -> str:
        with psycopg.connect(f"{self.primary.url}/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def kill_primary(self) -> None:
        """SIGKILL the primary's postmaster and every child: the primary's machine is gone."""
        pids = _cluster_pids(self.primary)
        if not pids:
            raise HarnessError("the primary is not running")
        _signal_all(pids, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.TimeoutExpired):
                psutil.Process(pid).wait(timeout=10)

    def promote_standby(self, timeout_s: float = 30.0) -> None:
        self.standby._run(
            str(pg_bindir() / "pg_ctl"),
            "-D",
            str(self.standby.datadir),
            "-w",
            "-t",
            str(int(timeout_s)),
            "promote",
        )

    def stop_primary(self) -> None:
        """SIGSTOP every process of the primary: it hangs, its sockets stay open."""
        self._stopped = _cluster_pids(self.primary)
        if not self._stopped:
            raise HarnessError("the primary is not running")
        _signal_all(self._stopped, signal.SIGSTOP)

    def continue_primary(self) -> None:
        _signal_all(self._stopped, signal.SIGCONT)
        self._stopped = []

    def pids(self) -> list[int]:
        return _cluster_pids(self.primary) + _cluster_pids(self.standby)

    def destroy_processes(self) -> None:
        if self._stopped:
            self.continue_primary()
        for cluster in (self.primary, self.standby):
            pids = _cluster_pids(cluster)
            _signal_all(pids, signal.SIGKILL)
            for pid in pids:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.TimeoutExpired):
                    psutil.Process(pid).wait(timeout=10)

    def destroy(self) -> None:
        self.destroy_processes()
        for cluster in (self.primary, self.standby):
            shutil.rmtree(cluster.root, ignore_errors=True)


# Service processes ---------------------------------------------------------------------------------


def tcp_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def grpc_serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=1.0
            )
        except grpc.RpcError:
            return False
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


@dataclass
class Service:
    """One supervised process: its own process group, output in `log`, working directory in the root."""

    name: str
    args: list[str]
    log: Path
    popen: subprocess.Popen[bytes]
    ports: dict[str, int]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def address(self, port_name: str) -> str:
        return f"127.0.0.1:{self.ports[port_name]}"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def kill(self) -> None:
        """SIGKILL the whole process group and reap it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)


@dataclass
class Supervisor:
    """Starts service processes with `sys.executable`, waits for readiness, kills them all at the end."""

    root: Path
    env: dict[str, str] = field(default_factory=dict)
    services: dict[str, Service] = field(default_factory=dict)
    started_pids: list[int] = field(default_factory=list)

    def start(
        self,
        name: str,
        args: Sequence[str],
        *,
        ports: dict[str, int] | None = None,
        grpc_ready: str | None = None,
        tcp_ready: Sequence[str] = (),
        timeout_s: float = 60.0,
        env: dict[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> Service:
        """Run `python ARGS...` (after `prefix`, e.g. an nsenter into a server's namespaces); ready when
        `grpc_ready` (a port name) answers SERVING and every `tcp_ready` port accepts connections."""
        if name in self.services and self.services[name].alive():
            raise HarnessError(f"{name} is already running")
        log = self.root / f"{name}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                [*prefix, sys.executable, *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                env=self._env(env),
                start_new_session=True,
            )
        service = Service(name, list(args), log, popen, dict(ports or {}))
        self.services[name] = service
        self.started_pids.append(popen.pid)
        self.wait_ready(service, grpc_ready, tcp_ready, timeout_s)
        return service

    def wait_ready(
        self, service: Service, grpc_ready: str | None, tcp_ready: Sequence[str], timeout_s: float
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not service.alive():
                code = service.popen.returncode
                raise HarnessError(
                    f"{service.name} exited with {code} before it was ready:\n{service.log_tail()}"
                )
            grpc_ok = grpc_ready is None or grpc_serving(service.address(grpc_ready))
            if grpc_ok and all(tcp_open("127.0.0.1", service.ports[p]) for p in tcp_ready):
                return
            time.sleep(0.1)
        service.kill()
        raise HarnessError(f"{service.name} not ready within {timeout_s} s:\n{service.log_tail()}")

    def run(self, name: str, args: Sequence[str], timeout_s: float = 120.0) -> str:
        """Run a one-shot command (migrate, apply) to completion; answers its output, raises on failure."""
        done = subprocess.run(
            [sys.executable, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            cwd=self.root,
            env=self._env(None),
            timeout=timeout_s,
            check=False,
        )
        (self.root / f"{name}.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            raise HarnessError(f"{name} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def _env(self, extra: dict[str, str] | None) -> dict[str, str]:
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("RDBROKER_")}
        return {
            **inherited,
            "PYTHONPATH": str(REPO),
            "RDBROKER_LOG_FORMAT": "text",
            **self.env,
            **(extra or {}),
        }

    def kill(self, name: str) -> None:
        self.services[name].kill()

    def stop_all(self) -> None:
        for service in self.services.values():
            service.kill()


def new_port() -> int:
    return free_port()


@dataclass
class Harness:
    """The temporary root, the PostgreSQL pair (optional) and the supervisor, torn down together."""

    root: Path = field(default_factory=make_root)
    pg: PgPair | None = None
    supervisor: Supervisor = field(init=False)
    _pg_pids: list[int] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.supervisor = Supervisor(self.root / "services")
        self.supervisor.root.mkdir()

    def start_pg(self) -> PgPair:
        self.pg = PgPair(self.root).start()
        self.remember_pg_pids()
        return self.pg

    def remember_pg_pids(self) -> None:
        """Note every PostgreSQL process now running, so the leak check covers them too."""
        if self.pg is not None:
            self._pg_pids = sorted({*self._pg_pids, *self.pg.pids()})

    def started_pids(self) -> list[int]:
        return [*self.supervisor.started_pids, *self._pg_pids]

    def cleanup(self) -> None:
        """Kill everything, then remove the root. With $RDBROKER_E2E_LOGS set, the service and
        PostgreSQL logs are copied there first (for looking into a failed run)."""
        self.remember_pg_pids()
        self.supervisor.stop_all()
        if self.pg is not None:
            self.pg.destroy_processes()
        keep = os.environ.get("RDBROKER_E2E_LOGS")
        if keep:
            target = Path(keep) / self.root.name
            target.mkdir(parents=True, exist_ok=True)
            for log in [*self.supervisor.root.glob("*.log"), *self.root.glob("pg*/log")]:
                shutil.copy(log, target / (log.name if log.name != "log" else f"{log.parent.name}.log"))
        if self.pg is not None:
            self.pg.destroy()
        shutil.rmtree(self.root, ignore_errors=True)

    def leaked_processes(self) -> list[str]:
        """Processes the harness started (or that work inside its root) that still run."""
        leaks: list[str] = []
        for pid in self.started_pids():
            with contextlib.suppress(psutil.NoSuchProcess):
                proc = psutil.Process(pid)
                if proc.status() != psutil.STATUS_ZOMBIE:
                    leaks.append(f"{pid} {' '.join(proc.cmdline())}")
        root = str(self.root)
        for proc in psutil.process_iter(["pid", "cwd", "cmdline"]):
            cwd = proc.info.get("cwd") or ""
            if cwd == root or cwd.startswith(root + os.sep):
                leaks.append(f"{proc.info['pid']} {' '.join(proc.info.get('cmdline') or [])} (cwd {cwd})")
        return leaks
