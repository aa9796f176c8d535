"""Route without gRPC: `BrokerService.route` called in this process on the local PostgreSQL, or on
an embedded SQLite file (`--sqlite`, the store of `rdbroker up`).

    .venv/bin/python bench/route_service_bench.py [--users 3000] [--concurrency 8] [--servers 20] [--sqlite]

Prints routes/s, p50/p99 latency and the CPU time per route of the use case alone (database driver
included, gRPC excluded), for new placements and reconnects; `route_bench.py` gives the whole broker
process, `grpc_floor.py` the gRPC layer alone. Creates and drops a throwaway database (or file).
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
from rdbroker_broker.service import BrokerService
from rdbroker_broker.store import Store

sys.path.insert(0, os.path.dirname(__file__))
from route_bench import database  # the sibling script's throwaway database


async def run_phase(service: BrokerService, tag: str, users: int, concurrency: int) -> None:
    remaining = list(range(users))
    latencies: list[float] = []

    async def worker() -> None:
        while remaining:
            u = remaining.pop()
            request = d.RouteRequest(connection_id=f"{tag}-{u}", proxy_id="bench", cookie=f"CORP\\user{u}")
            began = time.perf_counter()
            await service.route(request)
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
            await run_phase(service, "new", args.users, args.concurrency)
            await run_phase(service, "reconnect", args.users, args.concurrency)
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
        "--server-url",
        default=os.environ.get("RDBROKER_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432"),
    )
    parser.add_argument("--sqlite", action="store_true", help="an embedded SQLite file, as `rdbroker up`")
    uvloop.run(main(parser.parse_args()))
