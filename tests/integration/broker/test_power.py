"""Capacity on demand on a real PostgreSQL: power hooks called, signed, against a receiver on 127.0.0.1
(docs/power.md). Health results are written as a health replica's report would leave them."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from pydantic import SecretStr
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from rdbroker_broker import domain as d
from rdbroker_broker.app import StartupError
from rdbroker_broker.db import migrate
from rdbroker_broker.db.engine import make_engine
from rdbroker_broker.db.power_repository import PowerRepository
from rdbroker_broker.db.tables import audit, servers
from rdbroker_broker.errors import CapacityStarting, NoCapacity
from rdbroker_broker.farm import Farm, apply_farm
from rdbroker_broker.power import PowerService, Verb
from rdbroker_broker.power_hooks import HookClient
from rdbroker_broker.power_rules import PoolPower
from rdbroker_broker.probing import ProbeService
from rdbroker_broker.rpc.servicer import BrokerServicer
from rdbroker_broker.service import BrokerService
from rdbroker_broker.store import Store
from rdbroker_cli.inprocess import LocalBroker, ProxyBroker
from rdbroker_proto.v1 import broker_pb2 as pb
from rdbroker_proxy.errors import BrokerUnavailable, RouteRefused
from rdbroker_proxy.routing import BrokerClient
from tests.integration.broker.conftest import (
    Clock,
    lock_waiters,
    running_broker,
    server,
    settings_for,
    until_a_statement_waits_on_a_lock,
)
from tests.support.power_hooks import POOL, SECRET, receiver, set_health, state

A, B, C = "10.0.0.1:3389", "10.0.0.2:3389", "10.0.0.3:3389"


async def seed_power(engine: AsyncEngine, power: PoolPower | None, *members: d.Server) -> None:
    farm = Farm(pools=[POOL], servers=list(members), power={power.pool: power} if power else {})
    plan = await apply_farm(engine, farm)
    assert not plan.refusals


def powered(service: BrokerService, **kw) -> PowerService:
    return PowerService(service, HookClient(SECRET, retry_s=kw.pop("retry_s", 5.0), **kw))


async def test_low_capacity_starts_a_stopped_server_through_the_signed_hook(engine, service, clock):
    async with receiver() as got:
        power = PoolPower("default", start_url=got.url("start"), min_free_sessions=2)
        await seed_power(engine, power, server(A, max_sessions=2), server(B, max_sessions=2))
        await set_health(engine, A, "up", clock.now)
        await set_health(engine, B, "down", clock.now)
        loop = powered(service)

        # A offers 2 free sessions: enough. B, which no probe reaches, counts as off.
        assert await loop.run_once() == []
        assert await state(engine, B) == ("off", "enabled")

        await service.route(d.RouteRequest(connection_id="c1", proxy_id="p", cookie="alice"))
        actions = await loop.run_once()  # 1 free < 2
        assert [(a.verb, a.address) for a in actions] == [(Verb.START, B)]
        assert got.refused == []
        assert got.calls == [
            {
                "path": "/start",
                "action": "start",
                "server": B,
                "host": "10.0.0.2",
                "port": 3389,
                "pool": "default",
            }
        ]
        assert await state(engine, B) == ("starting", "enabled")
        async with engine.connect() as conn:
            trail = (
                await conn.execute(
                    select(audit.c.action, audit.c.actor, audit.c.target, audit.c.outcome).where(
                        audit.c.action.like("server.power%")
                    )
                )
            ).all()
        assert [tuple(row) for row in trail] == [("server.power_start", "broker:power", B, "ok")]

        # B being started covers the shortfall: no second call.
        assert await loop.run_once() == []
        assert len(got.calls) == 1

        # Its probe answers: on.
        clock.advance(40)
        await set_health(engine, B, "up", clock.now)
        await loop.run_once()
        assert await state(engine, B) == ("on", "enabled")


async def test_a_hook_that_refuses_the_signature_puts_the_server_back(engine, service, clock):
    async with receiver(secret="another-secret-of-the-receiver") as got:
        power = PoolPower("default", start_url=got.url("start"), min_free_sessions=1)
        await seed_power(engine, power, server(A, max_sessions=2))
        await set_health(engine, A, "down", clock.now)
        loop = powered(service)
        actions = await loop.run_once()
        assert [a.verb for a in actions] == [Verb.START]
        assert got.refused == ["bad signature"]  # 401: a refusal, not retried
        assert got.calls == []
        assert await state(engine, A) == ("off", "enabled")
        async with engine.connect() as conn:
            outcomes = (
                (
                    await conn.execute(
                        select(audit.c.outcome)
                        .where(audit.c.target == A)
                        .where(audit.c.action == "server.power_start")
                        .order_by(audit.c.id)
                    )
                )
                .scalars()
                .all()
            )
        assert outcomes == ["ok", "error"]


async def test_a_hook_answering_503_is_retried_with_the_same_delivery(engine, service, clock):
    async with receiver(fail_next=2) as got:
        power = PoolPower("default", start_url=got.url("start"), min_free_sessions=1)
        await seed_power(engine, power, server(A, max_sessions=2))
        await set_health(engine, A, "down", clock.now)
        await powered(service).run_once()
        assert len(got.calls) == 1
        assert len(got.deliveries) == 3
        assert len(set(got.deliveries)) == 1
        assert await state(engine, A) == ("starting", "enabled")


async def test_two_brokers_at_once_start_one_server_per_shortfall(engine, pg_database_url, clock):
    other = make_engine(pg_database_url)
    try:
        brokers = [BrokerService(Store(e), settings_for(pg_database_url), clock) for e in (engine, other)]
        async with receiver() as got:
            # 1 free session wanted, every server stopped: one start, never more.
            power = PoolPower("default", start_url=got.url("start"), min_free_sessions=1)
            await seed_power(engine, power, *(server(a, max_sessions=2) for a in (A, B, C)))
            for address in (A, B, C):
                await set_health(engine, address, "down", clock.now)
            loops = [powered(b) for b in brokers]
            for _ in range(4):
                await asyncio.gather(*(loop.run_once() for loop in loops))
            assert got.refused == []
            assert [call["server"] for call in got.calls] == [A]
            states = [await state(engine, a) for a in (A, B, C)]
            assert [p for p, _ in states] == ["starting", "off", "off"]
    finally:
        await other.dispose()


async def test_two_brokers_deciding_at_the_same_moment_start_one_server(engine, pg_database_url, clock):
    """Both brokers' ticks are made to reach the pool at once: a third transaction holds the servers'
    rows until a tick waits on them."""
    other = make_engine(pg_database_url)
    try:
        brokers = [BrokerService(Store(e), settings_for(pg_database_url), clock) for e in (engine, other)]
        async with receiver() as got:
            power = PoolPower("default", start_url=got.url("start"), min_free_sessions=1)
            await seed_power(engine, power, *(server(a, max_sessions=2) for a in (A, B)))
            for address in (A, B):
                await set_health(engine, address, "down", clock.now)
            async with engine.connect() as blocker:
                await blocker.begin()
                await blocker.execute(select(servers.c.address).with_for_update())
                ticks = [asyncio.ensure_future(powered(b).run_once()) for b in brokers]
                await until_a_statement_waits_on_a_lock(pg_database_url)
                # The other tick arrives too: it waits on the rows as well, or passes the pool and ends.
                for _ in range(200):  # bounded: 10 s
                    if any(t.done() for t in ticks) or await lock_waiters(pg_database_url) >= 2:
                        break
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError("the other tick neither waits on the rows nor passed the pool")
                await blocker.commit()
            await asyncio.wait_for(asyncio.gather(*ticks), 30)
            assert [call["server"] for call in got.calls] == [A]
    finally:
        await other.dispose()


async def test_a_pool_decided_by_one_broker_is_passed_by_the_other(engine, pg_database_url, clock):
    power = PoolPower("default", start_url="https://hooks.example/start", min_free_sessions=1)
    await seed_power(engine, power, server(A, max_sessions=2))
    async with engine.connect() as first, engine.connect() as second:
        await first.begin()
        await second.begin()
        assert await PowerRepository(first).lock("default") == power
        assert await PowerRepository(second).lock("default") is None  # SKIP LOCKED
        await first.rollback()
        await second.rollback()


async def test_one_claim_wins_a_race_for_one_server(engine, pg_database_url, clock):
    await seed_power(engine, None, server(A, max_sessions=2))
    async with engine.begin() as conn:
        await conn.execute(update(servers).values(power="off"))
    deadline = clock.now + timedelta(minutes=10)
    async with engine.connect() as first, engine.connect() as second:
        await first.begin()
        await second.begin()
        assert await PowerRepository(first).claim_start(A, clock.now, deadline)
        racing = asyncio.ensure_future(PowerRepository(second).claim_start(A, clock.now, deadline))
        await until_a_statement_waits_on_a_lock(pg_database_url)  # on the row the first one claimed
        assert not racing.done()
        await first.commit()
        assert await racing is False  # re-checked after the winner committed: no longer off
        await second.rollback()


async def test_idle_servers_beyond_keep_running_are_drained_and_stopped(engine, service, clock):
    async with receiver() as got:
        power = PoolPower("default", stop_url=got.url("stop"), idle_for_s=1800, keep_running=1)
        await seed_power(engine, power, *(server(a, max_sessions=2) for a in (A, B, C)))
        for address in (A, B, C):
            await set_health(engine, address, "up", clock.now)
        answer = await service.route(d.RouteRequest(connection_id="c1", proxy_id="p", cookie="alice"))
        busy = answer.server_address
        idle = sorted({A, B, C} - {busy})
        loop = powered(service)

        assert await loop.run_once() == []  # idle from now on
        clock.advance(29 * 60)
        assert await loop.run_once() == []
        clock.advance(2 * 60)
        actions = await loop.run_once()
        assert [(a.verb, a.address) for a in actions] == [(Verb.STOP, idle[0])]
        assert got.calls == [
            {
                "path": "/stop",
                "action": "stop",
                "server": idle[0],
                "host": idle[0].split(":")[0],
                "port": 3389,
                "pool": "default",
            }
        ]
        assert await state(engine, idle[0]) == ("stopping", "draining")

        # The other idle server goes next; the busy one is the one kept running.
        actions = await loop.run_once()
        assert [(a.verb, a.address) for a in actions] == [(Verb.STOP, idle[1])]
        assert await loop.run_once() == []
        assert await state(engine, busy) == ("on", "enabled")

        # No new user lands on a stopping server: the busy one takes one more, then it is full.
        placed = await service.route(d.RouteRequest(connection_id="n1", proxy_id="p", cookie="bob"))
        assert placed.server_address == busy
        with pytest.raises(NoCapacity):
            await service.route(d.RouteRequest(connection_id="n2", proxy_id="p", cookie="carol"))

        # Their probes stop answering: off, still drained (the loop's own drain).
        clock.advance(20)
        for address in idle:
            await set_health(engine, address, "down", clock.now)
        await loop.run_once()
        assert [await state(engine, a) for a in idle] == [("off", "draining")] * 2


async def test_a_stop_refused_by_the_hook_leaves_the_server_on_and_enabled(engine, service, clock):
    async with receiver(answer=400) as got:
        power = PoolPower("default", stop_url=got.url("stop"), idle_for_s=60, keep_running=1)
        await seed_power(engine, power, server(A, max_sessions=2), server(B, max_sessions=2))
        for address in (A, B):
            await set_health(engine, address, "up", clock.now)
        loop = powered(service)
        await loop.run_once()
        clock.advance(120)
        actions = await loop.run_once()
        assert [a.verb for a in actions] == [Verb.STOP]
        assert await state(engine, actions[0].address) == ("on", "enabled")


async def test_starting_a_server_the_loop_stopped_undoes_its_drain(engine, service, clock):
    async with receiver() as got:
        power = PoolPower(
            "default",
            start_url=got.url("start"),
            min_free_sessions=1,
            stop_url=got.url("stop"),
            idle_for_s=60,
            keep_running=0,
        )
        await seed_power(engine, power, server(A, max_sessions=1), server(B, max_sessions=1))
        for address in (A, B):
            await set_health(engine, address, "up", clock.now)
        loop = powered(service)
        await loop.run_once()
        clock.advance(120)
        stopped = await loop.run_once()  # 2 free: one may go, 1 free is still the minimum
        assert [a.verb for a in stopped] == [Verb.STOP]
        assert await loop.run_once() == []  # stopping the other would leave 0 free
        gone = stopped[0].address
        clock.advance(10)
        await set_health(engine, gone, "down", clock.now)
        await loop.run_once()
        assert await state(engine, gone) == ("off", "draining")

        kept = ({A, B} - {gone}).pop()
        await service.route(d.RouteRequest(connection_id="c1", proxy_id="p", cookie="alice"))  # 0 free
        actions = await loop.run_once()
        assert [(a.verb, a.address) for a in actions] == [(Verb.START, gone)]
        assert await state(engine, gone) == ("starting", "enabled")
        assert await state(engine, kept) == ("on", "enabled")


# --- a user held while a server starts -------------------------------------------------------


async def _starting(engine: AsyncEngine, service: BrokerService, now: datetime, wait_s: float) -> None:
    """One server, stopped, in a pool whose loop has just called its start hook."""
    async with receiver() as got:
        power = PoolPower("default", start_url=got.url("start"), min_free_sessions=1, start_wait_s=wait_s)
        await seed_power(engine, power, server(A, max_sessions=5))
        await set_health(engine, A, "down", now)
        await powered(service).run_once()
        assert len(got.calls) == 1
    assert await state(engine, A) == ("starting", "enabled")


async def test_a_user_is_held_in_process_until_the_started_server_answers(engine, service, clock):
    await _starting(engine, service, clock.now, wait_s=20)
    local = LocalBroker()
    local.servicer = BrokerServicer(service, ProbeService(service))
    proxy = ProxyBroker(local, "p1", route_timeout_s=0.5)
    request = pb.RouteRequest(connection_id="held-1", proxy_id="p1", cookie="alice")
    held = asyncio.ensure_future(proxy.route(request))
    await asyncio.sleep(1.5)  # three times the route timeout: only start_wait keeps it going
    assert not held.done()
    await set_health(engine, A, "up", clock.now)
    answer = await asyncio.wait_for(held, 10)
    assert answer.server_address == A
    assert answer.reason == pb.ROUTE_REASON_NEW


async def test_without_a_start_under_way_the_user_is_refused_at_once(engine, service, clock):
    await seed_power(engine, None, server(A, max_sessions=5))
    await set_health(engine, A, "down", clock.now)
    local = LocalBroker()
    local.servicer = BrokerServicer(service, ProbeService(service))
    proxy = ProxyBroker(local, "p1", route_timeout_s=5.0)
    with pytest.raises(RouteRefused) as refused:
        await asyncio.wait_for(
            proxy.route(pb.RouteRequest(connection_id="r1", proxy_id="p1", cookie="bob")), 2
        )
    assert refused.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_start_that_does_not_come_up_in_start_wait_ends_the_wait(engine, service, clock):
    await _starting(engine, service, clock.now, wait_s=1)
    local = LocalBroker()
    local.servicer = BrokerServicer(service, ProbeService(service))
    proxy = ProxyBroker(local, "p1", route_timeout_s=0.2)
    with pytest.raises(BrokerUnavailable):  # held for start_wait, then let go (not refused at once)
        await asyncio.wait_for(
            proxy.route(pb.RouteRequest(connection_id="r2", proxy_id="p1", cookie="eve")), 10
        )


async def test_a_user_is_held_over_grpc_until_the_started_server_answers(engine, pg_database_url):
    now = datetime.now(UTC)
    settings = settings_for(pg_database_url, power_hook_secret=SecretStr(SECRET))
    service = BrokerService(Store(engine), settings)
    await _starting(engine, service, now, wait_s=20)
    async with running_broker(settings) as running:
        client = BrokerClient([f"127.0.0.1:{running.grpc_port}"], proxy_id="p1", route_timeout_s=0.5)
        try:
            request = pb.RouteRequest(connection_id="held-2", proxy_id="p1", cookie="alice")
            held = asyncio.ensure_future(client.route(request))
            await asyncio.sleep(1.5)
            assert not held.done()
            await set_health(engine, A, "up", datetime.now(UTC))
            answer = await asyncio.wait_for(held, 10)
            assert answer.server_address == A
        finally:
            await client.close()


async def test_the_broker_refuses_to_start_with_hooks_and_no_secret(engine, pg_database_url):
    power = PoolPower("default", start_url="https://hooks.example/start", min_free_sessions=1)
    await seed_power(engine, power, server(A, max_sessions=2))
    with pytest.raises(StartupError, match="RDBROKER_POWER_HOOK_SECRET"):
        async with running_broker(settings_for(pg_database_url)):
            pass


async def test_the_same_on_the_embedded_sqlite_store(tmp_path):
    url = f"sqlite+aiosqlite:///{tmp_path / 'rdbroker.db'}"
    sqlite = make_engine(url)
    try:
        await migrate.upgrade(sqlite)
        clock = Clock()
        service = BrokerService(Store(sqlite), settings_for(url), clock)
        async with receiver() as got:
            power = PoolPower("default", start_url=got.url("start"), min_free_sessions=1, start_wait_s=20)
            await seed_power(sqlite, power, server(A, max_sessions=1))
            await set_health(sqlite, A, "down", clock.now)
            assert [a.verb for a in await powered(service).run_once()] == [Verb.START]
            assert got.calls[0]["server"] == A
        assert await state(sqlite, A) == ("starting", "enabled")
        with pytest.raises(CapacityStarting):
            await service.route(d.RouteRequest(connection_id="c1", proxy_id="p", cookie="alice"))
        await set_health(sqlite, A, "up", clock.now)
        placed = await service.route(d.RouteRequest(connection_id="c1", proxy_id="p", cookie="alice"))
        assert placed.server_address == A
    finally:
        await sqlite.dispose()


async def test_apply_sets_changes_and_removes_a_pools_hooks(engine):
    power = PoolPower("default", start_url="https://hooks.example/start?code=k", min_free_sessions=2)
    members = [server(A, max_sessions=2)]
    first = await apply_farm(engine, Farm(pools=[POOL], servers=members, power={"default": power}))
    assert (
        "set the power hooks of pool default (start https://hooks.example/start below 2 free sessions, "
        "users wait 20s)" in first.changes
    )
    again = await apply_farm(engine, Farm(pools=[POOL], servers=members, power={"default": power}))
    assert again.changes == []
    wider = PoolPower("default", start_url="https://hooks.example/start", min_free_sessions=4)
    changed = await apply_farm(engine, Farm(pools=[POOL], servers=members, power={"default": wider}))
    assert [line for line in changed.changes if "power" in line] == [
        "update the power hooks of pool default (start https://hooks.example/start below 4 free sessions, "
        "users wait 20s)"
    ]
    gone = await apply_farm(engine, Farm(pools=[POOL], servers=members))
    assert gone.changes == ["remove the power hooks of pool default"]
    async with engine.connect() as conn:
        assert await PowerRepository(conn).all() == []
