"""`rdbroker up` and the cluster's proxy beside HAProxy: one command prints the table of issue #13.

    .venv/bin/python bench/proxy_bench.py [--quick] [--rounds 3] [--setups 3000] [--concurrency 64]
        [--alone 500] [--bulk-mib 64] [--streams 8] [--idle 5000] [--idle-rounds 1]
        [--sticky-users 1000] [--sticky-rounds 3] [--backends 4] [--targets haproxy,up,...]
        [--no-pin] [--haproxy-tuned] [--server-url postgresql://postgres@127.0.0.1:5432]

Targets (columns), the setups and bulk runs interleaved in a rotating order each round:
    direct      the client talks to one fake terminal server itself (a floor, not a proxy)
    haproxy     `mode tcp`, `balance rdp-cookie`, `persist rdp-cookie`, nbthread 1 (when installed)
    up          `rdbroker up` (broker, proxy and health in one process) on its embedded SQLite store
    up-pg       `rdbroker up --database-url postgresql://...` on a throwaway database
    proxy       `python -m rdbroker_proxy` with the in-process fake broker (a separate process)
    proxy+db    the same proxy against a real broker process on PostgreSQL
    proxy+db-unary  the same, with one unary Route call per connection (--no-route-stream)
Every client is a real X.224 Connection Request with a cookie, through to --backends fake terminal
servers (bench/proxy_load.py backend; they answer the health replica's RDP probe, and `up` is measured
only once its health replica has marked every one of them up).

Pinning (unless --no-pin, on a machine with 2 cores or more): this script, the load generators and the
fake terminal servers run on the first core; the process under test (HAProxy, `up`, the proxy, and the
cluster's broker or fake broker) on the last. PostgreSQL is a system service and is not pinned.

Rows: setups/s at --concurrency (closed loop) and their ratio to HAProxy; setup latency p50/p99 at that
concurrency, and for one client alone; CPU time of the process under test per setup (user + system);
bulk MiB/s each way with --streams streams; --idle handshaken connections held open by a fresh process
(how many it held, and how many failed) and its RSS growth per held connection; stickiness: --sticky-users
users connect --sticky-rounds times each (a round ends before the next begins), asking the backend which
server it is; the users that reached more than one server are counted. Medians over the rounds.
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import psycopg
from route_bench import backends_cpu_seconds  # bench/ is on the path: the script's directory

ROOT = Path(__file__).resolve().parent.parent
LOAD = [sys.executable, str(ROOT / "bench" / "proxy_load.py")]
PY = sys.executable
LOGS: dict[int, Path] = {}  # pid of a child -> the file holding its stderr
SETTLE_S = 2.0  # between the concurrent setups and the one client alone
ALL_TARGETS = ("direct", "haproxy", "up", "up-pg", "proxy", "proxy+db", "proxy+db-unary")
DEFAULT_TARGETS = ALL_TARGETS[:-1]  # proxy+db-unary on request: RouteStream against unary Route
HEADINGS = {
    "direct": "direct",
    "haproxy": "HAProxy",
    "up": "`up` (embedded SQLite)",
    "up-pg": "`up --database-url postgresql://…`",
    "proxy": "proxy + fake broker",
    "proxy+db": "proxy + broker + PostgreSQL",
    "proxy+db-unary": "the same, unary Route",
}
QUICK = {
    "rounds": 1,
    "setups": 300,
    "alone": 100,
    "bulk_mib": 8,
    "idle": 300,
    "idle_rounds": 1,
    "sticky_users": 100,
}


_GIVEN_PORTS: set[int] = set()


def free_port() -> int:
    """A port free now and not handed out before in this run: the kernel may offer a port again once
    its socket closed, before the process it was picked for binds it (with 200 backends, two got one)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port


