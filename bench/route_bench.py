"""Route throughput and latency: N concurrent gRPC clients against one broker process on PostgreSQL.

    .venv/bin/python bench/route_bench.py [--users 4000] [--concurrency 32] [--servers 20]
                                          [--rate ROUTES_PER_S] [--history N] [--own-cluster]
                                          [--stream]
                                          [--server-url postgresql://postgres@127.0.0.1:5432]

Creates a throwaway database, migrates it, declares a farm, starts `python -m rdbroker_broker`, then
measures three phases: new placements (every user new), reconnects (every user again, new connection
ids) and retries (the reconnect calls repeated: answered from the stored answers). Prints routes/s,
p50/p99/max latency and the broker process's CPU time per route. Drops the database at the end.

By default each of --concurrency clients sends its next call when the last one is answered (closed
loop: the throughput the broker can reach). With --rate, calls start on a fixed schedule instead, R per
second whatever the answers do (open loop: --users / R seconds per phase), and a call's latency counts
from its scheduled start, so a broker that falls behind shows it in p99 rather than slowing the load.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import httpx
import psutil
import psycopg

from rdbroker_broker import domain as d
from rdbroker_broker.db import migrate
from rdbroker_broker.db.engine import make_engine
from rdbroker_broker.farm import Farm, apply_farm
from rdbroker_proto.v1 import broker_pb2 as pb
from rdbroker_proto.v1 import broker_pb2_grpc
from rdbroker_proxy.errors import BrokerUnavailable, RouteRefused
from rdbroker_proxy.routing import BrokerClient


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def database(server_url: str):  # type: ignore[no-untyped-def]
    name = f"rdbroker_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(f"{server_url}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{server_url}/{name}"
    finally:
        with psycopg.connect(f"{server_url}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def prepare(url: str, servers: int, history: int) -> None:
    engine = make_engine(url)
    try:
        await migrate.upgrade(engine)
        farm = Farm(
            pools=[d.Pool("default", True, 3600.0)],
            servers=[
                d.Server(address=f"10.9.{i // 250}.{i % 250 + 1}:3389", pool="default")
                for i in range(servers)
            ],
        )
        await apply_farm(engine, farm)
    finally:
        await engine.dispose()
    if history:
        add_history(url, history, servers)


def add_history(url: str, count: int, servers: int) -> None:
    """`count` ended sessions, each with its connection, spread over the bench's users and servers:
    the directory a farm keeps for `retention_s` (a week by default) of logons."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO sessions (id, pool, "user", user_key, server_address, state, learnt_from,
                                     origin_connection_id, connection_id, client_address, created_at,
                                     updated_at, ended_at, end_reason)
               SELECT 'h' || n, 'default', 'CORP\\user' || u, 'corp\\user' || u,
                      '10.9.' || (k / 250) || '.' || (k %% 250 + 1) || ':3389',
                      'ended', 'route', 'h' || n, 'h' || n, '', now() - interval '1 day',
                      now() - interval '1 day', now() - interval '1 day', 'logoff'
               FROM generate_series(1, %(count)s) n,
                    LATERAL (SELECT n %% 50000 AS u, n %% %(servers)s AS k) x""",
            {"count": count, "servers": servers},
        )
        conn.execute(
            """INSERT INTO connections (connection_id, attempt, session_id, proxy_id, server_address,
                                        reason, "user", pool, client_address, created_at,
                                        bytes_from_client, bytes_from_server, duration_ms, end_reason)
               SELECT origin_connection_id, 0, id, 'bench', server_address, 'new', "user", pool, '',
                      created_at, 0, 0, 0, 'client_closed'
               FROM sessions WHERE state = 'ended'""",
        )


@contextlib.asynccontextmanager
async def broker(url: str, pool_size: int) -> AsyncIterator[tuple[int, psutil.Process]]:
    grpc_port, http_port = free_port(), free_port()
    log = tempfile.TemporaryFile()  # noqa: SIM115 - a file, not a pipe: nobody has to keep reading it
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "rdbroker_broker",
        "--database-url",
        url,
        "--grpc-listen",
        f"127.0.0.1:{grpc_port}",
        "--http-listen",
        f"127.0.0.1:{http_port}",
        "--log-level",
        "WARNING",
        # A pool smaller than the concurrency opens and closes overflow connections all the time.
        # Nothing here reports connections opened: without a long pending timeout, sessions would
        # expire during a long run and "reconnects" would be new placements.
        env={"RDBROKER_PENDING_TIMEOUT_S": "3600", **os.environ, "RDBROKER_DB_POOL_SIZE": str(pool_size)},
        stderr=log,
    )
    try:
        async with httpx.AsyncClient(timeout=1.0) as client:
            for _ in range(300):
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"http://127.0.0.1:{http_port}/readyz")).status_code == 200:
                        break
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError("broker did not start")
        yield grpc_port, psutil.Process(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
        log.seek(0)
        errors = log.read().decode()
        if errors.strip():
            sys.stderr.write(errors[-int(os.environ.get("BENCH_LOG_TAIL", "2000")) :])
        log.close()


# One Route call with a deadline: the unary stub's, or the proxy's client (RouteStream) with --stream.
RouteCall = Callable[[pb.RouteRequest, float], Awaitable[object]]


def unary(stub: broker_pb2_grpc.BrokerAsyncStub) -> RouteCall:
    return lambda request, timeout_s: stub.Route(request, timeout=timeout_s)


def streamed(client: BrokerClient) -> RouteCall:
    """The proxy's own broker client: Route calls batched on its RouteStream."""

    async def call(request: pb.RouteRequest, timeout_s: float) -> object:
        client.route_timeout_s = client.route_attempt_timeout_s = timeout_s
        return await client.route(request)

    return call


