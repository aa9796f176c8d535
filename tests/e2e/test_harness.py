"""The fault-injection harness tested on its own: PostgreSQL failover keeps committed rows, a stopped
primary hangs and comes back, and cleanup leaves no process and no directory behind."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.support.cluster import Harness, HarnessError, tcp_open
from tests.support.postgres import free_port
from tests.support.rdp_host import CONFIRM, LOGON_BYTES
from tests.support.storm import (
    LoginStorm,
    StormSettings,
    failed,
    failed_after_retry,
    first_servers,
    recovery_s,
    summary,
    wrong_server,
)


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    try:
        yield h
    finally:
        h.cleanup()
    assert h.leaked_processes() == []
    assert not h.root.exists()


def insert_rows(dsn: str, first: int, count: int) -> None:
    """One transaction (one synchronous commit) per row."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for n in range(first, first + count):
            conn.execute("INSERT INTO t (n) VALUES (%s)", (n,))


def read_rows(dsn: str) -> list[int]:
    with psycopg.connect(dsn) as conn:
        return [row[0] for row in conn.execute("SELECT n FROM t ORDER BY n").fetchall()]


@pytest.mark.timeout(120)
def test_failover_to_the_synchronous_standby_keeps_every_committed_row(harness: Harness) -> None:
    pg = harness.start_pg()
    dsn = pg.create_database("failover")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (n integer PRIMARY KEY)")
    insert_rows(dsn, 0, 200)
    # (The `postgres` database: the new one may be flushed on the standby but not yet replayed.)
    with psycopg.connect(f"{pg.standby.url}/postgres") as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)

    pg.kill_primary()
    assert pg.primary.postmaster_pid() is None or not tcp_open("127.0.0.1", pg.primary.port)
    with pytest.raises(psycopg.OperationalError):  # nothing accepts writes until the promotion
        psycopg.connect(dsn).close()
    pg.promote_standby()

    assert read_rows(dsn) == list(range(200))
    insert_rows(dsn, 200, 10)  # the promoted standby commits without waiting for a standby of its own
    assert read_rows(dsn) == list(range(210))


@pytest.mark.timeout(120)
def test_a_stopped_primary_hangs_then_recovers(harness: Harness) -> None:
    pg = harness.start_pg()
    dsn = pg.create_database("stopped")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (n integer PRIMARY KEY)")
    insert_rows(dsn, 0, 5)

    pg.stop_primary()
    with pytest.raises(psycopg.OperationalError):  # connect_timeout=2 in the DSN bounds the hang
        psycopg.connect(dsn).close()
    pg.continue_primary()

    insert_rows(dsn, 5, 5)
    assert read_rows(dsn) == list(range(10))


@pytest.mark.timeout(60)
def test_supervisor_starts_kills_and_cleans_up() -> None:
    h = Harness()
    try:
        port = free_port()
        host = h.supervisor.start(
            "host",
            ["-m", "tests.support.rdp_host", "--listen", f"127.0.0.1:{port}"],
            ports={"rdp": port},
            tcp_ready=["rdp"],
        )
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(bytes.fromhex("030000130ee000000000000100080003000000"))
            assert sock.recv(19) == bytes.fromhex("030000130ed000001234000200080000000000")
            sock.sendall(b"WHO?\n")
            answer = sock.makefile("rb").readline()
            assert answer.rstrip() == f"SERVER 127.0.0.1:{port}".encode()
            assert len(CONFIRM) + len(answer) == LOGON_BYTES
        other = h.supervisor.start(
            "other", ["-m", "tests.support.rdp_host", "--listen", f"127.0.0.1:{free_port()}"]
        )
        assert h.leaked_processes() != []  # the check sees running processes
        h.supervisor.kill("host")
        assert not host.alive()
        assert not tcp_open("127.0.0.1", port)
        assert other.alive()
        with pytest.raises(HarnessError, match="exited"):
            h.supervisor.start("broken", ["-c", "raise SystemExit(3)"], ports={"x": 1}, tcp_ready=["x"])
        log = Path(host.log)
        assert "accepted cookie=" in log.read_text()
    finally:
        h.cleanup()
    assert h.leaked_processes() == []
    assert not h.root.exists()


@pytest.mark.timeout(60)
async def test_storm_driver_records_landing_failure_and_retry() -> None:
    """Two terminal-server stand-ins play the two proxies; one is killed mid-storm."""
    h = Harness()
    try:
        ports = [free_port(), free_port()]
        for i, port in enumerate(ports):
            h.supervisor.start(
                f"host{i}",
                ["-m", "tests.support.rdp_host", "--listen", f"127.0.0.1:{port}"],
                ports={"rdp": port},
                tcp_ready=["rdp"],
            )
        addresses = [f"127.0.0.1:{p}" for p in ports]
        storm = LoginStorm(addresses, StormSettings(users=6, hold_s=(0.05, 0.1), pause_s=(0.2, 0.4)))
        await storm.logon_all_once()
        assert all(a.ok and a.server == a.proxy for a in storm.attempts)
        homes = first_servers(storm.attempts)
        assert set(homes) == set(storm.users)

        async def kill_later() -> float:
            await asyncio.sleep(1.0)
            h.supervisor.kill("host0")
            return time.monotonic()

        async with asyncio.TaskGroup() as tg:
            tg.create_task(storm.run(3.0))
            killed = tg.create_task(kill_later())
        fault_at = killed.result()
        after = [a for a in storm.attempts if a.started > fault_at]
        assert after
        assert all(a.server == addresses[1] for a in after if a.ok)
        # Users of host0 were cut while holding or failed once (the driver records both)...
        hit = [a for a in storm.attempts if a.ended >= fault_at and (not a.ok or a.dropped)]
        assert hit
        assert all(a.proxy == addresses[0] for a in failed(storm.attempts))
        assert failed_after_retry(after) == []  # ...and their retry through the other address worked
        moved = wrong_server(storm.attempts, homes)
        assert moved  # host0's users landed on host1: "wrong" unless host0 is declared dead
        assert wrong_server(storm.attempts, homes, dead=frozenset({addresses[0]})) == []
        assert 0 < recovery_s(storm.attempts, fault_at) < 3.0
        assert "failed=" in summary(storm.attempts, fault_at)
    finally:
        h.cleanup()
    assert h.leaked_processes() == []
