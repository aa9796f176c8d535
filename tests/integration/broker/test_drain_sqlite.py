"""A drain until empty on the embedded SQLite default: the same use case and loop as on PostgreSQL (the
lease is one conditional UPDATE there too; SQLite's one writer at a time serialises the claims)."""

from __future__ import annotations

from rdbroker_broker import callers
from rdbroker_broker import domain as d
from rdbroker_broker.agents import AgentCaller
from rdbroker_broker.db import migrate
from rdbroker_broker.db.engine import make_engine
from rdbroker_broker.drains import Drainer, get_drain, start_drain
from rdbroker_broker.service import BrokerService
from rdbroker_broker.store import Store
from tests.integration.broker.conftest import Clock, seed, server, settings_for

A = "10.0.0.1:3389"


async def test_a_drain_on_sqlite_waits_for_the_session_and_ends_in_maintenance(tmp_path):
    url = f"sqlite+aiosqlite:///{tmp_path / 'rdbroker.db'}"
    engine = make_engine(url)
    try:
        await migrate.upgrade(engine)
        await seed(engine, server(A))
        clock = Clock()
        service = BrokerService(Store(engine), settings_for(url), clock)
        with callers.use_caller(callers.Caller("test")):
            placed = await service.route(d.RouteRequest("c1", proxy_id="p", cookie="alice"))
            nameless = await service.route(d.RouteRequest("c2", proxy_id="p"))  # the client sent no name
            drain = await start_drain(service, A, None, None, "maintenance")
        assert (drain.step, drain.sessions_left) == (d.DrainStep.STARTING, 2)
        one, other = (Drainer(service, AgentCaller(None, None, 5.0), owner=o) for o in ("r1", "r2"))
        [waiting] = await one.advance_due()
        assert waiting.step is d.DrainStep.WAITING
        assert waiting.detail == (
            "2 sessions left: 0 active, 0 disconnected, 2 pending "
            "(1 with no user name: no agent can find them; they end by themselves)"
        )
        clock.advance(5)
        await service.end_session(placed.session_id, "logged_off")
        await service.end_session(nameless.session_id, "expired")
        [done] = await other.advance_due()
        assert (done.step, done.sessions_left) == (d.DrainStep.DONE, 0)
        assert (await service.get_server(A)).admin_state is d.AdminState.MAINTENANCE
        assert (await get_drain(service, A)).finished_at == clock.now
    finally:
        await engine.dispose()
