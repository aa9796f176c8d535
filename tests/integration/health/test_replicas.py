"""Two health replicas (processes) against the real broker: one prober per server; SIGKILL one, and its
servers are probed by the other within 3 intervals. Probes are counted at the fake RDP servers."""

from __future__ import annotations

import asyncio
import contextlib
import time

from rdbroker_rdp.fakeserver import FakeRdpServer
from tests.integration.health.support import Server, real_broker
from tests.support.postgres import free_port

INTERVAL_S = 0.5
JITTER = 0.1
LEASE_MS = 750  # 1.5 intervals, renewed every 250 ms


async def test_two_replicas_one_killed(pg_database_url: str) -> None:
    async with contextlib.AsyncExitStack() as stack:
        servers = [await stack.enter_async_context(FakeRdpServer(mode="sink")) for _ in range(4)]
        broker = await stack.enter_async_context(
            real_broker(
                pg_database_url, [Server(s.address) for s in servers], interval_s=INTERVAL_S, timeout_s=0.3
            )
        )
        replicas = []
        for name in ("health-a", "health-b"):
            port = free_port()
            service = await asyncio.to_thread(
                broker.supervisor.start,
                name,
                ["-m", "rdbroker_health", "--broker", broker.address, "--grpc-listen", f"127.0.0.1:{port}"],
                ports={"grpc": port},
                grpc_ready="grpc",
                env={
                    "RDBROKER_REPLICA_ID": name,
                    "RDBROKER_LEASE_MS": str(LEASE_MS),
                    "RDBROKER_REPORT_BATCH_S": "0.05",
                    "RDBROKER_RPC_TIMEOUT_S": "1",
                },
            )
            replicas.append(service)

        # Steady state: each replica holds two servers.
        deadline = time.monotonic() + 30
        while True:
            held = await broker.lease_holders()
            if len(held) == 4 and sorted(held.values()) == ["health-a", "health-a", "health-b", "health-b"]:
                break
            assert time.monotonic() < deadline, held
            await asyncio.sleep(0.1)

        # Over 6 intervals one prober makes at most 6/(1-jitter)+1 probes per server; two would make ~12.
        before = [s.accepted for s in servers]
        await asyncio.sleep(6 * INTERVAL_S)
        counts = [s.accepted - n for s, n in zip(servers, before, strict=True)]
        assert all(1 <= c <= 8 for c in counts), counts

        a_servers = [s for s in servers if held[s.address] == "health-a"]
        await asyncio.to_thread(replicas[0].kill)  # SIGKILL: no goodbye to the broker
        killed = time.monotonic()
        seen = {s.address: s.accepted for s in a_servers}
        reprobed: dict[str, float] = {}
        while len(reprobed) < len(a_servers) and time.monotonic() - killed < 15:
            for s in a_servers:
                if s.address not in reprobed and s.accepted > seen[s.address]:
                    reprobed[s.address] = time.monotonic() - killed
            await asyncio.sleep(0.01)
        assert len(reprobed) == len(a_servers), reprobed
        assert max(reprobed.values()) <= 3 * INTERVAL_S, reprobed
        assert set((await broker.lease_holders()).values()) == {"health-b"}
