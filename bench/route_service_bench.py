"""Route without gRPC: `BrokerService.route` called in this process on the local PostgreSQL, or on
an embedded SQLite file (`--sqlite`, the store of `rdbroker up`).

    .venv/bin/python bench/route_service_bench.py [--users 3000] [--concurrency 8] [--servers 20] [--sqlite]
        [--report-batch 64]

Prints routes/s, p50/p99 latency and the CPU time per route of the use case alone (database driver
included, gRPC excluded), for new placements and reconnects, and then what the new placements'
connection reports cost (opened and closed, `--report-batch` events per call). `route_bench.py` gives
the whole broker process, `grpc_floor.py` the gRPC layer alone. Creates and drops a throwaway
database (or file).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator

import uvloop
from pydantic import SecretStr

from rdbroker_broker import domain as d
from rdbroker_broker.config import BrokerSettings
from rdbroker_broker.db import migrate
from rdbroker_broker.db.engine import make_engine
from rdbroker_broker.farm import Farm, apply_farm
from rdbroker_broker.service import BrokerService, Closed, ConnectionEvent, Opened
from rdbroker_broker.store import Store

sys.path.insert(0, os.path.dirname(__file__))
from route_bench import database  # the sibling script's throwaway database


async def run_phase(service: BrokerService, tag: str, users: int, concurrency: int) -> dict[str, str]:
    """Route `users` users; answers each connection's session."""
    remaining = list(range(users))
    latencies: list[float] = []
    sessions: dict[str, str] = {}

    async def worker() -> None:
        while remaining:
            u = remaining.pop()
            request = d.RouteRequest(connection_id=f"{tag}-{u}", proxy_id="bench", cookie=f"CORP\\user{u}")
            began = time.perf_counter()
            sessions[request.connection_id] = (await service.route(request)).session_id
            latencies.append(time.perf_counter() - began)

    cpu_before, start = time.process_time(), time.perf_counter()
    async with asyncio.TaskGroup() as tasks:
        for _ in range(concurrency):
            tasks.create_task(worker())
    elapsed = time.perf_counter() - start
    cpu_ms = (time.process_time() - cpu_before) * 1000 / users
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    sys.stdout.write(
        f"{tag:<10} {users / elapsed:6.0f} routes/s  p50 {cuts[49] * 1000:6.2f} ms"
        f"  p99 {cuts[98] * 1000:6.2f} ms  service CPU {cpu_ms:.3f} ms/route\n"
    )
    return sessions


async def report_phase(service: BrokerService, sessions: dict[str, str], batch: int) -> None:
    """Each connection reported opened and then closed with a junk probe's bytes, in batches of
    `batch` events as a proxy sends them (a connection's close in the batch after its open, or in the
    same one): how long a batch takes (on SQLite, what it holds the event loop) and its CPU per event."""
    events: list[ConnectionEvent] = []
    for connection_id, session_id in sessions.items():
        events.append(Opened(session_id, connection_id, "bench"))
        events.append(Closed(session_id, connection_id, 19, 19, 3, "client_closed"))
    took: list[float] = []
    cpu_before = time.process_time()
    for start in range(0, len(events), batch):
        began = time.perf_counter()
        results = await service.report_connections(events[start : start + batch])
        took.append(time.perf_counter() - began)
        assert not any(results), results
    cpu_us = (time.process_time() - cpu_before) * 1e6 / len(events)
    cuts = statistics.quantiles(took, n=100) if len(took) > 1 else took * 99
    sys.stdout.write(
        f"reports    {len(events) / sum(took):6.0f} events/s  batch of {batch}: p50 {cuts[49] * 1000:6.2f} ms"
        f"  p99 {cuts[98] * 1000:6.2f} ms  service CPU {cpu_us:.0f} µs/event\n"
    )


@contextlib.contextmanager
def sqlite_file() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="rdbroker-bench-") as directory:
        yield f"sqlite+aiosqlite:///{directory}/rdbroker.db"


async def main(args: argparse.Namespace) -> None:
    store = sqlite_file() if args.sqlite else database(args.server_url.rstrip("/"))
    with store as url:
        engine = make_engine(url, pool_size=args.concurrency)
        try:
            await migrate.upgrade(engine)
            servers = [
                d.Server(address=f"10.9.{i // 250}.{i % 250 + 1}:3389", pool="default")
                for i in range(args.servers)
            ]
            await apply_farm(engine, Farm(pools=[d.Pool("default", True, 3600.0)], servers=servers))
            service = BrokerService(Store(engine), BrokerSettings(database_url=SecretStr(url)))
            await run_phase(service, "warm", 200, args.concurrency)
            sys.stdout.write(
                f"in-process on {engine.dialect.name}, {args.concurrency} concurrent,"
                f" load average {os.getloadavg()[0]:.2f}\n"
            )
            placed = await run_phase(service, "new", args.users, args.concurrency)
            await run_phase(service, "reconnect", args.users, args.concurrency)
            await report_phase(service, placed, args.report_batch)
        finally:
            await engine.dispose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--servers", type=int, default=20)
    parser.add_argument(
        "--report-batch", type=int, default=64, help="events per report batch (a proxy sends 64)"
    )
    parser.add_argument(
        "--server-url",
        default=os.environ.get("RDBROKER_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432"),
    )
    parser.add_argument("--sqlite", action="store_true", help="an embedded SQLite file, as `rdbroker up`")
    uvloop.run(main(parser.parse_args()))
