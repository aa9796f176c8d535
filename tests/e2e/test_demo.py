"""`rdbroker up` / `rdbroker demo`: broker, proxy and health in one process, routing a returning user back.

In-process tests drive `up.serve` / `up.run_demo` on the test's event loop; the last one runs the real
command as a process and stops it with SIGTERM, as an operator's Ctrl-C would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rdbroker_cli import components, demo_connect, farm, up
from rdbroker_rdp.fakeserver import FakeRdpServer

REPO = Path(__file__).resolve().parents[2]
LOOPBACK_ANY = "127.0.0.1:0"


def loopback_config(database_url: str, **extra: str) -> components.UpConfig:
    return components.UpConfig(
        listen=extra.get("listen", LOOPBACK_ANY),
        http_listen=LOOPBACK_ANY,
        grpc_listen=LOOPBACK_ANY,
        database_url=database_url,
    )


Starter = Callable[[asyncio.Event, Callable[[up.Listening], None]], Coroutine[Any, Any, None]]


@contextlib.asynccontextmanager
async def running(start: Starter) -> AsyncIterator[up.Listening]:
    """Run `start(stop, on_ready)` until the block ends; yields where it listens."""
    stop = asyncio.Event()
    ready: asyncio.Future[up.Listening] = asyncio.get_running_loop().create_future()

    def on_ready(where: up.Listening) -> None:
        ready.set_result(where)

    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(start(stop, on_ready))
        async with asyncio.timeout(30):
            waiting: list[asyncio.Future[Any]] = [task, ready]
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # raises what went wrong
            raise AssertionError("up stopped before it was ready")
        try:
            yield ready.result()
        finally:
            stop.set()
    assert task.done()


async def connect_as(where: up.Listening, user: str) -> str:
    """One RDP connection through the proxy as `user`; answers the server the broker names for them."""
    what, writer = await demo_connect.connect(where.rdp, user, "", timeout_s=10)
    assert what.startswith("negotiation response")
    writer.close()
    await writer.wait_closed()
    async with httpx.AsyncClient(base_url=f"http://{where.http}", timeout=10) as client:
        for _ in range(50):  # the proxy reports the connection asynchronously
            answer = (await client.get(f"/v1/users/{user}/sessions")).json()
            if answer["sessions"]:
                break
            await asyncio.sleep(0.1)
    (session,) = answer["sessions"]
    return str(session["server_address"])


async def test_demo_sends_a_returning_user_back_to_the_same_server(tmp_path):
    config = loopback_config(f"sqlite+aiosqlite:///{tmp_path / 'demo.db'}")
    async with running(lambda stop, ready: up.run_demo(config, 3, stop, ready)) as where:
        assert len(where.fake_servers) == 3
        first = await connect_as(where, "alice")
        assert first in where.fake_servers
        assert await connect_as(where, "ALICE") == first  # user names compare case-insensitively
        async with httpx.AsyncClient(base_url=f"http://{where.http}", timeout=10) as client:
            assert (await client.get("/healthz")).status_code == 200


async def test_up_on_postgresql_with_servers_from_the_command_line(pg_database_url):
    async with FakeRdpServer() as fake:
        config = loopback_config(pg_database_url)
        servers = farm.from_servers([fake.address])
        async with running(lambda stop, ready: up.serve(config, servers, stop, ready)) as where:
            assert where.database.startswith("postgresql://")
            assert await connect_as(where, "bob") == fake.address
        assert fake.accepted >= 1


async def test_up_with_a_farm_file_routes_by_collection(tmp_path):
    async with FakeRdpServer() as default_server, FakeRdpServer() as sales_server:
        path = tmp_path / "farm.yaml"
        path.write_text(
            "pools:\n  - name: default\n    default: true\n  - name: Sales\n    disconnect_timeout: 2h\n"
            f"servers:\n  - address: {default_server.address}\n    pool: default\n"
            f"  - address: {sales_server.address}\n    pool: Sales\n    max_sessions: 10\n"
        )
        config = loopback_config(f"sqlite+aiosqlite:///{tmp_path / 'up.db'}")
        async with running(
            lambda stop, ready: up.serve(config, farm.load(path), stop, ready, str(path))
        ) as where:
            assert where.farm == "2 servers in 2 pools"
            _, writer = await demo_connect.connect(where.rdp, "dora", "Sales", timeout_s=10)
            writer.close()
            async with httpx.AsyncClient(base_url=f"http://{where.http}", timeout=10) as client:
                for _ in range(50):
                    sessions = (await client.get("/v1/users/dora/sessions")).json()["sessions"]
                    if sessions:
                        break
                    await asyncio.sleep(0.1)
                assert [(s["pool"], s["server_address"]) for s in sessions] == [
                    ("Sales", sales_server.address)
                ]
                pools = (await client.get("/v1/pools")).json()["pools"]
                assert [(p["name"], p["disconnect_timeout_s"]) for p in pools] == [
                    ("Sales", 7200.0),
                    ("default", 28800.0),
                ]


async def test_a_taken_rdp_port_stops_everything_with_one_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = loopback_config(f"sqlite+aiosqlite:///{tmp_path / 'up.db'}", listen=f"127.0.0.1:{port}")
        async with asyncio.timeout(60):
            with pytest.raises(up.UpError) as caught:
                await up.serve(config, farm.from_servers(["127.0.0.1:3389"]), asyncio.Event(), lambda _: None)
    assert str(caught.value).startswith(f"proxy: the proxy cannot listen on 127.0.0.1:{port}: ")


async def test_an_unreachable_database_is_one_clear_error():
    config = loopback_config("postgresql://postgres@127.0.0.1:1/nowhere?connect_timeout=2")
    async with asyncio.timeout(60):
        with pytest.raises(up.UpError) as caught:
            await up.serve(config, farm.from_servers(["127.0.0.1:3389"]), asyncio.Event(), lambda _: None)
    assert str(caught.value).startswith("cannot reach the database postgresql://postgres@127.0.0.1:1/nowhere")
    assert "\n" not in str(caught.value)


def read_banner(process: subprocess.Popen[str], deadline: float) -> dict[str, str]:
    """The banner's `label  value` lines, read until `Stop with Ctrl-C.`."""
    assert process.stdout is not None
    found: dict[str, str] = {}
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise AssertionError(f"rdbroker demo exited early with {process.wait(5)}")
        if line.startswith("Stop with Ctrl-C."):
            return found
        label, _, value = line.strip().partition("  ")
        found[label] = value.strip()
    raise AssertionError("no banner in time")


