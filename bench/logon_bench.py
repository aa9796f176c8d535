"""Real `xfreerdp` logons to xrdp + sesman: direct, through HAProxy and through `rdbroker up` (issue #13).

    sudo .venv/bin/python bench/logon_bench.py [--logons 8] [--ways direct,haproxy,rdbroker] [--pause-s 1]
        [--hops]

Needs root and Debian's xrdp, tigervnc-standalone-server, freerdp2-x11, xvfb and haproxy
(scripts/install_system_deps.sh; `apt-get install -y haproxy`; without HAProxy its column is left out).
It builds one xrdp + xrdp-sesman server with Xvnc desktops on loopback (tests/support/xrdp_server.py),
a local user with a password, one Xvfb display for the client, and two ways in beside the direct one:
    direct      xfreerdp talks to xrdp itself
    haproxy     HAProxy 2.6, `mode tcp`, nbthread 1, `balance rdp-cookie`, `persist rdp-cookie` (the
                configuration of bench/proxy_bench.py)
    rdbroker    `rdbroker up --server <xrdp>` on its embedded SQLite store, measured once its health
                replica has marked the server up
    proxy       (not by default) `python -m rdbroker_proxy` against the in-process fake broker
                (bench/proxy_load.py fakebroker): the same splice in a process of its own
Each round takes the ways in a rotating order; for each way it ends the user's desktop, logs on afresh
(sesman creates a session), kills the client, then logs on again (sesman reconnects the session) and
kills the client. A logon is a full xfreerdp password logon (not +auth-only), timed from the client's
start to the moment xrdp logs `connected ok` (its session module is connected to the Xvnc desktop and
the desktop's first screen goes out), read from xrdp's log every 5 ms (its own timestamps are whole
seconds). The same polling times xrdp's earlier steps of each logon: the accepted connection, the
Connection Request read (xrdp logs the security protocol it selects, then sends its Confirm), TLS up,
and sesman's answer to the logon. Nothing is pinned; the load average is printed before and after.
With --hops, a loopback capture (bench/lo_capture.py) during each relayed logon times how long the relay
takes to pass each TCP segment on, each way, and the server's Connection Confirm alone.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))  # tests.support is this repository's own code

import lo_capture  # noqa: E402 - bench/ is the script's directory
from proxy_bench import (  # noqa: E402
    LOAD,
    PY,
    UP_ENV,
    Processes,
    free_port,
    start_haproxy,
    start_proxy,
    start_up,
    wait_port,
)

from tests.support import xrdp_server as xs  # noqa: E402 - after the path set-up

ALL_WAYS = ("direct", "haproxy", "rdbroker", "proxy")
DEFAULT_WAYS = ("direct", "haproxy", "rdbroker")
HEADINGS = {
    "direct": "direct",
    "haproxy": "HAProxy",
    "rdbroker": "`rdbroker up` (embedded SQLite)",
    "proxy": "proxy + fake broker",
}
KINDS = ("fresh", "reconnect")
# xrdp's log lines for the steps of one logon, in order (each one's first appearance is timed).
ACCEPTED = "connection received from"
CONFIRM = "Security protocol: configured"
TLS_UP = "TLS connection established from"
DESKTOP = "] connected ok"  # not "VNC connection complete, connected ok", a moment before
STEPS = (
    ("accepted", ACCEPTED),
    ("confirm", CONFIRM),
    ("tls", TLS_UP),
    ("login", "login successful for user"),
    ("desktop", DESKTOP),
)
STEP_LABELS = {
    "accepted": "xrdp accepts the connection",
    "confirm": "xrdp reads the Connection Request (sends its Confirm)",
    "tls": "xrdp logs TLS up (after the client's MCS Connect Initial)",
    "login": "sesman accepts the logon",
}
SESMAN_KIND = {"fresh": "++ created session", "reconnect": "++ reconnected session"}
POLL_S = 0.005


class LogTail:
    """The lines a log file gains after this object is made (a partial last line waits for its end)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self.partial = b""

    def lines(self) -> list[str]:
        with contextlib.suppress(OSError), self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
            self.offset += len(chunk)
            data = self.partial + chunk
            *whole, self.partial = data.split(b"\n")
            return [line.decode(errors="replace") for line in whole]
        return []


@dataclass
class Logon:
    way: str
    kind: str
    seconds: float  # client start -> xrdp's `connected ok`; NaN when it failed
    steps: dict[str, float] = field(default_factory=dict)  # step -> seconds after client start
    error: str = ""
    # --hops: the relay's delay passing on each segment, "to_server" and "to_client", and the client's
    # pauses with its answer in hand, "waits" (seconds)
    hops: dict[str, list[float]] = field(default_factory=dict)


