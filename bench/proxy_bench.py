"""The proxy against HAProxy and a direct connection: setups/s, bulk MiB/s, memory per idle connection.

    .venv/bin/python bench/proxy_bench.py [--rounds 3] [--setups 3000] [--concurrency 32]
        [--bulk-mib 256] [--streams 2] [--idle 5000] [--no-real-broker]
        [--server-url postgresql://postgres@127.0.0.1:5432]

Targets, interleaved in a rotating order each round:
    direct      the client talks to the fake terminal servers themselves
    haproxy     `mode tcp`, `balance rdp-cookie`, `persist rdp-cookie`, nbthread 1 (when installed)
    proxy       `python -m rdbroker_proxy` (uvloop) with the in-process fake broker (a separate process)
    proxy+db    the same proxy against a real broker process on PostgreSQL (unless --no-real-broker)
Every process (load generators, backends, brokers, proxies) runs on this machine's cores, so figures
are relative: read the ratios to HAProxy, quoted as medians over the rounds.
Memory: fresh proxy / HAProxy processes, 20 warm-up connections, then --idle handshaken connections
held open; (RSS after - RSS before) / connections, per round.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg
from route_bench import backends_cpu_seconds  # bench/ is on the path: the script's directory

ROOT = Path(__file__).resolve().parent.parent
LOAD = [sys.executable, str(ROOT / "bench" / "proxy_load.py")]
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise SystemExit(f"nothing listens on {port} after {timeout_s} s")


class Processes:
    """Children started by the bench, all stopped at the end (SIGTERM, then SIGKILL)."""

    def __init__(self) -> None:
        self.children: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], **kw: object) -> subprocess.Popen[bytes]:
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        child = subprocess.Popen(args, cwd=ROOT, **kw)  # type: ignore[call-overload]
        self.children.append(child)
        return child  # type: ignore[no-any-return]

    def stop(self, child: subprocess.Popen[bytes]) -> None:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(5)
        with contextlib.suppress(ValueError):
            self.children.remove(child)

    def stop_all(self) -> None:
        for child in list(reversed(self.children)):
            self.stop(child)


def start_proxy(procs: Processes, broker: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    child = procs.start(
        [
            PY,
            "-m",
            "rdbroker_proxy",
            "--listen",
            f"127.0.0.1:{port}",
            "--grpc-listen",
            "127.0.0.1:0",
            "--broker",
            broker,
            "--max-connections",
            "9000",
            "--first-packet-timeout-s",
            "30",
            "--max-routing-per-client",
            "0",  # every client of the bench is 127.0.0.1
        ]
    )
    wait_port(port)
    return child, port


HAPROXY_CFG = """
global
    nbthread 1
    maxconn 9000
{global_extra}defaults
    mode tcp
{defaults_extra}    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend rdp
    bind 127.0.0.1:{port}
    tcp-request inspect-delay 5s
    tcp-request content accept if RDP_COOKIE
    default_backend farm