@contextlib.contextmanager
def demo_process(workdir: Path, env: dict[str, str] | None = None) -> Iterator[dict[str, str]]:
    """`rdbroker demo` on free loopback ports as a process; yields its banner, then SIGTERMs it and
    checks that it stopped cleanly (exit 0, no traceback in its log)."""
    argv = [sys.executable, "-m", "rdbroker_cli", "demo", "--listen", LOOPBACK_ANY]
    argv += ["--http-listen", LOOPBACK_ANY, "--grpc-listen", LOOPBACK_ANY]
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    log_path = workdir / "demo.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            argv, cwd=workdir, env=environment, stdout=subprocess.PIPE, stderr=log, text=True
        )
        try:
            yield read_banner(process, time.monotonic() + 60)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
            if process.stdout is not None:
                process.stdout.close()
    assert "Traceback" not in log_path.read_text()


def test_demo_command_routes_and_stops_on_sigterm(tmp_path):
    with demo_process(tmp_path) as banner:
        rdp, url = banner["RDP clients connect to"], banner["dashboard"].rstrip("/")
        servers = []
        for user in ("carol", "carol"):
            done = subprocess.run(
                [sys.executable, "-m", "rdbroker_cli", "demo-connect", user, "--to", rdp, "--url", url],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            assert done.stdout.startswith(f"{user}: connected through {rdp}; the server answered")
            servers.append(done.stdout.splitlines()[1].split(" on ")[1].split()[0])
        assert servers[0] == servers[1]
        assert servers[0] in banner["fake RDP servers"]
