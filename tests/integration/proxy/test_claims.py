"""Claims through the real proxy and broker processes on PostgreSQL: a connection that carried fewer
than the pool's junk_bytes from the server ends its claim at once (`abandoned`); a closed unconfirmed
claim keeps its user's affinity but holds no capacity; one client address may hold at most
`max_routing_per_client` connections in the routing step."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg
import pytest

from rdbroker_proto.v1 import broker_pb2 as pb
from rdbroker_proto.v1.broker_pb2_grpc import BrokerStub
from rdbroker_rdp import build_connection_request
from rdbroker_rdp.fakeserver import FakeRdpServer
from tests.integration.broker.processes import BrokerProcess, running_broker
from tests.integration.proxy.test_with_broker import cli
from tests.unit.proxy.support import (
    LOGON,
    STEP_TIMEOUT_S,
    close,
    handshake,
    open_client,
    running_proxy,
    wait_until,
)

JUNK_BYTES = 2048  # the pool's default
JUNK_CONNECTIONS = 500
JUNK_CONCURRENCY = 4
JUNK_BOUND_S = 180.0  # the whole run, on a loaded 2-core machine (it takes a fraction of that)


@dataclass
class ClaimFarm:
    servers: list[FakeRdpServer]
    broker: BrokerProcess
    dsn: str

    async def sessions(self, user: str) -> list[pb.Session]:
        async with grpc.aio.insecure_channel(self.broker.grpc_address) as channel:
            answer = await BrokerStub(channel).LookupUserSessions(
                pb.LookupUserSessionsRequest(user=user, include_ended=True), timeout=10
            )
        return list(answer.sessions)

    async def wait_sessions(self, user: str, *states: int) -> list[pb.Session]:
        """The user's sessions once every one is in one of `states` (bounded polling)."""
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while True:
            found = await self.sessions(user)
            if found and all(s.state in states for s in found):
                return found
            assert time.monotonic() < deadline, found
            await asyncio.sleep(0.05)

    def ends(self, user: str) -> list[tuple[str, str]]:
        """(state, end_reason) of the user's sessions."""
        with psycopg.connect(self.dsn) as conn:
            query = 'SELECT state, end_reason FROM sessions WHERE "user" = %s ORDER BY created_at'
            return [(state, reason) for state, reason in conn.execute(query, (user,))]

    JUNK = "(\"user\" LIKE 'junk%%' OR \"user\" = '')"

    def live_junk(self) -> int:
        with psycopg.connect(self.dsn) as conn:
            row = conn.execute(
                f"SELECT count(*) FROM sessions WHERE {self.JUNK} AND state <> 'ended'"
            ).fetchone()
        assert row is not None
        return int(row[0])

    def junk_ends(self) -> dict[str, int]:
        with psycopg.connect(self.dsn) as conn:
            query = f"SELECT end_reason, count(*) FROM sessions WHERE {self.JUNK} GROUP BY end_reason"
            return dict(conn.execute(query).fetchall())

    def counters(self) -> dict[str, tuple[int, int]]:
        """(live_sessions, held_sessions) of every server."""
        with psycopg.connect(self.dsn) as conn:
            rows = conn.execute("SELECT address, live_sessions, held_sessions FROM servers").fetchall()
        return {address: (live, held) for address, live, held in rows}


@pytest.fixture
async def claim_farm(pg_database_url: str, tmp_path: Path) -> AsyncIterator[ClaimFarm]:
    """Two echoing servers of max_sessions 3 (default pool: junk_bytes 2048) and one broker."""
    async with FakeRdpServer(mode="echo") as a, FakeRdpServer(mode="echo") as b:
        farm_file = tmp_path / "farm.yaml"
        farm_file.write_text(
            "pools:\n  - name: default\n    default: true\n    disconnect_timeout: 1h\nservers:\n"
            + "".join(f"  - address: {s.address}\n    pool: default\n    max_sessions: 3\n" for s in (a, b)),
            encoding="utf-8",
        )
        cli("migrate", "--database-url", pg_database_url)
        cli("apply", "-f", str(farm_file), "--database-url", pg_database_url)
        async with running_broker(pg_database_url) as broker:
            yield ClaimFarm([a, b], broker, pg_database_url)


