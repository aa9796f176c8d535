"""State that heals, through the real proxy with a user's connection held open.

- A throwaway PostgreSQL cluster is stopped for 25 s (longer than the proxies' silence window,
  3 x 5 s). The user keeps working, and their session stays active in the directory: the broker
  judges no proxy silent on time it could not hear it.
- The only broker a proxy knows hangs (SIGSTOP) for 20 s while another broker, which hears the
  database all along, sweeps: it rightly finds the proxy silent and marks the session disconnected;
  the proxy's first heartbeat after the SIGCONT lists the connection and the session is active again.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from rdbroker_rdp import build_connection_request
from rdbroker_rdp.fakeserver import FakeRdpServer
from tests.integration.broker.processes import running_broker
from tests.integration.proxy.test_with_broker import declare_farm
from tests.support.postgres import Cluster
from tests.unit.proxy.support import LOGON, close, handshake, running_proxy, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

OUTAGE_S = 25.0
AFTER_S = 25.0  # watched after the database is back: longer than the silence window and a sweep
ALICE = build_connection_request(cookie="alice", requested_protocols=3)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """Our own PostgreSQL (never the shared one on 5432: other tests use it)."""
    cluster = Cluster().init().start()
    try:
        yield cluster
    finally:
        cluster.destroy()


def session_rows(url: str, user: str) -> list[tuple[str, str, str]]:
    with psycopg.connect(url, autocommit=True, connect_timeout=2) as conn:
        rows = conn.execute(
            'SELECT id, state, end_reason FROM sessions WHERE "user" = %s ORDER BY created_at', (user,)
        ).fetchall()
    return [(r[0], r[1], r[2]) for r in rows]


async def work(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    """The user is still working: a round trip through the proxy and the server (the first one a
    logon's worth of bytes, so the broker keeps the session when the connection closes)."""
    message = LOGON if n == 0 else f"keystroke {n}\n".encode()
    writer.write(message)
    async with asyncio.timeout(5):
        assert await reader.readexactly(len(message)) == message


async def test_a_25_s_database_outage_leaves_a_working_users_session_active(
    cluster: Cluster, tmp_path: Path
) -> None:
    with psycopg.connect(f"{cluster.url}/postgres", autocommit=True) as conn:
        conn.execute('CREATE DATABASE "rdbroker"')
    url = f"{cluster.url}/rdbroker"
    async with FakeRdpServer(mode="echo") as server:
        declare_farm(url, tmp_path, server)
        # The broker's defaults: heartbeats every 5 s, silent after 3 missed. It sweeps every second.
        async with (
            running_broker(url, "--sweep-interval-s", "1") as broker,
            running_proxy([broker.grpc_address], heartbeat_interval_s=5.0) as proxy,
        ):
            reader, writer, _ = await handshake(proxy.port, ALICE)
            await work(reader, writer, 0)
            await wait_until(lambda: [r[1] for r in session_rows(url, "alice")] == ["active"])
            [(session_id, _, _)] = session_rows(url, "alice")

            cluster.stop("fast")
            stopped_at = time.monotonic()
            n = 1
            while time.monotonic() - stopped_at < OUTAGE_S:
                await work(reader, writer, n)  # the splice needs no database
                n += 1
                await asyncio.sleep(1.0)
            cluster.start()
            back_at = time.monotonic()

            seen: list[tuple[float, str, str]] = []
            while time.monotonic() - back_at < AFTER_S:
                await work(reader, writer, n)
                n += 1
                with_db = session_rows(url, "alice")
                seen += [(round(time.monotonic() - back_at, 1), state, why) for _, state, why in with_db]
                await asyncio.sleep(0.5)
            assert {(state, why) for _, state, why in seen} == {("active", "")}, seen
            assert session_rows(url, "alice") == [(session_id, "active", "")]

            # The user leaves and comes back: the same session, on the same server.
            await close(writer)
            await wait_until(lambda: [r[1] for r in session_rows(url, "alice")] == ["disconnected"])
            reader, writer, _ = await handshake(proxy.port, ALICE)
            await work(reader, writer, n)
            await close(writer)
            assert [r[0] for r in session_rows(url, "alice")] == [session_id]
            assert server.first_packets == [ALICE, ALICE]


async def test_a_session_marked_disconnected_by_a_silence_sweep_is_revived_by_the_next_heartbeat(
    pg_database_url: str, tmp_path: Path
) -> None:
    url = pg_database_url
    async with FakeRdpServer(mode="echo") as server:
        declare_farm(url, tmp_path, server)
        async with (
            running_broker(url, "--sweep-interval-s", "1") as sweeper,
            running_broker(url, "--sweep-interval-s", "3600") as hung,
            running_proxy([hung.grpc_address], heartbeat_interval_s=5.0, report_timeout_s=1.0) as proxy,
        ):
            assert sweeper.grpc_address != hung.grpc_address
            reader, writer, _ = await handshake(proxy.port, ALICE)
            await work(reader, writer, 0)
            await wait_until(lambda: [r[1] for r in session_rows(url, "alice")] == ["active"])
            [(session_id, _, _)] = session_rows(url, "alice")

            hung.process.send_signal(signal.SIGSTOP)
            try:
                n = 1
                stopped_at = time.monotonic()
                while session_rows(url, "alice") != [(session_id, "disconnected", "proxy_silent")]:
                    assert time.monotonic() - stopped_at < 40, session_rows(url, "alice")
                    await work(reader, writer, n)
                    n += 1
                    await asyncio.sleep(0.5)
            finally:
                hung.process.send_signal(signal.SIGCONT)
            continued_at = time.monotonic()
            while session_rows(url, "alice") != [(session_id, "active", "")]:
                # The proxy retries a failed heartbeat within a few seconds (its pause doubles up to the
                # 5 s interval), and that heartbeat lists the open connection.
                assert time.monotonic() - continued_at < 15, session_rows(url, "alice")
                await work(reader, writer, n)
                n += 1
                await asyncio.sleep(0.5)
            await close(writer)
