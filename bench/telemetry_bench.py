"""What tracing costs a Route: the broker and its client in one process on PostgreSQL, three phases.

    .venv/bin/python bench/telemetry_bench.py [--routes 2000] [--users 200]

1. `off`: no tracer provider installed (the API's no-op spans): the interceptors and the statement hook
   run, but record nothing;
2. `sdk`: `rdbroker_common.telemetry.setup()` done, no exporter (a pod without OTLP): spans are
   dropped by the sampler, not recorded;
3. `export`: the same plus an exporter (that discards what it gets): every span recorded and handed over.
Each phase routes the same users again (reconnects: the common call) one at a time, each call under a
root span as the proxy's `rdp.connection` would be, and prints the mean and p50/p99 latency and the
process CPU time per route (client and broker together). Drops its database at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from collections.abc import Sequence

import grpc
import psycopg
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from pydantic import SecretStr

from rdbroker_broker import domain as d
from rdbroker_broker.app import serve
from rdbroker_broker.config import BrokerSettings
from rdbroker_broker.db import migrate
from rdbroker_broker.db.engine import make_engine
from rdbroker_broker.farm import Farm, apply_farm
from rdbroker_common import telemetry
from rdbroker_proto.v1 import broker_pb2 as pb
from rdbroker_proto.v1 import broker_pb2_grpc


def out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Discard(SpanExporter):
    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


def create_database(server_url: str) -> str:
    name = f"rdbroker_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(f"{server_url}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{server_url}/{name}"


def drop_database(url: str) -> None:
    server_url, name = url.rsplit("/", 1)
    with psycopg.connect(f"{server_url}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def prepare(url: str) -> None:
    engine = make_engine(url)
    try:
        await migrate.upgrade(engine)
        servers = [d.Server(address=f"10.9.0.{i}:3389", pool="default") for i in range(1, 21)]
        await apply_farm(engine, Farm(pools=[d.Pool("default", True, 3600.0)], servers=servers))
    finally:
        await engine.dispose()


async def run_phase(stub: broker_pb2_grpc.BrokerAsyncStub, tag: str, routes: int, users: int) -> list[float]:
    tracer = trace.get_tracer("bench")
    latencies = []
    for n in range(routes):
        request = pb.RouteRequest(connection_id=f"{tag}-{n}", proxy_id="bench", cookie=f"CORP\\u{n % users}")
        start = time.perf_counter()
        with tracer.start_as_current_span("rdp.connection"):
            await stub.Route(request, timeout=30)
        latencies.append(time.perf_counter() - start)
    return latencies


async def main(routes: int, users: int, server_url: str) -> None:
    url = create_database(server_url)
    try:
        await prepare(url)
        settings = BrokerSettings(
            database_url=SecretStr(url),
            grpc_listen="127.0.0.1:0",
            http_listen="127.0.0.1:0",
            log_level="WARNING",
        )
        ready, stop = asyncio.Event(), asyncio.Event()
        bound: dict[str, int] = {}
        task = asyncio.get_running_loop().create_task(serve(settings, ready, stop, bound))
        await asyncio.wait_for(ready.wait(), 30)
        channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{bound['grpc']}", interceptors=telemetry.client_interceptors()
        )
        stub = broker_pb2_grpc.BrokerStub(channel)
        await run_phase(stub, "warm", users, users)  # every user placed once: the phases reconnect
        out(f"{'phase':8} {'routes':>7} {'mean ms':>8} {'p50 ms':>7} {'p99 ms':>7} {'CPU ms/route':>13}")
        exporter = Discard()
        handle = None
        # sdk and export alternate, so a drift of the machine's load shows as a spread within a kind.
        for n, name in enumerate(("off", "sdk", "export", "sdk", "export")):
            if handle is None and name != "off":
                handle = telemetry.setup("rdbroker-bench")
                handle.add_span_exporter(exporter)
            if handle is not None and handle.sampler is not None:
                handle.sampler.exporting = name == "export"
            name = f"{name}-{n}"
            cpu = time.process_time()
            latencies = await run_phase(stub, name, routes, users)
            cpu_ms = (time.process_time() - cpu) * 1000 / routes
            q = statistics.quantiles(latencies, n=100)
            out(
                f"{name:8} {routes:7d} {statistics.mean(latencies) * 1000:8.2f} {q[49] * 1000:7.2f} "
                f"{q[98] * 1000:7.2f} {cpu_ms:13.3f}"
            )
        out(f"spans exported: {exporter.spans} ({exporter.spans / (2 * routes):.1f} per exported route)")
        await channel.close()
        stop.set()
        await asyncio.wait_for(task, 30)
    finally:
        drop_database(url)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--routes", type=int, default=2000)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument(
        "--server-url",
        default=os.environ.get("RDBROKER_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432"),
    )
    args = parser.parse_args()
    out(f"load average at start: {os.getloadavg()[0]:.1f}")
    asyncio.run(main(args.routes, args.users, args.server_url))