backend farm
    balance rdp-cookie
    persist rdp-cookie
{servers}
"""


# --haproxy-tuned: big buffers and kernel splicing (few pipes, so 5000 idle connections fit the fd limit)
HAPROXY_TUNING = ("    tune.bufsize 262144\n    maxpipes 200\n", "    option splice-auto\n")


def start_haproxy(
    procs: Processes, backends: list[int], workdir: Path, tuned: bool = False
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    servers = "\n".join(f"    server s{i} 127.0.0.1:{p}" for i, p in enumerate(backends))
    cfg = workdir / f"haproxy-{port}.cfg"
    global_extra, defaults_extra = HAPROXY_TUNING if tuned else ("", "")
    text = HAPROXY_CFG.format(
        port=port, servers=servers, global_extra=global_extra, defaults_extra=defaults_extra
    )
    cfg.write_text(text, encoding="utf-8")
    child = procs.start(["haproxy", "-db", "-f", str(cfg)])
    wait_port(port)
    return child, port


@contextlib.contextmanager
def database(server_url: str) -> Iterator[str]:
    name = f"rdbroker_proxybench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(f"{server_url}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{server_url}/{name}"
    finally:
        with psycopg.connect(f"{server_url}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def start_real_broker(procs: Processes, url: str, backends: list[int], workdir: Path) -> tuple[str, int]:
    farm = workdir / "farm.yaml"
    farm.write_text(
        "pools:\n  - name: default\n    default: true\n    disconnect_timeout: 1h\nservers:\n"
        + "".join(f"  - address: 127.0.0.1:{p}\n    pool: default\n" for p in backends),
        encoding="utf-8",
    )
    for args in (["migrate"], ["apply", "-f", str(farm)]):
        subprocess.run(
            [PY, "-m", "rdbroker_cli", *args, "--database-url", url],
            check=True,
            capture_output=True,
            timeout=120,
        )
    grpc_port, http_port = free_port(), free_port()
    child = procs.start(
        [
            PY,
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
        ]
    )
    wait_port(grpc_port)
    return f"127.0.0.1:{grpc_port}", child.pid


def cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def run_load(args: list[str]) -> dict[str, float]:
    out = subprocess.run([*LOAD, *args], check=True, capture_output=True, text=True, timeout=900)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def idle_memory(pid: int, port: int, count: int) -> float:
    """Bytes of RSS per idle connection added to process `pid`."""
    run_load(["setups", "--port", str(port), "--count", "20", "--concurrency", "4"])  # warm up
    time.sleep(0.5)
    before = psutil.Process(pid).memory_info().rss
    holder = subprocess.Popen(
        [*LOAD, "idle", "--port", str(port), "--count", str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    assert holder.stdin is not None
    status = json.loads(holder.stdout.readline())
    time.sleep(1.0)  # let the proxy finish its reports and settle
    after = psutil.Process(pid).memory_info().rss
    holder.stdin.close()
    holder.wait(60)
    if status["failed"]:
        say(f"    warning: {status['failed']} idle connections failed")
    return float((after - before) / max(status["held"], 1))


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--setups", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--bulk-mib", type=int, default=256, help="MiB each way per stream")
    parser.add_argument("--streams", type=int, default=2)
    parser.add_argument("--idle", type=int, default=5000)
    parser.add_argument("--idle-rounds", type=int, default=2)
    parser.add_argument("--no-real-broker", action="store_true")
    parser.add_argument(
        "--haproxy-tuned",
        action="store_true",
        help="HAProxy with tune.bufsize 256 KiB and option splice-auto (default: its stock buffers)",
    )
    parser.add_argument(
        "--server-url",
        default=os.environ.get("RDBROKER_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432"),
    )
    args = parser.parse_args()

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it
    say(f"RLIMIT_NOFILE {hard}; cpus {os.cpu_count()}; load {os.getloadavg()[0]:.2f}")
    procs = Processes()
    workdir = Path(tempfile.mkdtemp(prefix="proxybench-"))
    stack = contextlib.ExitStack()
    try:
        backends = [free_port(), free_port()]
        for port in backends:
            procs.start([*LOAD, "backend", "--port", str(port)])
        for port in backends:
            wait_port(port)
        fake_port = free_port()
        fake_broker = procs.start(
            [
                *LOAD,
                "fakebroker",
                "--port",
                str(fake_port),
                "--servers",
                ",".join(f"127.0.0.1:{p}" for p in backends),
            ]
        )
        wait_port(fake_port)

        # name -> (port, pid of the middle process whose CPU time we count; None for direct)
        targets: dict[str, tuple[int, int | None]] = {"direct": (backends[0], None)}
        have_haproxy = shutil.which("haproxy") is not None
        if have_haproxy:
            tuning = "tuned (bufsize 256 KiB, splice-auto)" if args.haproxy_tuned else "stock"
            say(f"haproxy config: {tuning}")
            child, port = start_haproxy(procs, backends, workdir, args.haproxy_tuned)
            targets["haproxy"] = (port, child.pid)
        else:
            say("haproxy is not installed: no comparison (apt-get install -y haproxy)")
        child, port = start_proxy(procs, f"127.0.0.1:{fake_port}")
        targets["proxy"] = (port, child.pid)
        broker_pid, database_name = 0, ""
        if not args.no_real_broker:
            url = stack.enter_context(database(args.server_url))
            real, broker_pid = start_real_broker(procs, url, backends, workdir)
            child, port = start_proxy(procs, real)
            targets["proxy+db"] = (port, child.pid)
            database_name = url.rsplit("/", 1)[1]

        names = list(targets)
        setups: dict[str, list[float]] = {n: [] for n in names}
        bulk: dict[str, list[float]] = {n: [] for n in names}
        setup_cpu: dict[str, list[float]] = {n: [] for n in names}  # CPU µs per setup
        # The processes behind a proxy (its broker, the broker's database), CPU µs per setup.
        behind_cpu: dict[str, list[float]] = {"fake broker": [], "broker": [], "postgres": []}

        def behind_seconds(name: str) -> dict[str, float]:
            if name == "proxy":
                return {"fake broker": cpu_seconds(fake_broker.pid)}
            if name == "proxy+db":
                return {"broker": cpu_seconds(broker_pid), "postgres": backends_cpu_seconds(database_name)}
            return {}

        bulk_cpu: dict[str, list[float]] = {n: [] for n in names}  # CPU ms per MiB each way
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                port, pid = targets[name]
                cpu = cpu_seconds(pid)
                behind = behind_seconds(name)
                res = run_load(
                    [
                        "setups",
                        "--port",
                        str(port),
                        "--count",
                        str(args.setups),
                        "--concurrency",
                        str(args.concurrency),
                    ]
                )
                setups[name].append(res["count"] / res["seconds"])
                setup_cpu[name].append((cpu_seconds(pid) - cpu) / res["count"] * 1e6)
                after = behind_seconds(name)
                for part, seconds in after.items():
                    behind_cpu[part].append((seconds - behind[part]) / res["count"] * 1e6)
                extra = ", ".join(f"{part} {behind_cpu[part][-1]:.0f}" for part in after)
                extra = f"  (behind it: {extra} us/setup)" if extra else ""
                say(
                    f"round {r + 1} setups {name:9s} {setups[name][-1]:8.0f}/s"
                    f"  cpu {setup_cpu[name][-1]:6.0f} us/setup  errors {res['errors']:.0f}{extra}"
                )
            for name in order:
                port, pid = targets[name]
                cpu = cpu_seconds(pid)
                res = run_load(
                    [
                        "bulk",
                        "--port",
                        str(port),
                        "--mib",
                        str(args.bulk_mib),
                        "--streams",
                        str(args.streams),
                    ]
                )
                bulk[name].append(res["mib_each_way"] / res["seconds"])
                bulk_cpu[name].append((cpu_seconds(pid) - cpu) / res["mib_each_way"] * 1e3)
                flag = "" if res["ok"] else "  INCOMPLETE"
                say(
                    f"round {r + 1} bulk   {name:9s} {bulk[name][-1]:8.0f} MiB/s each way"
                    f"  cpu {bulk_cpu[name][-1]:6.2f} ms/MiB{flag}"
                )

        memory: dict[str, list[float]] = {"proxy": []}
        if have_haproxy:
            memory["haproxy"] = []
        for r in range(args.idle_rounds):
            for name in memory if r % 2 == 0 else reversed(list(memory)):
                if name == "proxy":
                    child, port = start_proxy(procs, f"127.0.0.1:{fake_port}")
                else:
                    child, port = start_haproxy(procs, backends, workdir, args.haproxy_tuned)
                memory[name].append(idle_memory(child.pid, port, args.idle))
                say(f"round {r + 1} memory {name:9s} {memory[name][-1] / 1024:8.1f} KiB per idle connection")
                procs.stop(child)
    finally:
        procs.stop_all()
        stack.close()
        shutil.rmtree(workdir, ignore_errors=True)

    say("\nmedians over the rounds" + (" (ratio to haproxy)" if have_haproxy else ""))
    for name in names:
        s, b = median(setups[name]), median(bulk[name])
        line = f"  {name:9s} setups {s:8.0f}/s   bulk {b:8.0f} MiB/s each way"
        if have_haproxy:
            line += f"   ({s / median(setups['haproxy']):5.2f}x, {b / median(bulk['haproxy']):5.2f}x)"
        say(line)
    say("CPU time of the middle process (lower is better)")
    for name in names[1:]:
        c, m = median(setup_cpu[name]), median(bulk_cpu[name])
        line = f"  {name:9s} {c:8.0f} us per setup   {m:6.2f} ms per MiB each way"
        if have_haproxy:
            line += f"   ({c / median(setup_cpu['haproxy']):5.1f}x, {m / median(bulk_cpu['haproxy']):5.2f}x)"
        say(line)
    for part, values in behind_cpu.items():
        if values:
            say(f"  {part:13s} {median(values):4.0f} us per setup (behind the proxy)")
    for name, values in memory.items():
        say(f"  {name:9s} memory {median(values) / 1024:8.1f} KiB per idle connection ({args.idle} held)")


if __name__ == "__main__":
    main()