async def phase(stub: RouteCall, users: int, concurrency: int, tag: str) -> tuple[float, list[float]]:
    latencies: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for u in range(users):
        queue.put_nowait(u)

    async def worker() -> None:
        while True:
            try:
                u = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            request = pb.RouteRequest(connection_id=f"{tag}-{u}", proxy_id="bench", cookie=f"CORP\\user{u}")
            start = time.perf_counter()
            await stub(request, 30)
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    async with asyncio.TaskGroup() as tasks:
        for _ in range(concurrency):
            tasks.create_task(worker())
    return time.perf_counter() - start, latencies


async def paced(
    stub: RouteCall,
    users: int,
    rate: float,
    tag: str,
    timeout_s: float,
    failed: collections.Counter[str],
) -> tuple[float, list[float]]:
    """Open loop: call u starts at start + u / rate; its latency counts from then. A call that fails
    (past `timeout_s`, or refused) is counted in `failed` by status code, as a proxy would see it."""
    latencies: list[float] = []

    async def call(u: int, due: float) -> None:
        request = pb.RouteRequest(connection_id=f"{tag}-{u}", proxy_id="bench", cookie=f"CORP\\user{u}")
        try:
            await stub(request, timeout_s)
        except grpc.aio.AioRpcError as exc:
            failed[exc.code().name] += 1
            return
        except (RouteRefused, BrokerUnavailable) as exc:
            failed[type(exc).__name__] += 1
            return
        latencies.append(time.perf_counter() - due)

    start = time.perf_counter()
    async with asyncio.TaskGroup() as tasks:
        for u in range(users):
            due = start + u / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.create_task(call(u, due))
    return time.perf_counter() - start, latencies


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def backends_cpu_seconds(database: str) -> float:
    """CPU time of the PostgreSQL backends serving `database` (their titles name it)."""
    total = 0.0
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["name"] == "postgres" and any(database in part for part in cmdline):
            with contextlib.suppress(psutil.Error):
                total += cpu_seconds(proc)
    return total