def logon(
    server: xs.XrdpServer,
    address: str,
    user: xs.LocalUser,
    display: str,
    way: str,
    kind: str,
    timeout_s: float,
    hops: bool = False,
) -> Logon:
    """One full xfreerdp logon to `address`, killed once xrdp logs its desktop connected. With `hops`
    (and `address` a relay's), the loopback capture times the relay's passing on of each segment."""
    xrdp, sesman = LogTail(server.xrdp_log), LogTail(server.sesman_log)
    relay_port = int(address.rsplit(":", 1)[1])
    capture = lo_capture.Capture({relay_port, server.port}) if hops else None
    started = time.monotonic()
    client = subprocess.Popen(
        [
            "xfreerdp",
            f"/v:{address}",
            f"/u:{user.name}",
            f"/p:{user.password}",
            "/cert:ignore",
            "/size:1024x768",
            "/bpp:24",
        ],
        env={**os.environ, "DISPLAY": display},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    seen: list[tuple[float, str]] = []  # xrdp's new lines, each with when it was read
    error = ""
    try:
        while True:
            now = time.monotonic() - started
            lines = xrdp.lines()
            seen += [(now, line) for line in lines]
            if any(DESKTOP in line for line in lines):
                break
            if client.poll() is not None:
                error = f"xfreerdp exited with {client.returncode} before the desktop"
                break
            if now > timeout_s:
                error = f"no desktop within {timeout_s} s"
                break
            time.sleep(POLL_S)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(client.pid, signal.SIGKILL)
        client.wait(timeout=10)
        segments = capture.close() if capture is not None else []
    steps = logon_steps(seen)
    if not error and SESMAN_KIND[kind] not in "\n".join(sesman.lines()):
        error = f"sesman did not log {SESMAN_KIND[kind]!r}"
    seconds = steps.get("desktop", float("nan")) if not error else float("nan")
    delays: dict[str, list[float]] = {}
    if segments and relay_port != server.port:
        delays = lo_capture.relayed(segments, relay_port, server.port)
    client_port = lo_capture.busiest(segments, relay_port)
    if client_port is not None:
        delays["waits"] = lo_capture.waits(segments, client_port, relay_port)
    return Logon(way, kind, seconds, steps, error, delays)


def logon_steps(seen: Sequence[tuple[float, str]]) -> dict[str, float]:
    """When each step of the logon's own connection was read. A health probe's connection (`rdbroker
    up` probes its server) logs the first two steps too: the logon's connection is the one whose client
    port xrdp names when TLS is up, and its Confirm the first after its accept."""
    steps: dict[str, float] = {}
    for step, marker in STEPS:
        for t, line in seen:
            if marker in line and step not in steps:
                steps[step] = t
    port = next((line.rsplit(" port ", 1)[1].split(":")[0] for _, line in seen if TLS_UP in line), "")
    accepted = [i for i, (_, line) in enumerate(seen) if ACCEPTED in line and line.endswith(f" port {port}")]
    if port and accepted:
        steps["accepted"] = seen[accepted[0]][0]
        confirm = [t for t, line in seen[accepted[0] :] if CONFIRM in line]
        if confirm:
            steps["confirm"] = confirm[0]
    return {step: steps[step] for step, _ in STEPS if step in steps}


def start_display() -> tuple[subprocess.Popen[bytes], str]:
    """One Xvfb for the client (xfreerdp needs an X display; none is shown)."""
    read, write = os.pipe()
    display = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write), "-screen", "0", "1280x1024x24", "-nolisten", "tcp"],
        pass_fds=(write,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    os.close(write)
    with os.fdopen(read) as f:
        return display, ":" + f.readline().strip()


def start_up_probing(
    procs: Processes, workdir: Path, server_port: int, interval_ms: int, timeout_s: float = 90.0
) -> int:
    """`rdbroker up` on SQLite with a farm file whose pool probes the server every `interval_ms`;
    returns its RDP port once its health replica has marked the server up."""
    farm = workdir / "farm.yaml"
    probe = f"{{interval: {interval_ms}ms, timeout: 2000ms, rise: 1, fall: 3}}"
    farm.write_text(
        f"pools:\n  - name: default\n    default: true\n    probe: {probe}\n"
        f"servers:\n  - address: 127.0.0.1:{server_port}\n    pool: default\n    weight: 100\n"
    )
    port, http = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RDBROKER_")} | UP_ENV
    args = [PY, "-m", "rdbroker_cli", "up", "--listen", f"127.0.0.1:{port}", "-f", str(farm)]
    args += ["--http-listen", f"127.0.0.1:{http}", "--grpc-listen", f"127.0.0.1:{free_port()}"]
    args += ["--database-url", f"sqlite+aiosqlite:///{workdir / 'up.db'}", "--log-level", "WARNING"]
    child = procs.start(args, env=env)
    wait_port(port, timeout_s, child=child)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        answer = httpx.get(f"http://127.0.0.1:{http}/v1/servers", timeout=5).json()
        if [s["health"] for s in answer["servers"]] == ["up"]:
            return port
        time.sleep(0.25)
    raise SystemExit(f"`up` did not mark the server up in {timeout_s} s")


# -- the table ----------------------------------------------------------------------------------------


def p90(values: Sequence[float]) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=10, method="inclusive")[-1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def seconds(value: float) -> str:
    return "-" if value != value else f"{value:.2f} s"


def micros(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return f"{median(values) * 1e6:,.0f} / {p90(values) * 1e6:,.0f} µs (n={len(values)})"


def table(logons: Sequence[Logon], ways: Sequence[str]) -> str:
    """Markdown: per way, median and p90 of each kind, the median's difference to direct's, the steps'
    medians and the failures."""

    def ok(way: str, kind: str) -> list[Logon]:
        return [lo for lo in logons if lo.way == way and lo.kind == kind and not lo.error]

    def times(way: str, kind: str) -> list[float]:
        return [lo.seconds for lo in ok(way, kind)]

    rows: list[tuple[str, dict[str, str]]] = []
    for kind in KINDS:
        label = "fresh logon (sesman creates the session)" if kind == "fresh" else "reconnect"
        cells = {}
        for way in ways:
            got = times(way, kind)
            cells[way] = "-" if not got else f"{seconds(median(got))} / {seconds(p90(got))} (n={len(got)})"
        rows.append((f"{label}: median / p90", cells))
        if "direct" in ways:
            base = median(times("direct", kind))
            cells = {}
            for way in ways:
                diff = median(times(way, kind)) - base
                cells[way] = "-" if way == "direct" or diff != diff else f"{diff:+.2f} s"
            rows.append((f"{label}: median minus direct's", cells))
    for step, _ in STEPS[:-1]:
        cells = {}
        for way in ways:
            got = [lo.steps[step] for kind in KINDS for lo in ok(way, kind) if step in lo.steps]
            cells[way] = seconds(median(got))
        rows.append((f"{STEP_LABELS[step]}, median after client start (both kinds)", cells))
    waits = {w: [lo.hops["waits"] for lo in logons if lo.way == w and "waits" in lo.hops] for w in ways}
    if any(waits.values()):
        cells = {}
        for w in ways:
            counts, total = [len(x) for x in waits[w]], [sum(x) for x in waits[w]]
            cells[w] = "-" if not counts else f"{median(counts):.1f} ({median(total):.2f} s)"
        rows.append(("client pauses of 50 ms+ with its answer in hand, median per logon (their time)", cells))
    for direction, label in (("to_server", "client to server"), ("to_client", "server to client")):
        pooled = {w: [d for lo in logons if lo.way == w for d in lo.hops.get(direction, [])] for w in ways}
        if any(pooled.values()):
            cells = {w: micros(pooled[w]) for w in ways}
            rows.append((f"relay delay per segment, {label}: median / p90 (--hops)", cells))
    confirms = {
        w: [lo.hops["to_client"][0] for lo in logons if lo.way == w and lo.hops.get("to_client")]
        for w in ways
    }
    if any(confirms.values()):
        cells = {w: "-" if not confirms[w] else f"{median(confirms[w]) * 1e6:,.0f} µs" for w in ways}
        rows.append(("relay delay of the Connection Confirm, median (--hops)", cells))
    cells = {}
    for way in ways:
        failed = [lo for lo in logons if lo.way == way and lo.error]
        cells[way] = str(len(failed)) + (f" ({failed[0].error})" if failed else "")
    rows.append(("failed logons", cells))
    lines = ["| | " + " | ".join(HEADINGS.get(w, w) for w in ways) + " |"]
    lines.append("|---" * (len(ways) + 1) + "|")
    for label, cells in rows:
        lines.append(f"| {label} | " + " | ".join(cells[w] for w in ways) + " |")
    return "\n".join(lines)


# -- the run ------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--logons", type=int, default=8, help="logons of each kind per way (rounds)")
    parser.add_argument(
        "--ways",
        default=",".join(DEFAULT_WAYS),
        help="columns, comma-separated, of: " + ", ".join(ALL_WAYS),
    )
    parser.add_argument("--pause-s", type=float, default=1.0, help="after each client is killed")
    parser.add_argument("--timeout-s", type=float, default=40.0, help="for one logon's desktop")
    parser.add_argument(
        "--probe-interval-ms",
        type=int,
        default=0,
        help="`up`'s health probes of xrdp this often, from a farm file (default: `--server`, every"
        " 2,000 ms; each probe is a connection xrdp forks a process for)",
    )
    parser.add_argument(
        "--hops",
        action="store_true",
        help="capture loopback (AF_PACKET) during each relayed logon: how long the relay takes to pass"
        " each TCP segment on (costs this script CPU while it runs)",
    )
    args = parser.parse_args(argv)
    ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    unknown = [w for w in ways if w not in ALL_WAYS]
    if unknown or not ways:
        parser.error(f"--ways: unknown {', '.join(unknown) or '(none)'}; choose from {', '.join(ALL_WAYS)}")
    if args.logons < 1:
        parser.error("--logons: at least 1")
    args.ways = ways
    return args


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    args = parse_args()
    ways = list(args.ways)
    missing = xs.missing_tools(("xrdp", "xrdp-sesman", "Xvnc", "xfreerdp", "Xvfb", "unshare", "nsenter"))
    if missing:
        sys.stderr.write(f"missing: {', '.join(missing)}; run scripts/install_system_deps.sh as root\n")
        return 2
    if "haproxy" in ways and shutil.which("haproxy") is None:
        say("haproxy is not installed: no HAProxy column (apt-get install -y haproxy)")
        ways.remove("haproxy")
    say(f"load average before: {load()} (1, 5, 15 min); cpus {os.cpu_count()}; nothing pinned")
    workdir = Path(tempfile.mkdtemp(prefix="logonbench-"))
    procs = Processes(workdir, None)
    server = xs.XrdpServer(workdir / "xrdp")
    user: xs.LocalUser | None = None
    display: subprocess.Popen[bytes] | None = None
    logons: list[Logon] = []
    try:
        server.start()
        user = xs.make_user("rdlb")
        display, display_name = start_display()
        addresses = {"direct": server.address}
        if "haproxy" in ways:
            _, port = start_haproxy(procs, [server.port], workdir)
            addresses["haproxy"] = f"127.0.0.1:{port}"
        if "rdbroker" in ways:
            if args.probe_interval_ms:
                port = start_up_probing(procs, workdir, server.port, args.probe_interval_ms)
            else:
                _, port = start_up(procs, f"sqlite+aiosqlite:///{workdir / 'up.db'}", [server.port])
            addresses["rdbroker"] = f"127.0.0.1:{port}"
        if "proxy" in ways:
            broker = free_port()
            fake = procs.start([*LOAD, "fakebroker", "--port", str(broker), "--servers", server.address])
            wait_port(broker, child=fake)
            _, port = start_proxy(procs, f"127.0.0.1:{broker}")
            addresses["proxy"] = f"127.0.0.1:{port}"
        say(f"xrdp at {server.address}; " + "; ".join(f"{w} via {a}" for w, a in addresses.items()))
        for r in range(args.logons):
            order = ways[r % len(ways) :] + ways[: r % len(ways)]
            for way in order:
                for kind in KINDS:
                    if kind == "fresh":
                        server.end_desktops(user.name)
                    got = logon(
                        server, addresses[way], user, display_name, way, kind, args.timeout_s, args.hops
                    )
                    logons.append(got)
                    steps = " ".join(f"{s} {t:.2f}" for s, t in got.steps.items())
                    relay = " ".join(
                        f"{d} {len(v)}" if d == "waits" else f"{d} {lo_capture.median(v) * 1e6:.0f}us"
                        for d, v in got.hops.items()
                        if v
                    )
                    say(
                        f"round {r + 1} {way:8s} {kind:9s} {seconds(got.seconds):>7s}  [{steps}]"
                        f" {relay} {got.error}"
                    )
                    time.sleep(args.pause_s)  # xrdp sees the client gone and sesman the session disconnected
    finally:
        procs.stop_all()
        if display is not None:
            display.kill()
            display.wait(timeout=10)
        server.stop()
        if user is not None:
            user.remove()
        shutil.rmtree(workdir, ignore_errors=True)
    say(f"\n{args.logons} logon(s) of each kind per way; load average after: {load()}\n")
    say(table(logons, ways))
    return 0


if __name__ == "__main__":
    sys.exit(main())
