"""A real PostgreSQL for the tests: the local server, or a throwaway cluster started from the binaries.

`server_url()` answers a libpq URL of a reachable server (no database part). It tries
`RDBROKER_TEST_DATABASE_URL` (default postgresql://postgres@127.0.0.1:5432) and, when nothing answers
there, starts a throwaway cluster with the installed `initdb`/`pg_ctl` in a temporary directory on a free
port (as the `postgres` user when we run as root, since initdb refuses root). `Cluster` is also what the
fault-injection tests use to build a primary and a standby.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432"


def pg_bindir() -> Path:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
    for found in reversed(candidates):
        if Path(found, "initdb").exists():
            return Path(found)
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    raise RuntimeError("no PostgreSQL server binaries (initdb) found; install postgresql")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reachable(url: str, timeout: float = 2.0) -> bool:
    try:
        with psycopg.connect(f"{url}/postgres", connect_timeout=max(1, int(timeout))):
            return True
    except psycopg.Error:
        return False


def _demote() -> tuple[list[str], int | None, int | None]:
    """The command prefix and ids to run server binaries as, given who we are."""
    if os.geteuid() != 0:
        return [], None, None
    user = pwd.getpwnam("postgres")
    return ["runuser", "-u", "postgres", "--"], user.pw_uid, user.pw_gid


@dataclass
class Cluster:
    """A PostgreSQL cluster in a temporary directory, on 127.0.0.1 and a free port."""

    port: int = field(default_factory=free_port)
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="rdbroker-pg-")))
    extra_conf: str = ""

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        prefix, _, _ = _demote()
        return subprocess.run([*prefix, *args], check=check, capture_output=True, text=True, timeout=120)

    def _own(self) -> None:
        _, uid, gid = _demote()
        if uid is not None and gid is not None:
            for path in [self.root, *self.root.rglob("*")]:
                os.chown(path, uid, gid)

    def init(self) -> Cluster:
        bindir = pg_bindir()
        self._own()
        self._run(
            str(bindir / "initdb"),
            "-D",
            str(self.datadir),
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
            "-E",
            "UTF8",
        )
        self.configure(
            f"listen_addresses = '127.0.0.1'\nport = {self.port}\nunix_socket_directories = '{self.root}'\n"
            "fsync = off\nmax_connections = 200\n" + self.extra_conf
        )
        return self

    def configure(self, text: str) -> None:
        with open(self.datadir / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write("\n" + text + "\n")

    def start(self, wait_s: float = 30.0) -> Cluster:
        bindir = pg_bindir()
        self._own()
        self._run(
            str(bindir / "pg_ctl"),
            "-D",
            str(self.datadir),
            "-l",
            str(self.root / "log"),
            "-w",
            "-t",
            str(int(wait_s)),
            "start",
        )
        return self

    def stop(self, mode: str = "fast") -> None:
        if self.datadir.exists():
            self._run(str(pg_ctl_path()), "-D", str(self.datadir), "-m", mode, "-w", "stop", check=False)

    def postmaster_pid(self) -> int | None:
        pidfile = self.datadir / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int(pidfile.read_text().splitlines()[0])
        return None

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def pg_ctl_path() -> Path:
    return pg_bindir() / "pg_ctl"


_throwaway: Cluster | None = None


def server_url() -> str:
    """A reachable server's URL: the configured/local one, or a throwaway cluster started once."""
    global _throwaway
    url = os.environ.get("RDBROKER_TEST_DATABASE_URL", DEFAULT_URL).rstrip("/")
    if reachable(url):
        return url
    if _throwaway is None:
        _throwaway = Cluster().init().start()
    return _throwaway.url


def stop_throwaway() -> None:
    global _throwaway
    if _throwaway is not None:
        _throwaway.destroy()
        _throwaway = None


def create_database(base_url: str, prefix: str = "rdbroker_test") -> str:
    """Create a fresh, uniquely named database; answers its libpq URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{base_url}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{base_url}/{name}"


def drop_database(url: str) -> None:
    base, _, name = url.rpartition("/")
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def sqlalchemy_url(libpq_url: str) -> str:
    """postgresql://... -> postgresql+psycopg://... (the driver SQLAlchemy should use)."""
    return libpq_url.replace("postgresql://", "postgresql+psycopg://", 1)


@contextlib.contextmanager
def fresh_database(prefix: str = "rdbroker_test") -> Iterator[str]:
    url = create_database(server_url(), prefix)
    try:
        yield url
    finally:
        for _ in range(3):
            try:
                drop_database(url)
                break
            except psycopg.Error:
                time.sleep(0.5)