async def measured(
    name: str,
    process: psutil.Process,
    database: str,
    stub: RouteCall,
    users: int,
    concurrency: int,
    tag: str,
    rate: float,
    timeout_s: float,
) -> None:
    """One phase, with the CPU time per route of the broker process, of the PostgreSQL backends
    serving it and of this client (figures the machine's load disturbs far less than wall-clock ones)."""
    cpu_before, db_before, client_before = (
        cpu_seconds(process),
        backends_cpu_seconds(database),
        time.process_time(),
    )
    failed: collections.Counter[str] = collections.Counter()
    if rate > 0:
        elapsed, latencies = await paced(stub, users, rate, tag, timeout_s, failed)
    else:
        elapsed, latencies = await phase(stub, users, concurrency, tag)
    calls = len(latencies) + sum(failed.values())
    cpu_ms = (cpu_seconds(process) - cpu_before) * 1000 / calls
    db_ms = (backends_cpu_seconds(database) - db_before) * 1000 / calls
    client_ms = (time.process_time() - client_before) * 1000 / calls
    if failed:
        sys.stdout.write(f"{name:<10} failed calls: {dict(failed)} (answered: {len(latencies)})\n")
    if not latencies:
        return
    ms = sorted(x * 1000 for x in latencies)
    p50 = statistics.median(ms)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    sys.stdout.write(
        f"{name:<10} {len(ms):>6} routes in {elapsed:6.2f} s = {len(ms) / elapsed:6.0f} routes/s  "
        f"p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  max {ms[-1]:7.2f} ms  CPU ms/route: broker {cpu_ms:.2f} "
        f"postgres {db_ms:.2f} client {client_ms:.2f}\n"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--servers", type=int, default=20)
    parser.add_argument(
        "--history",
        type=int,
        default=0,
        help="ended sessions (with their connections) in the directory first",
    )
    parser.add_argument("--rate", type=float, default=0.0, help="open loop: start this many calls per second")
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="open loop: each call's deadline in seconds"
    )
    parser.add_argument(
        "--db-pool-size", type=int, default=0, help="the broker's pool (default: concurrency)"
    )
    parser.add_argument(
        "--server-url",
        default=os.environ.get("RDBROKER_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432"),
    )
    parser.add_argument(
        "--own-cluster",
        action="store_true",
        help="a throwaway PostgreSQL cluster with stock settings (autovacuum on, fsync on) instead of "
        "--server-url, whose server may be tuned for tests",
    )
    parser.add_argument(
        "--stream",
        action="store_true",
        help="route with the proxy's broker client (calls batched on RouteStream) instead of unary Route",
    )
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        server_url = args.server_url.rstrip("/")
        if args.own_cluster:
            server_url = stack.enter_context(own_cluster())
        await run(args, server_url)


@contextlib.contextmanager
def own_cluster() -> Iterator[str]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.support.postgres import Cluster  # the test suite's throwaway clusters

    cluster = Cluster(extra_conf="fsync = on\n").init().start()  # later lines win: fsync back on
    try:
        yield cluster.url
    finally:
        cluster.stop()
        cluster.destroy()


async def run(args: argparse.Namespace, server_url: str) -> None:
    with database(server_url) as url:
        await prepare(url, args.servers, args.history)
        pool_size = args.db_pool_size or max(args.concurrency, 1)
        db_name = url.rsplit("/", 1)[1]
        async with (
            broker(url, pool_size) as (port, process),
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
            contextlib.AsyncExitStack() as stack,
        ):
            client = BrokerClient([f"127.0.0.1:{port}"], proxy_id="bench")
            stack.push_async_callback(client.close)
            stub = streamed(client) if args.stream else unary(broker_pb2_grpc.BrokerStub(channel))
            await phase(stub, 200, args.concurrency, "warm")  # warm-up: connections, prepared statements
            load = (
                f"{args.rate:.0f} calls/s open loop"
                if args.rate > 0
                else f"{args.concurrency} concurrent clients"
            ) + (", on the proxy's RouteStream" if args.stream else ", unary Route")
            sys.stdout.write(
                f"broker on PostgreSQL, {args.servers} servers, {load}, "
                f"database pool {pool_size}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}\n"
            )
            for name, tag in (("new", "new"), ("reconnect", "again"), ("retry", "again")):
                await measured(
                    name, process, db_name, stub, args.users, args.concurrency, tag, args.rate, args.timeout
                )
            sys.stdout.write(f"load average during the run: {os.getloadavg()[0]:.2f}\n")


if __name__ == "__main__":
    asyncio.run(main())
