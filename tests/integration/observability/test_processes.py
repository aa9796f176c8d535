"""The real entry points serve their metrics: a broker and a proxy process started with `--metrics-listen`
route a connection, and each one's Prometheus endpoint shows it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from rdbroker_rdp import build_connection_request
from rdbroker_rdp.fakeserver import FakeRdpServer
from tests.integration.broker.conftest import seed, server
from tests.support import prom
from tests.support.cluster import grpc_serving
from tests.support.postgres import free_port
from tests.unit.proxy.support import close, handshake

ROOT = Path(__file__).resolve().parents[3]


@contextmanager
def process(module: str, *args: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RDBROKER_", "OTEL_"))}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args], cwd=ROOT, env=env, stdout=out, stderr=out
        )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def metrics_text(port: int, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 30.0) -> str:
    """The process's /metrics once it answers (bounded); fails with its log if it died."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, log.read_text(errors="replace")[-2000:]
        try:
            return prom.scrape(port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, log.read_text(errors="replace")[-2000:]
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{url} not ready: {log.read_text(errors='replace')[-2000:]}"
        time.sleep(0.1)


def wait_serving(port: int, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not grpc_serving(f"127.0.0.1:{port}"):
        assert proc.poll() is None, log.read_text(errors="replace")[-2000:]
        assert time.monotonic() < deadline, f"proxy not serving: {log.read_text(errors='replace')[-2000:]}"
        time.sleep(0.1)


async def wait_for_sample(port: int, name: str, want: float, timeout_s: float = 20.0, **labels: str) -> float:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await asyncio.to_thread(lambda: prom.sample(prom.scrape(port), name, **labels))
        if value == want or time.monotonic() > deadline:
            return value or 0.0
        await asyncio.sleep(0.1)


async def test_broker_and_proxy_processes_serve_their_metrics(pg_database_url, engine, tmp_path):
    grpc_port, http_port, broker_metrics = free_port(), free_port(), free_port()
    rdp_port, health_port, proxy_metrics = free_port(), free_port(), free_port()
    broker_log, proxy_log = tmp_path / "broker.log", tmp_path / "proxy.log"
    async with FakeRdpServer(mode="echo") as rdp:
        await seed(engine, server(rdp.address))
        with process(
            "rdbroker_broker",
            "--database-url", pg_database_url,
            "--grpc-listen", f"127.0.0.1:{grpc_port}",
            "--http-listen", f"127.0.0.1:{http_port}",
            "--metrics-listen", f"127.0.0.1:{broker_metrics}",
            log=broker_log,
        ) as broker:  # fmt: skip
            # The proxy fails a Route fast while its broker channel is in reconnect backoff: start it
            # once the broker serves.
            await asyncio.to_thread(wait_ready, f"http://127.0.0.1:{http_port}/readyz", broker, broker_log)
            with process(
                "rdbroker_proxy",
                "--listen", f"127.0.0.1:{rdp_port}",
                "--grpc-listen", f"127.0.0.1:{health_port}",
                "--broker", f"127.0.0.1:{grpc_port}",
                "--metrics-listen", f"127.0.0.1:{proxy_metrics}",
                log=proxy_log,
            ) as proxy:  # fmt: skip
                await asyncio.to_thread(wait_serving, health_port, proxy, proxy_log)
                text = await asyncio.to_thread(metrics_text, broker_metrics, broker, broker_log)
                assert prom.sample(text, "rdbroker_routes_total") is None  # nothing routed yet
                text = await asyncio.to_thread(metrics_text, proxy_metrics, proxy, proxy_log)
                assert prom.sample(text, "rdbroker_proxy_active_connections") == 0

                try:
                    reader, writer, _ = await handshake(
                        rdp_port, build_connection_request(cookie="CORP\\proc")
                    )
                except (OSError, asyncio.IncompleteReadError) as exc:
                    logs = proxy_log.read_text()[-3000:] + broker_log.read_text()[-3000:]
                    raise AssertionError(f"the connection was not routed:\n{logs}") from exc
                logon = b"z" * 4096  # echoed: more than junk_bytes from the server, a session to keep
                writer.write(logon)
                assert await asyncio.wait_for(reader.readexactly(len(logon)), 10) == logon
                assert prom.sample(prom.scrape(proxy_metrics), "rdbroker_proxy_active_connections") == 1
                text = prom.scrape(broker_metrics)
                assert prom.sample(text, "rdbroker_routes_total", reason="new", outcome="ok") == 1
                assert prom.sample(text, "rdbroker_route_duration_seconds_count") == 1

                await close(writer)
                assert await wait_for_sample(proxy_metrics, "rdbroker_proxy_active_connections", 0) == 0
                sent = prom.sample(
                    prom.scrape(proxy_metrics), "rdbroker_proxy_bytes_total", direction="from_server"
                )
                assert sent is not None
                assert sent >= len(logon)
                # The proxy reports the close: the broker's count moves the session to disconnected.
                assert (
                    await wait_for_sample(broker_metrics, "rdbroker_sessions", 1, state="disconnected") == 1
                )
