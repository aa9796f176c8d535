"""Start broker processes (`python -m rdbroker_broker`) on loopback ports for tests and benches."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from tests.support.postgres import free_port


@dataclass
class BrokerProcess:
    process: asyncio.subprocess.Process
    grpc_port: int
    http_port: int
    killed: bool = False

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def kill(self) -> None:
        self.killed = True
        self.process.send_signal(signal.SIGKILL)


@contextlib.asynccontextmanager
async def running_broker(
    database_url: str, *extra: str, env: dict[str, str] | None = None
) -> AsyncIterator[BrokerProcess]:
    """A broker process on free loopback ports, once /readyz answers (`env` added to this process's).
    At exit a broker still running gets SIGTERM and must exit 0 within 30 s (a test may have killed it
    instead)."""
    grpc_port, http_port = free_port(), free_port()
    args = [
        sys.executable,
        "-m",
        "rdbroker_broker",
        "--database-url",
        database_url,
        "--grpc-listen",
        f"127.0.0.1:{grpc_port}",
        "--http-listen",
        f"127.0.0.1:{http_port}",
        "--log-level",
        "WARNING",
        *extra,
    ]
    log = tempfile.TemporaryFile()  # noqa: SIM115 - a file, not a pipe: nobody has to keep reading it
    proc = await asyncio.create_subprocess_exec(*args, env={**os.environ, **(env or {})}, stderr=log)
    stopped_cleanly = True
    broker: BrokerProcess | None = None
    try:
        async with httpx.AsyncClient(timeout=1.0) as client:
            for _ in range(300):  # up to ~30 s on a loaded machine
                if proc.returncode is not None:
                    log.seek(0)
                    raise AssertionError(
                        f"broker exited with {proc.returncode}: {log.read().decode()[-2000:]}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"http://127.0.0.1:{http_port}/readyz")).status_code == 200:
                        break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("broker did not become ready")
        broker = BrokerProcess(proc, grpc_port, http_port)
        yield broker
    finally:
        if proc.returncode is None and not (broker is not None and broker.killed):
            proc.send_signal(signal.SIGTERM)
            try:
                stopped_cleanly = await asyncio.wait_for(proc.wait(), 30) == 0
            except TimeoutError:
                stopped_cleanly = False
                proc.kill()
                await asyncio.wait_for(proc.wait(), 10)
        else:
            await proc.wait()
        log.close()
    assert stopped_cleanly, "the broker did not exit 0 within 30 s of SIGTERM"


@contextlib.asynccontextmanager
async def broker_process(
    database_url: str, *extra: str, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[int, int]]:
    """A broker process; yields (grpc_port, http_port) once /readyz answers; SIGTERM at exit."""
    async with running_broker(database_url, *extra, env=env) as broker:
        yield broker.grpc_port, broker.http_port