def wait_port(port: int, timeout_s: float = 60.0, child: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child is not None and child.poll() is not None:
            log = LOGS.get(child.pid)
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise SystemExit(
                f"{child.args!r} exited with {child.returncode} before listening on {port}\n{tail}"
            )
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise SystemExit(f"nothing listens on {port} after {timeout_s} s")


class Processes:
    """Children started by the bench, all stopped at the end (SIGTERM, then SIGKILL).

    `under_test` children run on `test_cores` (set before exec, so every thread they start inherits it);
    the others inherit this script's own affinity (the load core when pinned)."""

    def __init__(self, workdir: Path, test_cores: set[int] | None) -> None:
        self.children: list[subprocess.Popen[bytes]] = []
        self.workdir = workdir
        self.test_cores = test_cores

    def start(
        self, args: list[str], *, under_test: bool = False, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        cores = self.test_cores if under_test else None
        pin: Callable[[], None] | None = (lambda: os.sched_setaffinity(0, cores)) if cores else None
        path = self.workdir / f"child-{len(LOGS)}.log"
        log = path.open("wb")
        child = subprocess.Popen(
            args,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=log,
            preexec_fn=pin,  # the bench starts no threads of its own
            env=env,
        )
        log.close()
        LOGS[child.pid] = path
        self.children.append(child)
        return child

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


def start_proxy(procs: Processes, broker: str, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
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
            *extra,
        ],
        under_test=True,
    )
    wait_port(port, child=child)
    return child, port


# `up` takes the proxy's limits from the environment (the same names as the proxy's flags).
UP_ENV = {
    "RDBROKER_MAX_CONNECTIONS": "9000",
    "RDBROKER_FIRST_PACKET_TIMEOUT_S": "30",
    "RDBROKER_MAX_ROUTING_PER_CLIENT": "0",  # every client of the bench is 127.0.0.1
}


def start_up(
    procs: Processes, url: str, backends: list[int], timeout_s: float = 90.0
) -> tuple[subprocess.Popen[bytes], int]:
    """`rdbroker up` on `url` with the fake servers; returns once its health replica marks them all up."""
    port, http, grpc = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RDBROKER_")} | UP_ENV
    args = [PY, "-m", "rdbroker_cli", "up", "--listen", f"127.0.0.1:{port}"]
    args += ["--http-listen", f"127.0.0.1:{http}", "--grpc-listen", f"127.0.0.1:{grpc}"]
    args += ["--database-url", url, "--log-level", "WARNING"]
    for backend in backends:
        args += ["--server", f"127.0.0.1:{backend}"]
    child = procs.start(args, under_test=True, env=env)
    wait_port(port, timeout_s, child=child)
    deadline = time.monotonic() + timeout_s
    health: list[str] = []
    while time.monotonic() < deadline:
        # The REST API is open on loopback when no API token is set (as here).
        answer = httpx.get(f"http://127.0.0.1:{http}/v1/servers", timeout=5).json()
        health = [s["health"] for s in answer["servers"]]
        if len(health) == len(backends) and all(h == "up" for h in health):
            return child, port
        time.sleep(0.25)
    raise SystemExit(f"`up` did not mark the fake servers up in {timeout_s} s: {health}")


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
    stick-table type string len 64 size 100k expire 1h
    stick on req.rdp_cookie(mstshash)
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
    child = procs.start(["haproxy", "-db", "-f", str(cfg)], under_test=True)
    wait_port(port, child=child)
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
        ],
        under_test=True,
    )
    wait_port(grpc_port, child=child)
    return f"127.0.0.1:{grpc_port}", child.pid


def cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def run_load(args: list[str]) -> dict[str, float]:
    out = subprocess.run([*LOAD, *args], check=True, capture_output=True, text=True, timeout=1800)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def idle_hold(pid: int, port: int, count: int) -> tuple[int, int, float]:
    """Hold `count` handshaken connections through process `pid`: (held, failed, RSS bytes per held)."""
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
    return int(status["held"]), int(status["failed"]), float((after - before) / max(status["held"], 1))


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- the table ----------------------------------------------------------------------------------------


@dataclass
class Figures:
    """One target's measurements, a list per figure (one value a round); empty when not measured."""

    setups: list[float] = field(default_factory=list)  # setups/s at --concurrency
    p50: list[float] = field(default_factory=list)  # ms at --concurrency
    p99: list[float] = field(default_factory=list)
    alone_p50: list[float] = field(default_factory=list)  # ms, one client
    alone_p99: list[float] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)  # failed setups
    cpu: list[float] = field(default_factory=list)  # µs of the process under test per setup
    behind: dict[str, list[float]] = field(default_factory=dict)  # µs per setup of what serves it
    bulk: list[float] = field(default_factory=list)  # MiB/s each way
    held: list[float] = field(default_factory=list)  # idle connections held
    held_failed: list[float] = field(default_factory=list)
    rss: list[float] = field(default_factory=list)  # bytes per idle connection
    split: list[float] = field(default_factory=list)  # sticky users that reached 2+ servers
    sticky_errors: list[float] = field(default_factory=list)


def number(value: float) -> str:
    """Thousands separated, about three significant digits."""
    if value != value:  # NaN
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def ratio(value: float, base: float | None) -> str:
    if base is None or not base or base != base or value != value:
        return ""
    return f" ({value / base:.2f}x)"


