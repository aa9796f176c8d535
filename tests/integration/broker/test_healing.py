"""State that heals: a heartbeat listing a connection revives the session the silence sweep (or an
earlier list) disconnected, and the sweep judges silence only over time the broker could hear."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from rdbroker_broker import domain as d
from rdbroker_broker.errors import DatabaseUnavailable
from rdbroker_broker.store import Retryable
from tests.integration.broker.conftest import seed, server

A = "10.0.0.1:3389"


async def opened(service, connection_id: str, user: str, proxy_id: str = "p1") -> d.RouteDecision:
    routed = await service.route(d.RouteRequest(connection_id, proxy_id=proxy_id, cookie=user))
    await service.connection_opened(routed.session_id, connection_id, proxy_id)
    return routed


async def state_of(service, user: str) -> tuple[d.SessionState, str]:
    [session] = await service.lookup_user_sessions(user)
    return session.state, session.end_reason


async def test_a_listed_connection_revives_its_session_after_the_silence_sweep(service, engine, clock):
    await seed(engine, server(A))
    await service.proxy_heartbeat("p1", 0, [])
    await opened(service, "c1", "alice")
    clock.advance(16)  # no heartbeat for more than 3 intervals of 5 s, the broker hearing all along
    assert (await service.sweep())["disconnected"] == 1
    assert await state_of(service, "alice") == (d.SessionState.DISCONNECTED, "proxy_silent")

    await service.proxy_heartbeat("p1", 1, ["c1"])
    [session] = await service.lookup_user_sessions("alice")
    assert (session.state, session.end_reason) == (d.SessionState.ACTIVE, "")
    assert (session.expires_at, session.disconnected_at) == (None, None)
    clock.advance(30_000)  # past the pool's disconnect timeout: an active session never expires
    await service.proxy_heartbeat("p1", 1, ["c1"])
    assert (await service.sweep())["expired"] == 0
    assert (await state_of(service, "alice"))[0] is d.SessionState.ACTIVE


async def test_a_listed_connection_revives_a_session_an_earlier_list_missed(service, engine, clock):
    await seed(engine, server(A))
    await opened(service, "c1", "bob")
    clock.advance(6)
    await service.proxy_heartbeat("p1", 0, [])  # a list that did not show c1
    assert await state_of(service, "bob") == (d.SessionState.DISCONNECTED, "connection_lost")
    await service.proxy_heartbeat("p1", 1, ["c1"])
    assert await state_of(service, "bob") == (d.SessionState.ACTIVE, "")


async def test_revival_touches_only_that_proxys_live_session_on_that_connection(service, engine, clock):
    await seed(engine, server(A))
    await service.proxy_heartbeat("p1", 0, [])
    await service.proxy_heartbeat("p2", 0, [])
    await opened(service, "c1", "carol")
    await opened(service, "c2", "dave", proxy_id="p2")
    closed = await opened(service, "c3", "erin")
    await opened(service, "c4", "frank")
    clock.advance(16)
    assert (await service.sweep())["disconnected"] == 4
    # erin's connection closed (its report arrived after the sweep); frank came back on another one.
    await service.connection_closed(closed.session_id, "c3", end_reason="client_closed")
    await opened(service, "c5", "frank", proxy_id="p2")
    again = await service.route(d.RouteRequest("c6", proxy_id="p1", cookie="gina"))
    await service.end_session(again.session_id)

    # p1 lists every connection id it ever had, and one of p2's: only carol's session is its own,
    # still disconnected for want of news, and on a connection not reported closed.
    await service.proxy_heartbeat("p1", 6, ["c1", "c2", "c3", "c4", "c6", "nobody"])
    assert await state_of(service, "carol") == (d.SessionState.ACTIVE, "")
    assert await state_of(service, "dave") == (d.SessionState.DISCONNECTED, "proxy_silent")
    assert (await state_of(service, "erin"))[0] is d.SessionState.DISCONNECTED
    assert (await state_of(service, "frank"))[0] is d.SessionState.ACTIVE  # on c5, through p2
    [gina] = await service.lookup_user_sessions("gina", include_ended=True)
    assert gina.state is d.SessionState.ENDED  # an ended session is never revived

    # A session the user left normally (its close reported) stays disconnected.
    clock.advance(1)
    await service.proxy_heartbeat("p2", 1, ["c2", "c5"])
    assert await state_of(service, "dave") == (d.SessionState.ACTIVE, "")


async def test_the_sweep_judges_no_proxy_silent_before_it_has_heard_for_a_whole_window(
    service, engine, clock
):
    await seed(engine, server(A))
    await service.proxy_heartbeat("p1", 0, [])  # the broker's first database call: hearing from now
    await opened(service, "c1", "hank")
    clock.advance(14)
    counts = await service.sweep()
    assert (counts["disconnected"], counts["judged_silence"]) == (0, 0)
    clock.advance(2)
    assert (await service.sweep())["judged_silence"] == 1
    assert await state_of(service, "hank") == (d.SessionState.DISCONNECTED, "proxy_silent")


async def test_a_database_outage_restarts_the_window(service, engine, clock, monkeypatch):
    await seed(engine, server(A))
    await service.proxy_heartbeat("p1", 0, [])
    await opened(service, "c1", "ivy")
    clock.advance(60)
    assert (await service.sweep())["judged_silence"] == 1
    await service.proxy_heartbeat("p1", 1, ["c1"])  # revived
    assert await state_of(service, "ivy") == (d.SessionState.ACTIVE, "")

    # The database goes away for 25 s: nobody's heartbeat gets through, the sweep cannot run.
    real = service.store.transaction

    def down():
        raise Retryable("connection refused", connectivity=True)

    monkeypatch.setattr(service.store, "transaction", down)
    with pytest.raises(DatabaseUnavailable):
        await service.proxy_heartbeat("p1", 1, ["c1"])
    assert service.heard_since is None
    clock.advance(25)
    with pytest.raises(DatabaseUnavailable):
        await service.sweep()
    monkeypatch.setattr(service.store, "transaction", real)

    # Back: the proxy's heartbeat is older than the window, but the broker has not heard for one yet.
    counts = await service.sweep()
    assert (counts["disconnected"], counts["judged_silence"]) == (0, 0)
    clock.advance(2)
    await service.proxy_heartbeat("p1", 1, ["c1"])  # the proxy's retry gets through
    clock.advance(14)
    assert (await service.sweep())["judged_silence"] == 1
    assert await state_of(service, "ivy") == (d.SessionState.ACTIVE, "")


async def test_revival_needs_the_connection_listed_by_its_own_proxy_on_sqlite(tmp_path, clock):
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
        await seed(engine, server(A))
        await service.proxy_heartbeat("p1", 0, [])
        await opened(service, "c1", "judy")
        clock.advance(16)
        assert (await service.sweep())["disconnected"] == 1
        await service.proxy_heartbeat("p2", 1, ["c1"])
        assert (await state_of(service, "judy"))[0] is d.SessionState.DISCONNECTED
        await service.proxy_heartbeat("p1", 1, ["c1"])
        assert await state_of(service, "judy") == (d.SessionState.ACTIVE, "")
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT count(*) FROM sessions"))).scalar_one() == 1
    finally:
        await engine.dispose()
