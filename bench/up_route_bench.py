"""`rdbroker up`: connection setups through its proxy port, the proxy calling the broker in-process
against over the broker's gRPC port (as before), interleaved in one run.

    .venv/bin/python bench/up_route_bench.py [--rounds 3] [--setups 2000] [--concurrency 16]
        [--users 500] [--store sqlite|postgresql] [--server-url postgresql://postgres@127.0.0.1:5432]
        [--profile DIR] [--up-cpu N]

Two `up` processes (the same code, `UpConfig.in_process` True or False), each with its own database
(a SQLite file, or a throwaway PostgreSQL database) and the same 4 fast fake terminal servers
(bench/proxy_load.py backend). Each round runs, in alternating order on each: --setups X.224 setups
(connect, Connection Request with a cookie of --users users, wait for the Confirm, close) from
--concurrency clients, then 200 from one client alone. Prints setups/s, p50/p99 and the `up` process's
CPU per setup, medians over the rounds, and the in-process / gRPC ratios. With --profile, py-spy
samples each `up` process during its first round's concurrent setups (DIR/MODE.txt, collapsed stacks)
and the share of samples spent in gRPC, protobuf, SQLAlchemy, the database driver, ... is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from route_bench import database  # noqa: E402 - the sibling script's throwaway database

from rdbroker_rdp import build_connection_request  # noqa: E402

MODES = ("grpc", "in-process")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, child: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise SystemExit(f"a child exited with {child.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.1)
    raise SystemExit(f"nothing listens on {port}")


def run_up(in_process: bool, database_url: str, listen: str, servers: list[str]) -> None:
    """The child: `up.serve` as `rdbroker up` runs it, on uvloop, until SIGTERM."""
    from rdbroker_cli import components, farm, up
    from rdbroker_common import lifecycle, logs

    logs.configure("WARNING", "text")
    config = components.UpConfig(
        listen=listen,
        http_listen="127.0.0.1:0",
        grpc_listen="127.0.0.1:0",
        database_url=database_url,
        replace_farm=True,
        in_process=in_process,
    )

    async def main() -> None:
        await up.serve(config, farm.from_servers(servers), lifecycle.stop_event_on_signals(), lambda _: None)

    lifecycle.run(main)


class Client(asyncio.Protocol):
    def __init__(self, packet: bytes, done: asyncio.Future[bool]) -> None:
        self.packet, self.done = packet, done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.packet)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if not self.done.done():
            self.done.set_result(data[:1] == b"\x03")  # a TPKT: the Connection Confirm

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(False)


async def setups(
    port: int, packets: list[bytes], count: int, concurrency: int
) -> tuple[float, list[float], int]:
    """(seconds, latencies, errors)"""
    loop = asyncio.get_running_loop()
    todo = list(range(count))
    latencies: list[float] = []
    errors = 0

    async def one(packet: bytes) -> None:
        nonlocal errors
        done: asyncio.Future[bool] = loop.create_future()
        started = time.perf_counter()
        try:
            async with asyncio.timeout(15):
                transport, _ = await loop.create_connection(lambda: Client(packet, done), "127.0.0.1", port)
                try:
                    ok = await done
                finally:
                    transport.close()
        except (OSError, TimeoutError):
            ok = False
        if ok:
            latencies.append(time.perf_counter() - started)
        else:
            errors += 1

    async def worker() -> None:
        while todo:
            i = todo.pop()
            await one(packets[i % len(packets)])

    started = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(concurrency):
            tg.create_task(worker())
    return time.perf_counter() - started, latencies, errors


# Where samples went: a sample counts for each group one of its frames belongs to (inclusive).
GROUPS = {
    "grpc (aio, cython)": ("grpc/", "grpc._cython", "cygrpc"),
    "protobuf": ("protobuf",),
    "sqlalchemy": ("sqlalchemy/",),
    "aiosqlite + sqlite3": ("aiosqlite", "sqlite3"),
    "psycopg": ("psycopg",),
    "broker use case": ("rdbroker_broker/service/",),
    "proxy connection": ("rdbroker_proxy/connection.py",),
    "telemetry": ("opentelemetry",),
    "idle": ("select (", "epoll", "_run_once"),
}


def profile_summary(path: Path) -> str:
    total = 0
    groups = dict.fromkeys(GROUPS, 0)
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        for name, needles in GROUPS.items():
            if any(needle in stack for needle in needles):
                groups[name] += n
    shares = ", ".join(f"{name} {100 * n / max(total, 1):.0f}%" for name, n in groups.items())
    return f"{path.stem}: {total} samples; {shares}"


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` (gRPC's and aiosqlite's included) on `cpus`."""
    for thread in psutil.Process(pid).threads():
        os.sched_setaffinity(thread.id, cpus)


def main_thread_cpu(proc: psutil.Process) -> float:
    return sum(t.user_time + t.system_time for t in proc.threads() if t.id == proc.pid)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")


