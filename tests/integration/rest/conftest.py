"""The REST API on a real PostgreSQL: a migrated database with a small farm, and an HTTP client on the
app (in-process ASGI transport; the schemathesis run uses a live uvicorn instead)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncEngine

from rdbroker_broker import domain as d
from rdbroker_broker.config import BrokerSettings
from rdbroker_broker.db import migrate
from rdbroker_broker.db.engine import make_engine
from rdbroker_broker.farm import Farm, apply_farm
from rdbroker_broker.rest.app import create_app
from rdbroker_broker.service import BrokerService
from rdbroker_broker.store import Store
from tests.support.postgres import free_port

READ = "read-token-for-tests"
ADMIN = "admin-token-for-tests"
SERVERS = ("10.0.0.11:3389", "10.0.0.12:3389", "10.0.1.21:3389")


def settings_for(url: str, **extra: object) -> BrokerSettings:
    values: dict[str, object] = {
        "database_url": SecretStr(url),
        "grpc_listen": "127.0.0.1:0",
        "http_listen": "127.0.0.1:0",
        "api_read_token": SecretStr(READ),
        "api_admin_token": SecretStr(ADMIN),
    }
    return BrokerSettings(**(values | extra))  # type: ignore[arg-type]


@pytest.fixture
async def engine(pg_database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(pg_database_url)
    await migrate.upgrade(engine)
    farm = Farm(
        pools=[d.Pool("default", True, 3600.0), d.Pool("Sales", False, 7200.0)],
        servers=[
            d.Server(address=SERVERS[0], pool="default", max_sessions=50),
            d.Server(address=SERVERS[1], pool="default"),
            d.Server(address=SERVERS[2], pool="Sales", weight=50),
        ],
    )
    await apply_farm(engine, farm)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
def service(engine: AsyncEngine, pg_database_url: str) -> BrokerService:
    return BrokerService(Store(engine), settings_for(pg_database_url))


@pytest.fixture
async def client(service: BrokerService) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(service))
    headers = {"Authorization": f"Bearer {ADMIN}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://broker", headers=headers) as http:
        yield http


async def place(service: BrokerService, user: str, connection_id: str, pool: str = "") -> d.RouteDecision:
    """Route one connection as a proxy would (the session starts pending)."""
    return await service.route(
        d.RouteRequest(connection_id=connection_id, proxy_id="p1", cookie=user, pool=pool)
    )


FARM_YAML = f"""
pools:
  - name: default
    default: true
  - name: Sales
servers:
  - address: {SERVERS[0]}
    pool: default
  - address: {SERVERS[1]}
    pool: default
  - address: {SERVERS[2]}
    pool: Sales
"""


@dataclass
class LiveBroker:
    url: str
    log: Path
    env: dict[str, str]


def rdbroker(*argv: str) -> list[str]:
    return [sys.executable, "-m", "rdbroker_cli", *argv]


@pytest.fixture
def live_broker(tmp_path: Path, pg_database_url: str) -> Iterator[LiveBroker]:
    """`rdbroker broker` (uvicorn) on 127.0.0.1 over a migrated PostgreSQL holding FARM_YAML, with tokens."""
    env = {
        **os.environ,
        "RDBROKER_DATABASE_URL": pg_database_url,
        "RDBROKER_API_READ_TOKEN": READ,
        "RDBROKER_API_ADMIN_TOKEN": ADMIN,
        "RDBROKER_LOG_FORMAT": "text",
    }
    (tmp_path / "farm.yaml").write_text(FARM_YAML)
    for step in (["migrate"], ["apply", "-f", str(tmp_path / "farm.yaml")]):
        done = subprocess.run(
            rdbroker(*step), env=env, capture_output=True, text=True, timeout=120, check=False
        )
        assert done.returncode == 0, done.stderr
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "broker.log"
    argv = rdbroker("broker", "--http-listen", f"127.0.0.1:{port}", "--grpc-listen", "127.0.0.1:0")
    with log_path.open("w") as log:
        broker = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert broker.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "the broker did not become ready"
                time.sleep(0.2)
            yield LiveBroker(url=url, log=log_path, env=env)
        finally:
            broker.terminate()
            broker.wait(30)
