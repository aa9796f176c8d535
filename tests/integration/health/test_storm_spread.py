"""A logon storm spreads evenly although the servers' agents keep reporting the same load.

200 users (user000 to user199) log on through the real proxy (a process) to 4 terminal-server stand-ins
(processes that say which server they are), one user every 20 ms, each holding its connection until the
storm is over. Each server's agent answers its own constant load (20, 22, 24, 26) whatever happens (the
users' logons never show in it within the storm), and a health replica reads them every 210-490 ms. Each
load report recounts the placements it cannot show yet (made after its sample time less the pool's logon
lag, 30 s): a report never makes a server that just took users look idle again, so each server ends with
50 +- 10 users (ideally 53, 51, 49, 47: equal load plus placements). Were a report to forget the
placements before it, the storm would land on whichever server reported last with the lowest figure.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections import Counter

import pytest

from tests.integration.health.support import AgentStub, Server, health_replica, real_broker, wait_for
from tests.support import storm
from tests.support.cluster import Supervisor, make_root, new_port

USERS = 200
HOSTS = 4
CONSTANT_LOADS = (20, 22, 24, 26)  # one agent each
EVERY_S = 0.02  # one logon every 20 ms: the storm lasts 4 s
HOLD_S = USERS * EVERY_S + 4.0  # every user still holds its connection when the last one logs on
PROBE_INTERVAL_S = 0.35
PROBE_JITTER = 0.4  # 210-490 ms between probes of one server

log = logging.getLogger(__name__)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


async def test_a_logon_storm_spreads_within_20_percent_of_even(pg_database_url: str) -> None:
    root = make_root("rdbroker-storm-")
    processes = Supervisor(root)
    agent = await AgentStub().start()
    try:
        hosts = []
        for i in range(HOSTS):
            port = new_port()
            await asyncio.to_thread(
                processes.start,
                f"host{i}",
                ["-m", "tests.support.rdp_host", "--listen", f"127.0.0.1:{port}"],
                ports={"rdp": port},
                tcp_ready=["rdp"],
            )
            hosts.append(f"127.0.0.1:{port}")
            agent.bodies[f"/host{i}/load"] = str(CONSTANT_LOADS[i]).encode()
        servers = [Server(address, agent.url(f"/host{i}/load")) for i, address in enumerate(hosts)]
        async with (
            real_broker(pg_database_url, servers, interval_s=PROBE_INTERVAL_S) as broker,
            health_replica(broker.address, probe_jitter=PROBE_JITTER),
        ):

            async def every_load_reported() -> bool:
                listed = await broker.servers()
                return [listed[address].load for address in hosts] == list(CONSTANT_LOADS)

            await wait_for(every_load_reported)
            rdp_port, grpc_port = new_port(), new_port()
            await asyncio.to_thread(
                processes.start,
                "proxy",
                [
                    "-m",
                    "rdbroker_proxy",
                    "--listen",
                    f"127.0.0.1:{rdp_port}",
                    "--broker",
                    broker.address,
                    "--grpc-listen",
                    f"127.0.0.1:{grpc_port}",
                ],
                ports={"rdp": rdp_port, "grpc": grpc_port},
                grpc_ready="grpc",
                tcp_ready=["rdp"],
                env={"RDBROKER_PROXY_ID": "proxy0"},
            )
            paths = [f"/host{i}/load" for i in range(HOSTS)]
            read_before = [agent.served[path] for path in paths]
            run = storm.LoginStorm([f"127.0.0.1:{rdp_port}"], storm.StormSettings(users=USERS, name_digits=3))
            async with asyncio.TaskGroup() as tg:
                tg.create_task(run.logon_paced(EVERY_S, HOLD_S))
                await asyncio.sleep(USERS * EVERY_S)  # while users log on...
                # ...each server's load is read again and again (else nothing is tested).
                loads_read = [agent.served[path] - n for path, n in zip(paths, read_before, strict=True)]

        landed = storm.first_servers(run.attempts)
        spread = Counter(landed.values())
        figures = {address: spread.get(address, 0) for address in hosts}
        summary = storm.summary(run.attempts)
        by_load = zip(CONSTANT_LOADS, hosts, strict=True)
        spread_text = ", ".join(f"load {load}: {figures[address]}" for load, address in by_load)
        log.info(
            "storm spread over %d servers (%s); %s; loads read %s", HOSTS, spread_text, summary, loads_read
        )
        assert not storm.failed_after_retry(run.attempts), summary
        assert len(landed) == USERS, summary
        assert min(loads_read) >= 4, loads_read
        low, high = USERS / HOSTS * 0.8, USERS / HOSTS * 1.2
        assert all(low <= n <= high for n in figures.values()), figures
    finally:
        await asyncio.to_thread(processes.stop_all)
        await agent.stop()
        shutil.rmtree(root, ignore_errors=True)
