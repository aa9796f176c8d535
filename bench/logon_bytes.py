"""Bytes a real xrdp server sends per connection, through rdbroker's proxy, for junk, failed and real logons.

    sudo .venv/bin/python bench/logon_bytes.py [--runs 3]

Needs root and Debian's xrdp, tigervnc-standalone-server, freerdp2-x11, rdesktop, xvfb and nmap
(scripts/install_system_deps.sh installs them). It builds one xrdp + xrdp-sesman server with Xvnc sessions
on loopback (tests/support/xrdp_server.py), a local user with a password, and `rdbroker up` (embedded
SQLite, JSON logs) in front of it; runs each case `--runs` times through the proxy; reads the byte counts
from the proxy's `connection ended` log lines (the same figures it reports to the broker, stored in
`connections.bytes_from_server`); removes everything it made; prints one table row per case.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.support is this repository's own code

from tests.support import xrdp_server as xs  # noqa: E402 - after the path set-up
from tests.support.postgres import free_port  # noqa: E402

JUNK_BYTES = 2048  # the pool's default junk_bytes


@dataclass
class Proxy:
    """`rdbroker up` in front of one server; its log is read for the connections' byte counts."""

    root: Path
    server: str
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    seen: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.root / "up.log"

    def start(self) -> Proxy:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "rdbroker_cli",
                    "up",
                    "--server",
                    self.server,
                    "--listen",
                    self.address,
                    "--http-listen",
                    f"127.0.0.1:{free_port()}",
                    "--grpc-listen",
                    f"127.0.0.1:{free_port()}",
                    "--database-url",
                    f"sqlite+aiosqlite:///{self.root / 'rdbroker.db'}",
                    "--log-format",
                    "json",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.root,
            )
        deadline = time.monotonic() + 60
        while not xs.listening(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"rdbroker up did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)
        self.new_connections()  # the readiness check's own connection
        return self

    def ended(self) -> list[dict[str, object]]:
        lines = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"connection ended' in line:
                lines.append(json.loads(line))
        return lines

    def new_connections(self, settle_s: float = 1.0, timeout_s: float = 15.0) -> list[dict[str, object]]:
        """The connections that ended since the last call, once none has ended for `settle_s`."""
        deadline = time.monotonic() + timeout_s
        count, quiet_since = len(self.ended()), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.2)
            now = len(self.ended())
            if now != count:
                count, quiet_since = now, time.monotonic()
            elif now > self.seen and time.monotonic() - quiet_since >= settle_s:
                break
        fresh = self.ended()[self.seen :]
        self.seen += len(fresh)
        return fresh

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def straight_to_server(address: str) -> int:
    """A bare Connection Request to the server itself, then a half-close as the proxy passes on a
    client's close: every byte the server sends until it closes."""
    from rdbroker_rdp import PROTOCOL_HYBRID, PROTOCOL_SSL, build_connection_request

    host, port = address.rsplit(":", 1)
    received = b""
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(build_connection_request(requested_protocols=PROTOCOL_SSL | PROTOCOL_HYBRID))
        while len(received) < 19:
            received += sock.recv(4096)
        sock.shutdown(socket.SHUT_WR)
        while chunk := sock.recv(4096):
            received += chunk
    return len(received)


def cases(proxy: str, server: xs.XrdpServer, user: xs.LocalUser) -> list[tuple[str, Callable[[], object]]]:
    def desktops() -> int:
        return server.xrdp_text().count(xs.DESKTOP_REACHED)

    def logon(client: Callable[..., int], password: str) -> Callable[[], object]:
        def run() -> object:
            before = desktops()
            return client(proxy, user.name, password, until=lambda: desktops() > before, hold_s=3)

        return run

    return [
        ("bare Connection Request, Confirm read, close", lambda: xs.bare_request(proxy)),
        ("rdbroker health probe", lambda: xs.health_probe(proxy)),
        ("nmap --script rdp-enum-encryption", lambda: xs.nmap_enum_encryption(proxy)),
        ("xfreerdp +auth-only, wrong password", lambda: xs.freerdp_auth_only(proxy, user.name, "wrong")),
        (
            "xfreerdp +auth-only, right password",
            lambda: xs.freerdp_auth_only(proxy, user.name, user.password),
        ),
        (
            "xfreerdp, wrong password, held 5 s",
            lambda: xs.freerdp_logon(proxy, user.name, "wrong", until=None, hold_s=5),
        ),
        ("xfreerdp full logon, desktop held 3 s", logon(xs.freerdp_logon, user.password)),
        ("rdesktop full logon, desktop held 3 s", logon(xs.rdesktop_logon, user.password)),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    missing = xs.missing_tools(("xrdp", "xrdp-sesman", "Xvnc", "xfreerdp", "rdesktop", "xvfb-run", "nmap"))
    if missing:
        sys.stderr.write(f"missing: {', '.join(missing)}; run scripts/install_system_deps.sh as root\n")
        return 2
    root = Path(tempfile.mkdtemp(prefix="rdbroker-logon-bytes-"))
    server = xs.XrdpServer(root / "xrdp")
    server.root.mkdir()
    user: xs.LocalUser | None = None
    proxy: Proxy | None = None
    rows = []
    direct: list[int] = []
    try:
        server.start()
        user = xs.make_user()
        direct = [straight_to_server(server.address) for _ in range(args.runs)]
        sys.stderr.write(f"straight to the server: {direct}\n")
        proxy = Proxy(root, server.address).start()
        for name, run in cases(proxy.address, server, user):
            per_run: list[list[int]] = []
            desktops = []
            for _ in range(args.runs):
                before = server.sessions_created()
                run()
                per_run.append([int(str(c["bytes_from_server"])) for c in proxy.new_connections()])
                desktops.append(server.sessions_created() - before)
                server.end_desktops(user.name)  # each run starts without a desktop
            rows.append((name, per_run, desktops))
            sys.stderr.write(f"{name}: {per_run}, sessions created {desktops}\n")
    finally:
        if proxy is not None:
            proxy.stop()
        server.stop()
        if user is not None:
            user.remove()
        shutil.rmtree(root, ignore_errors=True)
    sys.stdout.write(
        f"| case | connections per run | bytes server -> client, min-max ({args.runs} runs) "
        "| sessions sesman created |\n|---|---|---|---|\n"
    )
    for name, per_run, desktops in rows:
        counts = "/".join(map(str, sorted({len(r) for r in per_run})))
        values = [b for r in per_run for b in r]
        span = f"{min(values):,}-{max(values):,}" if values else "none"
        if values and max(values) < JUNK_BYTES:
            side = "under"
        elif values and min(values) >= JUNK_BYTES:
            side = "over"
        else:
            side = "both sides of"
        made = "/".join(map(str, sorted(set(desktops))))
        sys.stdout.write(f"| {name} | {counts} | {span} ({side} {JUNK_BYTES:,}) | {made} |\n")
    sys.stdout.write(
        f"\nStraight to the server (no proxy), a bare Connection Request, the Confirm read, then a"
        f" half-close: {min(direct)}-{max(direct)} bytes until the server closed.\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
