"""`python -m rdbroker_proxy` as a process: flags, the bound port in the log, SIGTERM, exit codes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rdbroker_proxy.server import ProxyServer
from rdbroker_rdp.fakeserver import FakeRdpServer
from tests.unit.proxy.fake_broker import Directory, fake_broker
from tests.unit.proxy.support import CR, close, handshake, settings, wait_until


async def next_log(
    stream: asyncio.StreamReader, message: str, seen: list[str] | None = None
) -> dict[str, Any]:
    """The next line logging `message`; every line read (up to it) is added to `seen`."""
    async with asyncio.timeout(30):
        while line := await stream.readline():
            if seen is not None:
                seen.append(line.decode())
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
    assert ended["identity"].startswith("hmac:")
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


async def _identity_logged(env: dict[str, str], *flags: str) -> tuple[str, str]:
    """Run a proxy process, make one connection with the cookie `alice`: the identity its log line
    gives, and everything the process wrote to stderr."""
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
                *flags,
                stderr=asyncio.subprocess.PIPE,
                env={k: v for k, v in os.environ.items() if k != "RDBROKER_LOG_HASH_KEY"} | env,
            )
            assert process.stderr is not None
            seen: list[str] = []
            try:
                listening = await next_log(process.stderr, "proxy listening", seen)
                _, writer, _ = await handshake(listening["port"], CR)
                await close(writer)
                ended = await next_log(process.stderr, "connection ended", seen)
                process.send_signal(signal.SIGTERM)
                async with asyncio.timeout(30):
                    seen.append((await process.stderr.read()).decode())
                    assert await process.wait() == 0
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
    return ended["identity"], "".join(seen)


async def test_the_identity_hash_is_keyed_by_the_deployments_key(tmp_path: Path) -> None:
    """The same key (from the environment or a file) gives the same hash in two processes; another key,
    or none, another hash. Neither the key nor the bare sha256 of the name is ever printed."""
    key, other = "k3y-0f-th1s-d3pl0yment-aaaa", "an0ther-d3pl0yment-k3y-bbbb"
    key_file = tmp_path / "log-hash-key"
    key_file.write_text(key + "\n")
    (a, log_a), (a_from_file, log_file), (b, log_b), (unkeyed, log_none) = await asyncio.gather(
        _identity_logged({"RDBROKER_LOG_HASH_KEY": key}),
        _identity_logged({}, "--log-hash-key-file", str(key_file)),
        _identity_logged({"RDBROKER_LOG_HASH_KEY": other}),
        _identity_logged({}),
    )
    assert a == a_from_file
    assert len({a, b, unkeyed}) == 3
    for identity in (a, b, unkeyed):
        assert identity.startswith("hmac:")
        assert len(identity) == len("hmac:") + 32
    bare = hashlib.sha256(b"alice").hexdigest()
    for log in (log_a, log_file, log_b, log_none):
        assert key not in log
        assert other not in log
        assert bare[:16] not in log
        assert "alice" not in log
    warning = "no log hash key"
    assert [log.count(warning) for log in (log_a, log_file, log_b, log_none)] == [0, 0, 0, 1]


def test_a_short_or_doubled_log_hash_key_is_refused() -> None:
    base = [sys.executable, "-m", "rdbroker_proxy", "--listen", "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0"]
    short = subprocess.run(
        base, capture_output=True, text=True, timeout=60, env=os.environ | {"RDBROKER_LOG_HASH_KEY": "tiny"}
    )
    assert short.returncode == 1
    assert "the log hash key has 4 bytes, at least 16 are needed" in short.stderr
    assert "tiny" not in short.stderr.replace("has 4 bytes", "")
    both = subprocess.run(
        [*base, "--log-hash-key-file", "/dev/null"],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ | {"RDBROKER_LOG_HASH_KEY": "long-enough-secret-key"},
    )
    assert both.returncode == 2
    assert "set either RDBROKER_LOG_HASH_KEY or log_hash_key_file, not both" in both.stderr
    assert "long-enough-secret-key" not in both.stderr
    missing = subprocess.run(
        [*base, "--log-hash-key-file", "/nonexistent/key"], capture_output=True, text=True, timeout=60
    )
    assert missing.returncode == 1
    assert "/nonexistent/key" in missing.stderr
    assert "Traceback" not in missing.stderr