def table(figures: dict[str, Figures], *, concurrency: int, streams: int, idle: int, users: int) -> str:
    """The issue's table, markdown, from the medians; ratios to HAProxy when it was measured."""
    names = list(figures)
    base = figures.get("haproxy")

    def med(name: str, attr: str) -> float:
        return median(getattr(figures[name], attr))

    def with_base(name: str, attr: str) -> str:
        value = med(name, attr)
        if value != value:
            return "-"
        shown = number(value)
        if base is not None and name != "haproxy":
            shown += ratio(value, median(getattr(base, attr)) or None)
        return shown

    def pair(name: str, a: str, b: str) -> str:
        x, y = med(name, a), med(name, b)
        return "-" if x != x else f"{number(x)} / {number(y)} ms"

    def cpu(name: str) -> str:
        value = med(name, "cpu")
        if value != value:
            return "-"
        shown = f"{value:,.0f} µs"
        behind = figures[name].behind
        if behind:
            shown += " (+ " + ", ".join(f"{part} {median(v):,.0f}" for part, v in behind.items()) + ")"
        return shown

    def held(name: str) -> str:
        value = med(name, "held")
        if value != value:
            return "-"
        failed = med(name, "held_failed")
        return f"{value:,.0f}" + (f" (**{failed:,.0f} failed**)" if failed else "")

    def rss(name: str) -> str:
        value = med(name, "rss")
        return "-" if value != value else f"{value / 1024:.1f} KiB"

    def split(name: str) -> str:
        value = med(name, "split")
        if value != value:
            return "-"
        errors = med(name, "sticky_errors")
        return f"{value:,.0f}" + (f" ({errors:,.0f} errors)" if errors else "")

    def setup_errors(name: str) -> str:
        value = med(name, "errors")
        return "-" if value != value else f"{value:,.0f}"

    rows: list[tuple[str, Callable[[str], str]]] = [
        ("setups/s" + (" (ratio to HAProxy)" if base else ""), lambda n: with_base(n, "setups")),
        (f"setup p50 / p99 at {concurrency} concurrent", lambda n: pair(n, "p50", "p99")),
        ("one client alone, p50 / p99", lambda n: pair(n, "alone_p50", "alone_p99")),
        ("failed setups (of the setups/s run)", setup_errors),
        ("CPU per connection (process under test; + what serves it)", cpu),
        (f"bulk MiB/s each way, {streams} streams", lambda n: with_base(n, "bulk")),
        (f"{idle:,} idle connections held", held),
        ("RSS per idle connection", rss),
        (f"stickiness: of {users:,} users, on more than one server", split),
    ]
    lines = ["| | " + " | ".join(HEADINGS.get(n, n) for n in names) + " |"]
    lines.append("|---" * (len(names) + 1) + "|")
    for label, cell in rows:
        lines.append(f"| {label} | " + " | ".join(cell(n) for n in names) + " |")
    return "\n".join(lines)


# -- the run ------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="scale everything down: " + str(QUICK))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--setups", type=int, default=3000, help="setups per round at --concurrency")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--alone", type=int, default=500, help="setups per round of one client alone")
    parser.add_argument("--bulk-mib", type=int, default=64, help="MiB each way per stream")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--idle", type=int, default=5000)
    parser.add_argument("--idle-rounds", type=int, default=1)
    parser.add_argument("--sticky-users", type=int, default=1000)
    parser.add_argument("--sticky-rounds", type=int, default=3)
    parser.add_argument("--backends", type=int, default=4, help="fake terminal servers")
    parser.add_argument(
        "--targets",
        default=",".join(DEFAULT_TARGETS),
        help="columns, comma-separated, of: " + ", ".join(ALL_TARGETS),
    )
    parser.add_argument("--no-pin", action="store_true", help="let the scheduler place every process")
    parser.add_argument("--no-real-broker", action="store_true", help="leave proxy+db out of --targets")
    parser.add_argument(
        "--haproxy-tuned",
        action="store_true",
        help="HAProxy with tune.bufsize 256 KiB and option splice-auto (default: its stock buffers)",
    )
    parser.add_argument(
        "--server-url",
        default=os.environ.get("RDBROKER_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432"),
    )
    args = parser.parse_args(argv)
    if args.quick:
        given = {a.split("=", 1)[0] for a in (argv if argv is not None else sys.argv[1:])}
        for name, value in QUICK.items():
            if f"--{name.replace('_', '-')}" not in given:  # an explicit flag wins over --quick
                setattr(args, name, value)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in ALL_TARGETS]
    if unknown or not targets:
        parser.error(
            f"--targets: unknown {', '.join(unknown) or '(none)'}; choose from {', '.join(ALL_TARGETS)}"
        )
    args.targets = [t for t in targets if not (args.no_real_broker and t.startswith("proxy+db"))]
    return args