async def logon(port: int, user: str, *, keep_open: bool = False) -> asyncio.StreamWriter:
    """A client that logs on: the first packet, then LOGON echoed back; closed unless `keep_open`."""
    reader, writer, _ = await handshake(port, build_connection_request(cookie=user, requested_protocols=3))
    writer.write(LOGON)
    async with asyncio.timeout(STEP_TIMEOUT_S):
        assert await reader.readexactly(len(LOGON)) == LOGON
    if not keep_open:
        await close(writer)
    return writer


async def junk(port: int, cookie: str | None) -> None:
    """A port scanner's or another balancer's check: a bare Connection Request, the Confirm, close."""
    reader, writer = await open_client(port)
    try:
        writer.write(build_connection_request(cookie=cookie))
        async with asyncio.timeout(STEP_TIMEOUT_S):
            header = await reader.readexactly(4)
            confirm = header + await reader.readexactly(int.from_bytes(header[2:4], "big") - 4)
        assert len(confirm) < JUNK_BYTES
    finally:
        await close(writer)


def landed(farm: ClaimFarm, user: str) -> list[str]:
    """The servers the user's first packets reached, in order."""
    packet = build_connection_request(cookie=user, requested_protocols=3)
    return [s.address for s in farm.servers for p in s.first_packets if p == packet]


async def settled(proxy: object) -> None:
    await wait_until(lambda: not proxy.context.connections)  # type: ignore[attr-defined]
    await wait_until(lambda: proxy.broker.pending_reports == 0)  # type: ignore[attr-defined]


async def test_a_bare_connection_request_then_close_ends_abandoned_and_holds_nothing(
    claim_farm: ClaimFarm,
) -> None:
    before = claim_farm.counters()
    async with running_proxy([claim_farm.broker.grpc_address]) as proxy:
        await junk(proxy.port, "scanner")
        await junk(proxy.port, None)  # nmap's scripts send no cookie
        await settled(proxy)
    await claim_farm.wait_sessions("scanner", pb.SESSION_STATE_ENDED)
    assert claim_farm.ends("scanner") == [("ended", "abandoned")]
    await wait_until(lambda: [state for state, _ in claim_farm.ends("")] == ["ended"])  # reports on the way
    assert claim_farm.ends("") == [("ended", "abandoned")]
    assert claim_farm.counters() == before


async def test_a_logon_keeps_its_affinity_but_holds_no_capacity(claim_farm: ClaimFarm) -> None:
    async with running_proxy([claim_farm.broker.grpc_address]) as proxy:
        await logon(proxy.port, "alice")
        await settled(proxy)
        [claim] = await claim_farm.wait_sessions("alice", pb.SESSION_STATE_DISCONNECTED)
        assert not claim.confirmed
        home = claim.server_address
        assert claim_farm.counters()[home] == (1, 0)  # live (affinity), holding nothing
        # The next user goes to `home` too: alice's closed claim counts for nothing there (counted,
        # it would make the other, empty server the better one).
        held = [await logon(proxy.port, "bob", keep_open=True)]
        assert landed(claim_farm, "bob") == [home]
        # Two more users, connected: `home` holds two, the other server one.
        held += [await logon(proxy.port, user, keep_open=True) for user in ("carol", "dave")]
        for user in ("bob", "carol", "dave"):
            await claim_farm.wait_sessions(user, pb.SESSION_STATE_ACTIVE)
        assert sorted(held_by for _, held_by in claim_farm.counters().values()) == [1, 2]
        assert claim_farm.counters()[home] == (3, 2)
        # alice comes back to her server, though the other one carries less.
        await logon(proxy.port, "alice")
        assert landed(claim_farm, "alice") == [home, home]
        for writer in held:
            await close(writer)
        await settled(proxy)
    [again] = await claim_farm.wait_sessions("alice", pb.SESSION_STATE_DISCONNECTED)
    assert again.session_id == claim.session_id


