"""Start broker processes (`python -m rdbroker_broker`) on loopback ports for tests and benches."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator

import httpx

from tests.support.postgres import free_port


@contextlib.asynccontextmanager
async def broker_process(database_url: str, *extra: str) -> AsyncIterator[tuple[int, int]]:
    """A broker process; yields (grpc_port, http_port) once /readyz answers; SIGTERM at exit."""
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
    proc = await asyncio.create_subprocess_exec(*args, env=os.environ.copy(), stderr=log)
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
        yield grpc_port, http_port
    finally:
        stopped_cleanly = False
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                stopped_cleanly = await asyncio.wait_for(proc.wait(), 30) == 0
            except TimeoutError:
                proc.kill()
                await asyncio.wait_for(proc.wait(), 10)
        log.close()
    assert stopped_cleanly, "the broker did not exit 0 within 30 s of SIGTERM"