def pinning(no_pin: bool) -> tuple[set[int] | None, str]:
    """(cores of the process under test, a line saying so); the caller moves itself to the load core."""
    cores = sorted(os.sched_getaffinity(0))
    if no_pin or len(cores) < 2:
        return None, "not pinned"
    os.sched_setaffinity(0, {cores[0]})  # this script, and every child not under test, inherit it
    return {cores[-1]}, f"load and fake servers on cpu {cores[0]}, process under test on cpu {cores[-1]}"


def main() -> None:
    args = parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it
    test_cores, pinned = pinning(args.no_pin)
    say(f"RLIMIT_NOFILE {hard}; cpus {os.cpu_count()}; load {os.getloadavg()[0]:.2f}; {pinned}")
    targets = list(args.targets)
    if "haproxy" in targets and shutil.which("haproxy") is None:
        say("haproxy is not installed: no comparison (apt-get install -y haproxy)")
        targets.remove("haproxy")
    workdir = Path(tempfile.mkdtemp(prefix="proxybench-"))
    procs = Processes(workdir, test_cores)
    stack = contextlib.ExitStack()
    figures = {name: Figures() for name in targets}
    try:
        backends = [free_port() for _ in range(args.backends)]
        for port in backends:
            procs.start([*LOAD, "backend", "--port", str(port)])
        for port in backends:
            wait_port(port)
        servers = ",".join(f"127.0.0.1:{p}" for p in backends)
        fake_port = 0
        fake_broker: subprocess.Popen[bytes] | None = None
        if "proxy" in targets:
            fake_port = free_port()
            fake_broker = procs.start(
                [*LOAD, "fakebroker", "--port", str(fake_port), "--servers", servers], under_test=True
            )
            wait_port(fake_port, child=fake_broker)

        # Each starter makes a fresh process under test and answers (the child, its port).
        def fresh_up_sqlite() -> tuple[subprocess.Popen[bytes], int]:
            url = f"sqlite+aiosqlite:///{workdir / f'up-{uuid.uuid4().hex[:8]}.db'}"
            return start_up(procs, url, backends)

        def fresh_up_pg() -> tuple[subprocess.Popen[bytes], int]:
            url = stack.enter_context(database(args.server_url))
            child, port = start_up(procs, url, backends)
            database_of[child.pid] = url.rsplit("/", 1)[1]
            return child, port

        database_of: dict[int, str] = {}  # pid of an `up` on PostgreSQL -> its database's name
        real_broker = ("", 0, "")  # address, pid, database name
        if "proxy+db" in targets or "proxy+db-unary" in targets:
            url = stack.enter_context(database(args.server_url))
            address, broker_pid = start_real_broker(procs, url, backends, workdir)
            real_broker = (address, broker_pid, url.rsplit("/", 1)[1])

        starters: dict[str, Callable[[], tuple[subprocess.Popen[bytes], int]]] = {
            "haproxy": lambda: start_haproxy(procs, backends, workdir, args.haproxy_tuned),
            "up": fresh_up_sqlite,
            "up-pg": fresh_up_pg,
            "proxy": lambda: start_proxy(procs, f"127.0.0.1:{fake_port}"),
            "proxy+db": lambda: start_proxy(procs, real_broker[0]),
            "proxy+db-unary": lambda: start_proxy(procs, real_broker[0], "--no-route-stream"),
        }
        running: dict[str, tuple[int, int | None]] = {}  # name -> (port, pid under test; None: direct)
        for name in targets:
            if name == "direct":
                running[name] = (backends[0], None)
            else:
                child, port = starters[name]()
                running[name] = (port, child.pid)
                say(f"started {name} (pid {child.pid}, port {port})")

        def behind_seconds(name: str) -> dict[str, float]:
            pid = running[name][1]
            if name == "proxy" and fake_broker is not None:
                return {"fake broker": cpu_seconds(fake_broker.pid)}
            if name in ("proxy+db", "proxy+db-unary"):
                return {
                    "broker": cpu_seconds(real_broker[1]),
                    "PostgreSQL": backends_cpu_seconds(real_broker[2]),
                }
            if name == "up-pg" and pid is not None:
                return {"PostgreSQL": backends_cpu_seconds(database_of[pid])}
            return {}

        for r in range(args.rounds):
            order = targets[r % len(targets) :] + targets[: r % len(targets)]
            for name in order:
                port, pid = running[name]
                fig = figures[name]
                cpu, behind = cpu_seconds(pid), behind_seconds(name)
                count, concurrency = str(args.setups), str(args.concurrency)
                res = run_load(
                    ["setups", "--port", str(port), "--count", count, "--concurrency", concurrency]
                )
                fig.setups.append(res["count"] / res["seconds"])
                fig.p50.append(res["p50_ms"])
                fig.p99.append(res["p99_ms"])
                fig.errors.append(res["errors"])
                if pid is not None:
                    fig.cpu.append((cpu_seconds(pid) - cpu) / res["count"] * 1e6)
                for part, seconds in behind_seconds(name).items():
                    fig.behind.setdefault(part, []).append((seconds - behind[part]) / res["count"] * 1e6)
                # One client alone on an idle process: what the storm left (reports, a checkpoint)
                # is given time to finish first, as for every target.
                time.sleep(SETTLE_S)
                alone = run_load(
                    ["setups", "--port", str(port), "--count", str(args.alone), "--concurrency", "1"]
                )
                fig.alone_p50.append(alone["p50_ms"])
                fig.alone_p99.append(alone["p99_ms"])
                cpu_text = f"{fig.cpu[-1]:6.0f} us/setup" if fig.cpu else "     - us/setup"
                say(
                    f"round {r + 1} setups {name:9s} {fig.setups[-1]:8.0f}/s  p50/p99 {res['p50_ms']:7.2f}"
                    f" / {res['p99_ms']:7.2f} ms  alone {alone['p50_ms']:6.2f} / {alone['p99_ms']:6.2f} ms"
                    f"  cpu {cpu_text}  errors {res['errors'] + alone['errors']:.0f}"
                )
            for name in order:
                port, pid = running[name]
                cpu = cpu_seconds(pid)
                res = run_load(
                    ["bulk", "--port", str(port), "--mib", str(args.bulk_mib), "--streams", str(args.streams)]
                )
                figures[name].bulk.append(res["mib_each_way"] / res["seconds"])
                per_mib = (cpu_seconds(pid) - cpu) / res["mib_each_way"] * 1e3
                flag = "" if res["ok"] else "  INCOMPLETE"
                say(
                    f"round {r + 1} bulk   {name:9s} {figures[name].bulk[-1]:8.0f} MiB/s each way"
                    f"  cpu {per_mib:6.2f} ms/MiB{flag}"
                )

        for name in targets:
            if name == "direct":
                continue
            port = running[name][0]
            users, rounds = str(args.sticky_users), str(args.sticky_rounds)
            sticky = ["sticky", "--port", str(port), "--users", users, "--rounds", rounds]
            res = run_load([*sticky, "--concurrency", str(args.concurrency)])
            figures[name].split.append(res["split"])
            figures[name].sticky_errors.append(res["errors"])
            say(
                f"sticky {name:9s} {res['split']:.0f} of {res['users']:.0f} users on more than one server"
                f" ({res['servers']:.0f} servers seen, {res['errors']:.0f} errors)"
            )

        for name in targets:  # the processes of the rounds are done: free their ports and memory
            pid = running[name][1]
            for child in list(procs.children):
                if child.pid == pid:
                    procs.stop(child)

        idle_names = [n for n in targets if n != "direct"]
        for r in range(args.idle_rounds):
            for name in idle_names if r % 2 == 0 else reversed(idle_names):
                child, port = starters[name]()
                held, failed, per = idle_hold(child.pid, port, args.idle)
                fig = figures[name]
                fig.held.append(held)
                fig.held_failed.append(failed)
                fig.rss.append(per)
                say(
                    f"round {r + 1} idle   {name:9s} held {held:5d} failed {failed:5d}"
                    f"  {per / 1024:8.1f} KiB per idle connection"
                )
                procs.stop(child)
    finally:
        procs.stop_all()
        stack.close()
        shutil.rmtree(workdir, ignore_errors=True)

    say(f"\nmedians over {args.rounds} round(s); load {os.getloadavg()[0]:.2f}\n")
    say(
        table(
            figures,
            concurrency=args.concurrency,
            streams=args.streams,
            idle=args.idle,
            users=args.sticky_users,
        )
    )


if __name__ == "__main__":
    main()
