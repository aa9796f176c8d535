"""`python -m rdbroker_proxy` as a process: flags, the bound port in the log, SIGTERM, exit codes."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
from typing import Any

import pytest

from rdbroker_proxy.server import ProxyServer
from rdbroker_rdp.fakeserver import FakeRdpServer
from tests.unit.proxy.fake_broker import Directory, fake_broker
from tests.unit.proxy.support import CR, close, handshake, settings, wait_until


async def next_log(stream: asyncio.StreamReader, message: str) -> dict[str, Any]:
    async with asyncio.timeout(30):
        while line := await stream.readline():
            record: dict[str, Any] = json.loads(line)
            if record["msg"].startswith(message):
                return record
    raise AssertionError(f"the process ended before logging {message!r}")


async def test_the_process_serves_and_stops_cleanly_on_sigterm() -> None:
    async with FakeRdpServer(mode="echo") as server:
        directory = Directory({"": [server.address]})
        async with fake_broker(directory) as broker:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "rdbroker_proxy",
                "--listen",
                "127.0.0.1:0",
                "--grpc-listen",
                "127.0.0.1:0",
                "--broker",
                broker.address,
                "--proxy-id",
                "proc-proxy",
                stderr=asyncio.subprocess.PIPE,
            )
            assert process.stderr is not None
            try:
                listening = await next_log(process.stderr, "proxy listening")
                assert listening["grpc_port"] > 0
                reader, writer, _ = await handshake(listening["port"], CR)
                writer.write(b"ping")
                async with asyncio.timeout(10):
                    assert await reader.readexactly(4) == b"ping"
                await close(writer)
                ended = await next_log(process.stderr, "connection ended")
                process.send_signal(signal.SIGTERM)
                stopped = await next_log(process.stderr, "proxy stopped")
                async with asyncio.timeout(30):
                    assert await process.wait() == 0
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            await wait_until(lambda: len(directory.closed) == 1)
    assert ended["end_reason"] == "client_closed"
    assert ended["server"] == server.address
    assert ended["bytes_from_client"] == len(CR) + 4
    assert ended["identity"].startswith("sha256:")
    assert stopped["dropped_reports"] == 0
    assert directory.opened[0].proxy_id == "proc-proxy"


def test_invalid_settings_exit_with_a_message() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "rdbroker_proxy", "--broker", "nohostport"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "broker" in result.stderr


def test_the_cli_dispatches_to_the_proxy() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "rdbroker_cli", "proxy", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert "--first-packet-timeout-s" in result.stdout
    assert "RDBROKER_BROKER" in result.stdout


def test_a_port_in_use_exits_1_with_a_message() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "rdbroker_proxy",
                "--listen",
                f"127.0.0.1:{port}",
                "--grpc-listen",
                "127.0.0.1:0",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert "the proxy cannot start" in result.stderr
    assert "Traceback" not in result.stderr


async def test_serve_raises_a_plain_oserror_when_the_port_is_taken() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proxy = ProxyServer(settings(["127.0.0.1:1"], listen=f"127.0.0.1:{taken.getsockname()[1]}"))
        with pytest.raises(OSError, match="in use"):
            await proxy.serve(asyncio.Event())
