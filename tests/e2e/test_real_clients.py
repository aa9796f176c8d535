"""Real RDP software through the proxy: FreeRDP and rdesktop clients, xrdp servers.

The proxy must route on what real clients send and pass TLS through untouched: each client has to get
through the TLS handshake and the whole RDP connection sequence with xrdp, up to the point where xrdp
hands the logon to its session manager (which the test does not run, so no desktop is ever created).
Two xrdp instances stand for two terminal servers, so a user's second logon must land where the first did.
The packages (xrdp, freerdp2-x11, rdesktop, xvfb) are installed by scripts/test.sh.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from rdbroker_proto.v1 import broker_pb2, broker_pb2_grpc
from tests.support.cluster import Harness
from tests.support.postgres import free_port

TOOLS = ("xrdp", "xfreerdp", "rdesktop", "xvfb-run")
# xrdp logs this once a client's logon info has arrived over TLS: the RDP connection sequence is done.
LOGON_REACHED = "[INFO ] connecting to sesman"


def require_tools() -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    assert not missing, (
        f"missing {missing}: run scripts/test.sh, which installs xrdp, freerdp2-x11, rdesktop, xvfb"
    )


@dataclass
class Xrdp:
    port: int
    log: Path
    process: subprocess.Popen[bytes]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def text(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")
        return ""

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def start_xrdp(root: Path, name: str) -> Xrdp:
    """xrdp on 127.0.0.1 and a free port, with its own config and log file (not daemonised)."""
    port = free_port()
    folder = root / name
    folder.mkdir()
    config = folder / "xrdp.ini"
    log = folder / "xrdp.log"
    lines = []
    for line in Path("/etc/xrdp/xrdp.ini").read_text().splitlines():
        if line.startswith("port=") and not lines_in_section(lines):
            line = f"port=tcp://127.0.0.1:{port}"
        elif line.startswith(("LogFile=", "#LogFile=")):
            line = f"LogFile={log}"
        lines.append(line)
    config.write_text("\n".join(lines) + "\n")
    Path("/run/xrdp/sockdir").mkdir(parents=True, exist_ok=True)
    with open(folder / "stdout.log", "ab") as out:
        process = subprocess.Popen(
            ["xrdp", "--nodaemon", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    server = Xrdp(port, log, process)
    deadline = time.monotonic() + 20
    while f"listening to port {port}" not in server.text():
        assert process.poll() is None, f"xrdp exited: {(folder / 'stdout.log').read_text()}"
        assert time.monotonic() < deadline, "xrdp did not start listening"
        time.sleep(0.1)
    return server


def lines_in_section(lines: list[str]) -> bool:
    """True once we are past [Globals] (later `port=` lines belong to session types)."""
    sections = [line for line in lines if line.startswith("[")]
    return bool(sections) and sections[-1].strip() != "[Globals]"


def run_client(command: list[str], servers: list[Xrdp], answer: bytes = b"", seconds: float = 40) -> None:
    """Run an RDP client under Xvfb until one of the servers logs one more logon, then stop it.

    `answer` goes to the client's standard input (rdesktop asks whether to trust the certificate)."""
    before = sum(s.text().count(LOGON_REACHED) for s in servers)
    client = subprocess.Popen(
        ["xvfb-run", "-a", *command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.PIPE,
        start_new_session=True,
    )
    assert client.stdin is not None
    with contextlib.suppress(BrokenPipeError):
        client.stdin.write(answer)
        client.stdin.flush()
    try:
        deadline = time.monotonic() + seconds
        while sum(s.text().count(LOGON_REACHED) for s in servers) == before:
            assert time.monotonic() < deadline, f"{command[0]} never reached the logon on any server"
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(client.pid, signal.SIGKILL)
        client.wait(timeout=10)
        client.stdin.close()


@pytest.fixture
def farm(pg_database_url: str) -> Iterator[tuple[Harness, list[Xrdp], str, str]]:
    require_tools()
    harness = Harness()
    harness.supervisor.env["RDBROKER_LOG_FORMAT"] = "json"  # one line per connection, with its fields
    servers: list[Xrdp] = []
    try:
        servers = [start_xrdp(harness.root, f"xrdp{i}") for i in range(2)]
        farm_file = harness.root / "farm.yaml"
        farm_file.write_text(
            "pools:\n  - name: default\n    default: true\n    disconnect_timeout: 1h\nservers:\n"
            + "".join(f"  - address: {s.address}\n    pool: default\n" for s in servers)
        )
        sup = harness.supervisor
        sup.run("migrate", ["-m", "rdbroker_cli", "migrate", "--database-url", pg_database_url])
        sup.run(
            "apply", ["-m", "rdbroker_cli", "apply", "--database-url", pg_database_url, "-f", str(farm_file)]
        )
        grpc_port, http_port, rdp_port, probe_port = (free_port() for _ in range(4))
        sup.start(
            "broker",
            [
                "-m",
                "rdbroker_broker",
                "--database-url",
                pg_database_url,
                "--grpc-listen",
                f"127.0.0.1:{grpc_port}",
                "--http-listen",
                f"127.0.0.1:{http_port}",
            ],
            ports={"grpc": grpc_port},
            grpc_ready="grpc",
        )
        sup.start(
            "proxy",
            [
                "-m",
                "rdbroker_proxy",
                "--listen",
                f"127.0.0.1:{rdp_port}",
                "--broker",
                f"127.0.0.1:{grpc_port}",
                "--grpc-listen",
                f"127.0.0.1:{probe_port}",
            ],
            ports={"rdp": rdp_port, "grpc": probe_port},
            grpc_ready="grpc",
            tcp_ready=["rdp"],
        )
        yield harness, servers, f"127.0.0.1:{rdp_port}", f"127.0.0.1:{grpc_port}"
    finally:
        for server in servers:
            server.stop()
        harness.cleanup()


def sessions_of(broker: str, user: str) -> list[broker_pb2.Session]:
    with grpc.insecure_channel(broker) as channel:
        answer = broker_pb2_grpc.BrokerStub(channel).LookupUserSessions(
            broker_pb2.LookupUserSessionsRequest(user=user), timeout=5
        )
    return list(answer.sessions)


def logons_at(server: Xrdp) -> int:
    return server.text().count(LOGON_REACHED)


@pytest.mark.slow
def test_freerdp_and_rdesktop_through_the_proxy_keep_their_server(farm) -> None:
    _, servers, proxy, broker = farm
    by_address = {s.address: s for s in servers}

    # FreeRDP: NLA refused by xrdp, TLS negotiated, whole connection sequence through the proxy.
    freerdp = ["xfreerdp", f"/v:{proxy}", "/u:alice", "/p:secret", "/cert:ignore", "/sec:tls"]
    run_client(freerdp, servers)
    alice = sessions_of(broker, "alice")
    assert len(alice) == 1, alice
    home = by_address[alice[0].server_address]
    assert logons_at(home) == 1
    assert "TLS connection established" in home.text()

    # rdesktop sends its own cookie; it is placed too. alice's closed claim holds no capacity (no
    # agent confirmed it), so it does not count in her server's load: bob may land there too.
    logons = {address: logons_at(server) for address, server in by_address.items()}
    run_client(["rdesktop", "-u", "bob", "-p", "secret", proxy], servers, answer=b"yes\n")
    bob = sessions_of(broker, "bob")
    assert len(bob) == 1, bob
    assert logons_at(by_address[bob[0].server_address]) == logons[bob[0].server_address] + 1

    # alice again: back to the server that holds her session, never a second session.
    before = logons_at(home)
    run_client(freerdp, servers)
    again = sessions_of(broker, "alice")
    assert [s.session_id for s in again] == [alice[0].session_id]
    assert logons_at(home) == before + 1


@pytest.fixture
def one_xrdp() -> Iterator[Xrdp]:
    require_tools()
    harness = Harness()
    server = start_xrdp(harness.root, "xrdp")
    try:
        yield server
    finally:
        server.stop()
        harness.cleanup()


async def test_health_probe_reads_xrdps_confirm_and_creates_no_session(one_xrdp: Xrdp) -> None:
    from rdbroker_health.probes.rdp import probe_rdp

    result = await probe_rdp(one_xrdp.address, timeout_s=5)
    assert result.ok, result.reason
    assert result.kind == "neg_rsp"
    assert result.selected_protocol == 1  # xrdp picks TLS among the SSL|HYBRID we offer
    await asyncio.sleep(0.5)  # let xrdp log the closed connection
    text = one_xrdp.text()
    assert "Security protocol" in text  # it negotiated...
    assert LOGON_REACHED not in text  # ...and never got near a logon
    assert "TLS connection established" not in text