async def test_a_full_farm_stays_usable_after_500_junk_connections(claim_farm: ClaimFarm) -> None:
    """Two servers of max_sessions 3, one holding an open logon: 500 junk connections (four at a
    time, with and without cookies) leave nothing live and nothing held; a new user is placed."""
    async with running_proxy(
        [claim_farm.broker.grpc_address], route_timeout_s=10.0, max_routing_per_client=0
    ) as proxy:
        held = await logon(proxy.port, "worker", keep_open=True)
        await claim_farm.wait_sessions("worker", pb.SESSION_STATE_ACTIVE)
        before = claim_farm.counters()
        assert sorted(before.values()) == [(0, 0), (1, 1)]
        queue = list(range(JUNK_CONNECTIONS))
        refused = 0

        async def worker() -> None:
            nonlocal refused
            while queue:
                n = queue.pop()
                while True:
                    try:
                        await junk(proxy.port, f"junk{n:03d}" if n % 5 else None)
                        break
                    except (asyncio.IncompleteReadError, ConnectionError):
                        # Refused: every place taken by junk whose close is not yet reported (a
                        # claim holds capacity while its connection is open). Tried again.
                        refused += 1
                        await asyncio.sleep(0.02)

        started = time.monotonic()
        async with asyncio.timeout(JUNK_BOUND_S), asyncio.TaskGroup() as tg:
            for _ in range(JUNK_CONCURRENCY):
                tg.create_task(worker())
        elapsed = time.monotonic() - started
        await wait_until(lambda: len(proxy.context.connections) == 1)
        await wait_until(lambda: claim_farm.live_junk() == 0)
        ends = claim_farm.junk_ends()
        logging.getLogger(__name__).info(
            "500 junk connections: %.1f s, %s, refused %d", elapsed, ends, refused
        )
        assert set(ends) <= {"abandoned", "closed_before_open", "client_closed"}, ends
        assert sum(ends.values()) == JUNK_CONNECTIONS
        assert claim_farm.counters() == before
        await logon(proxy.port, "newcomer")
        [placed] = await claim_farm.wait_sessions("newcomer", pb.SESSION_STATE_DISCONNECTED)
        assert placed.server_address in before
        await close(held)
        await settled(proxy)


async def test_one_client_address_holds_at_most_max_routing_per_client_connections_in_routing(
    claim_farm: ClaimFarm, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_proxy([claim_farm.broker.grpc_address], first_packet_timeout_s=30.0) as proxy:
        assert proxy.settings.max_routing_per_client == 20  # the default
        silent = [await open_client(proxy.port) for _ in range(20)]  # never send their first packet
        await wait_until(lambda: proxy.context.routing_per_client.get("127.0.0.1") == 20)
        with caplog.at_level(logging.WARNING, logger="rdbroker_proxy.connection"):
            over = [await open_client(proxy.port) for _ in range(2)]
            for reader, writer in over:
                async with asyncio.timeout(STEP_TIMEOUT_S):
                    assert await reader.read() == b""  # a clean close (FIN), not a reset
                await close(writer)
        assert proxy.context.refused_over_client_limit == 2
        limit_lines = [r for r in caplog.records if "max_routing_per_client" in r.getMessage()]
        assert len(limit_lines) == 1  # logged at most once per interval
        assert len(proxy.context.connections) == 20  # the silent ones are still there
        # Another address gets through, to the broker and a server.
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port, local_addr=("127.0.0.2", 0))
        writer.write(build_connection_request(cookie="elsewhere", requested_protocols=3))
        async with asyncio.timeout(STEP_TIMEOUT_S):
            assert (await reader.readexactly(4))[:2] == b"\x03\x00"
        await close(writer)
        # Once the silent ones are gone, the address is welcome again.
        for _, writer in silent:
            await close(writer)
        await wait_until(lambda: "127.0.0.1" not in proxy.context.routing_per_client)
        await logon(proxy.port, "back")
        await settled(proxy)
    await claim_farm.wait_sessions("back", pb.SESSION_STATE_DISCONNECTED)
