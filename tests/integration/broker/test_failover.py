"""Failover on the first try, in the broker: when the proxy could not reach the server of a user's
session, the broker probes it at once (one RDP handshake with a real fake server, or a closed port)
and moves the session only if that probe fails too."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text

from rdbroker_broker import domain as d
from rdbroker_broker.errors import InvalidInput
from rdbroker_rdp import encode_routing_token
from rdbroker_rdp.fakeserver import FakeRdpServer
from tests.integration.broker.conftest import seed, server
from tests.support.postgres import free_port


def req(cookie: str = "", connection_id: str = "c1", **kw) -> d.RouteRequest:
    return d.RouteRequest(connection_id=connection_id, proxy_id="p1", cookie=cookie, **kw)


async def health_of(engine, address: str) -> tuple[str, str, object, object]:
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT health, health_detail, health_changed_at, fresh_until FROM servers "
                    "WHERE address = :a"
                ),
                {"a": address},
            )
        ).one()
    return row[0], row[1], row[2], row[3]


async def sessions_on(service, dead: str, alive: str, users: list[str]) -> None:
    """Each user gets a live session on `dead` (the other server is in maintenance meanwhile)."""
    await service.set_server_state(alive, d.AdminState.MAINTENANCE)
    for user in users:
        assert (await service.route(req(user, f"{user}-0"))).server_address == dead
    await service.set_server_state(alive, d.AdminState.ENABLED)


async def test_a_dead_session_server_is_recorded_down_and_the_user_placed_in_the_same_call(
    service, engine, clock
):
    async with FakeRdpServer() as alive:
        dead = f"127.0.0.1:{free_port()}"  # nothing listens: the probe is refused
        await seed(engine, server(dead), server(alive.address))
        await sessions_on(service, dead, alive.address, ["alice"])
        [home] = await service.lookup_user_sessions("alice")
        again = await service.route(req("alice", "c1"))
        assert (again.reason, again.server_address) == (d.RouteReason.RECONNECT, dead)

        moved = await service.route(req("alice", "c1", attempt=1, failed_server_address=dead))
        assert (moved.reason, moved.server_address) == (d.RouteReason.NEW, alive.address)
        ended = await service.lookup_user_sessions("alice", include_ended=True)
        [old] = [s for s in ended if s.session_id == home.session_id]
        assert (old.state, old.end_reason) == (d.SessionState.ENDED, "server_down")
        health, detail, changed_at, fresh_until = await health_of(engine, dead)
        assert (health, changed_at) == ("down", clock.now)
        assert detail.startswith("failover probe: connection refused")
        assert fresh_until > clock.now  # it counts as a health result, which ages like one
        # The same call again (the proxy retried it): the same answer, nothing new.
        assert await service.route(req("alice", "c1", attempt=1, failed_server_address=dead)) == moved
        assert alive.accepted == 0  # the probe went to the dead server only


async def test_a_token_target_that_is_dead_is_placed_by_policy(service, engine):
    async with FakeRdpServer() as alive:
        port = free_port()
        dead = f"127.0.0.1:{port}"
        await seed(engine, server(dead), server(alive.address))
        token = encode_routing_token("127.0.0.1", port)
        first = await service.route(req("carol", "t1", routing_token=token))
        assert (first.reason, first.server_address) == (d.RouteReason.TOKEN, dead)
        placed = await service.route(
            req("carol", "t1", routing_token=token, attempt=1, failed_server_address=dead)
        )
        assert (placed.reason, placed.server_address) == (d.RouteReason.NEW, alive.address)
        assert (await health_of(engine, dead))[0] == "down"
        sessions = await service.lookup_user_sessions("carol", include_ended=True)
        assert {(s.server_address, s.state) for s in sessions} == {
            (dead, d.SessionState.ENDED),
            (alive.address, d.SessionState.PENDING),
        }


async def test_bad_failed_server_addresses_are_refused_and_never_probed(service, engine):
    async with FakeRdpServer() as a, FakeRdpServer() as b:
        await seed(engine, server(a.address), server(b.address))
        first = await service.route(req("dave", "c1"))
        other = b.address if first.server_address == a.address else a.address
        with pytest.raises(InvalidInput, match="is not a registered server"):
            await service.route(req("dave", "c1", attempt=1, failed_server_address="192.0.2.1:3389"))
        with pytest.raises(
            InvalidInput,
            match=f"is not where this connection was sent \\(it was sent to {first.server_address}\\)",
        ):
            await service.route(req("dave", "c1", attempt=1, failed_server_address=other))
        with pytest.raises(InvalidInput, match="it has no earlier answer"):
            await service.route(req("dave", "never-routed", attempt=1, failed_server_address=other))
        assert (a.accepted, b.accepted) == (0, 0)
        [kept] = await service.lookup_user_sessions("dave")
        assert kept.session_id == first.session_id


async def test_concurrent_failovers_from_one_dead_server_probe_it_once(service, engine):
    async with FakeRdpServer() as alive:
        dead = f"127.0.0.1:{free_port()}"
        await seed(engine, server(dead), server(alive.address))
        users = [f"user{i}" for i in range(5)]
        await sessions_on(service, dead, alive.address, users)
        for user in users:
            again = await service.route(req(user, f"{user}-1"))
            assert again.server_address == dead
        probes: list[str] = []
        real = service.probe_rdp

        async def counted(address: str, timeout_s: float):
            probes.append(address)
            await asyncio.sleep(0.2)  # all five calls arrive while the first probe is under way
            return await real(address, timeout_s)

        service.probe_rdp = counted
        moved = await asyncio.gather(
            *(service.route(req(u, f"{u}-1", attempt=1, failed_server_address=dead)) for u in users)
        )
        assert probes == [dead]
        assert {m.server_address for m in moved} == {alive.address}


async def test_a_failed_probe_reported_by_a_replica_does_not_undo_the_broker_s_mark(service, engine, probes):
    async with FakeRdpServer() as alive:
        dead = f"127.0.0.1:{free_port()}"
        await seed(engine, server(dead), server(alive.address))
        await sessions_on(service, dead, alive.address, ["erin"])
        await service.route(req("erin", "c1"))
        await service.route(req("erin", "c1", attempt=1, failed_server_address=dead))
        assert (await health_of(engine, dead))[0] == "down"
        assert await probes.claim_targets("h1", 60_000)

        def result(health: d.Health, ok: bool) -> d.ProbeResult:
            return d.ProbeResult(
                dead, health, ok, "neg_rsp" if ok else "connection refused", -1, d.AgentState.NONE, ""
            )

        # The replica's own hysteresis still says up (one failure short of `fall`): a failed probe.
        assert await probes.report_results("h1", [result(d.Health.UP, False)]) == []
        health, detail, _, _ = await health_of(engine, dead)
        assert (health, detail) == ("down", "failover probe: connection refused")
        # A probe the server answers is news: the replica's state counts again.
        assert await probes.report_results("h1", [result(d.Health.UP, True)]) == []
        assert (await health_of(engine, dead))[:2] == ("up", "neg_rsp")


async def test_failover_on_sqlite_too(tmp_path, clock):
    from rdbroker_broker.db import migrate
    from rdbroker_broker.db.engine import make_engine
    from rdbroker_broker.service import BrokerService
    from rdbroker_broker.store import Store
    from tests.integration.broker.conftest import settings_for

    url = f"sqlite+aiosqlite:///{tmp_path / 'broker.db'}"
    engine = make_engine(url)
    await migrate.upgrade(engine)
    try:
        service = BrokerService(Store(engine), settings_for(url), clock)
        async with FakeRdpServer() as alive:
            dead = f"127.0.0.1:{free_port()}"
            await seed(engine, server(dead), server(alive.address))
            await sessions_on(service, dead, alive.address, ["frank"])
            assert (await service.route(req("frank", "c1"))).server_address == dead
            moved = await service.route(req("frank", "c1", attempt=1, failed_server_address=dead))
            assert (moved.reason, moved.server_address) == (d.RouteReason.NEW, alive.address)
            assert (await health_of(engine, dead))[0] == "down"
    finally:
        await engine.dispose()