@contextlib.contextmanager
def databases(store: str, server_url: str) -> Iterator[list[str]]:
    if store == "sqlite":
        with tempfile.TemporaryDirectory(prefix="up-bench-") as scratch:
            yield [f"sqlite+aiosqlite:///{Path(scratch) / f'{mode}.db'}" for mode in MODES]
    else:
        with database(server_url) as first, database(server_url) as second:
            yield [first, second]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--setups", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--server-url", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--profile", type=Path, help="py-spy each `up` in the first round, into DIR")
    parser.add_argument(
        "--up-cpu", type=int, help="pin the `up` processes to this CPU, the rest (load, backends) off it"
    )
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--database-url", help=argparse.SUPPRESS)
    parser.add_argument("--listen", help=argparse.SUPPRESS)
    parser.add_argument("--servers", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_up(args.child == "in-process", args.database_url, args.listen, args.servers.split(","))
        return

    children: list[subprocess.Popen[bytes]] = []
    try:
        backends = [free_port() for _ in range(4)]
        for port in backends:
            child = subprocess.Popen(
                [sys.executable, str(ROOT / "bench" / "proxy_load.py"), "backend", "--port", str(port)]
            )
            children.append(child)
            wait_port(port, child)
        servers = ",".join(f"127.0.0.1:{port}" for port in backends)
        with databases(args.store, args.server_url.rstrip("/")) as urls:
            ports, pids = {}, {}
            for mode, url in zip(MODES, urls, strict=True):
                port = free_port()
                child = subprocess.Popen(
                    [sys.executable, __file__, "--child", mode, "--database-url", url,
                     "--listen", f"127.0.0.1:{port}", "--servers", servers]
                )  # fmt: skip
                children.append(child)
                wait_port(port, child)
                ports[mode], pids[mode] = port, child.pid
                if args.up_cpu is not None:
                    pin(child.pid, {args.up_cpu})
            if args.up_cpu is not None:
                rest = set(range(os.cpu_count() or 1)) - {args.up_cpu}
                for pid in [os.getpid(), *(c.pid for c in children[: len(backends)])]:
                    pin(pid, rest)
            packets = [
                build_connection_request(cookie=f"user{i:05d}", requested_protocols=3)
                for i in range(args.users)
            ]
            results: dict[str, dict[str, list[float]]] = {m: {} for m in MODES}

            def note(mode: str, key: str, value: float) -> None:
                results[mode].setdefault(key, []).append(value)

            for mode in MODES:  # warm-up: every user placed once, so rounds measure reconnects
                uvloop.run(setups(ports[mode], packets, args.users, args.concurrency))
            sys.stdout.write(
                f"store {args.store}, {args.setups} setups x {args.concurrency} concurrent, "
                f"{args.users} users, load average {os.getloadavg()[0]:.2f}\n"
            )
            for n in range(args.rounds):
                for mode in MODES if n % 2 == 0 else reversed(MODES):
                    proc = psutil.Process(pids[mode])
                    spy = None
                    if args.profile and n == 0:
                        args.profile.mkdir(parents=True, exist_ok=True)
                        spy = subprocess.Popen(
                            [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pids[mode]),
                             "--format", "raw", "--rate", "500", "-o", str(args.profile / f"{mode}.txt")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                        )  # fmt: skip
                        time.sleep(1.0)  # attached
                    cpu, loop_cpu = sum(proc.cpu_times()[:2]), main_thread_cpu(proc)
                    load = setups(ports[mode], packets, args.setups, args.concurrency)
                    seconds, lat, errors = uvloop.run(load)
                    cpu, loop_cpu = sum(proc.cpu_times()[:2]) - cpu, main_thread_cpu(proc) - loop_cpu
                    if spy is not None:
                        spy.send_signal(signal.SIGINT)
                        spy.wait(60)
                    note(mode, "setups/s", len(lat) / seconds)
                    note(mode, "p50 ms", pct(lat, 0.5))
                    note(mode, "p99 ms", pct(lat, 0.99))
                    note(mode, "CPU us/setup", cpu * 1e6 / max(len(lat), 1))
                    # The event loop's thread vs the others (gRPC core's pollers, aiosqlite's thread).
                    note(mode, "  loop thread", loop_cpu * 1e6 / max(len(lat), 1))
                    note(mode, "  other threads", (cpu - loop_cpu) * 1e6 / max(len(lat), 1))
                    note(mode, "errors", errors)
                    _, alone, _ = uvloop.run(setups(ports[mode], packets, 200, 1))
                    note(mode, "alone p50 ms", pct(alone, 0.5))
                    note(mode, "alone p99 ms", pct(alone, 0.99))
            sys.stdout.write(f"{'(medians over rounds)':<16}{'gRPC':>12}{'in-process':>12}{'ratio':>8}\n")
            for key in results["grpc"]:
                old, new = (statistics.median(results[m][key]) for m in MODES)
                ratio = f"{new / old:.2f}x" if old else "-"
                sys.stdout.write(f"{key:<16}{old:>12.2f}{new:>12.2f}{ratio:>8}\n")
            sys.stdout.write(f"rounds: {results}\n")
            if args.profile:
                for mode in MODES:
                    sys.stdout.write(profile_summary(args.profile / f"{mode}.txt") + "\n")
            stop(children[len(backends) :])  # before their databases go
    finally:
        stop(children)


def stop(children: list[subprocess.Popen[bytes]]) -> None:
    for child in reversed(children):
        if child.poll() is None:
            child.terminate()
    for child in children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(30)


if __name__ == "__main__":
    main()
