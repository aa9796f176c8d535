"""A new user arrives through the real proxy while the pool's only server is being started: the client,
its first packet read, waits past the proxy's route timeout and is placed once the server answers its
probe (docs/power.md). The broker's own power loop calls the start hook."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncEngine

from rdbroker_broker.db import migrate
from rdbroker_broker.db.engine import make_engine
from rdbroker_broker.farm import Farm, apply_farm
from rdbroker_broker.power_rules import PoolPower
from rdbroker_rdp import build_connection_request, parse_connection_confirm
from rdbroker_rdp.fakeserver import FakeRdpServer
from tests.integration.broker.conftest import running_broker, server, settings_for
from tests.support.power_hooks import POOL, SECRET, receiver, set_health, state
from tests.unit.proxy.support import STEP_TIMEOUT_S, close, open_client, running_proxy


@pytest.fixture
async def engine(pg_database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(pg_database_url)
    await migrate.upgrade(engine)
    try:
        yield engine
    finally:
        await engine.dispose()


async def test_a_user_waits_in_the_proxy_while_the_server_starts(engine, pg_database_url):
    async with FakeRdpServer(mode="echo") as host, receiver() as got:
        power = PoolPower("default", start_url=got.url("start"), min_free_sessions=1, start_wait_s=20)
        farm = Farm(pools=[POOL], servers=[server(host.address, max_sessions=5)], power={"default": power})
        assert not (await apply_farm(engine, farm)).refusals
        await set_health(engine, host.address, "down", datetime.now(UTC))  # stopped
        settings = settings_for(pg_database_url, power_hook_secret=SecretStr(SECRET), power_interval_s=0.2)
        async with running_broker(settings) as broker:
            async with asyncio.timeout(STEP_TIMEOUT_S):
                await got.called.wait()  # the broker's loop called the start hook
            assert got.calls[0]["server"] == host.address
            assert await state(engine, host.address) == ("starting", "enabled")

            brokers = [f"127.0.0.1:{broker.grpc_port}"]
            async with running_proxy(brokers, route_timeout_s=0.5, route_attempt_timeout_s=0.5) as proxy:
                reader, writer = await open_client(proxy.port)
                try:
                    writer.write(build_connection_request(cookie="alice", requested_protocols=3))
                    with pytest.raises(TimeoutError):  # held: three times the route timeout, no answer
                        async with asyncio.timeout(1.5):
                            await reader.read(1)
                    await set_health(engine, host.address, "up", datetime.now(UTC))  # it answers probes
                    async with asyncio.timeout(STEP_TIMEOUT_S):
                        header = await reader.readexactly(4)
                        confirm = header + await reader.readexactly(int.from_bytes(header[2:4], "big") - 4)
                    assert parse_connection_confirm(confirm) is not None
                finally:
                    await close(writer)
