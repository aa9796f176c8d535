"""`GET /v1/history` (logons per minute from the directory's record of Route answers, refusals as the
brokers write them at their sweep) and the servers' `session_states`, on PostgreSQL and on the embedded
SQLite."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from rdbroker_broker import domain as d
from rdbroker_broker import refusals
from rdbroker_broker.db import migrate
from rdbroker_broker.db.engine import make_engine
from rdbroker_broker.db.history_repository import HistoryRepository
from rdbroker_broker.errors import BrokerError, CapacityStarting, DatabaseUnavailable
from rdbroker_broker.farm import Farm, apply_farm
from rdbroker_broker.probing import ProbeService
from rdbroker_broker.rest.app import create_app
from rdbroker_broker.rpc.servicer import BrokerServicer
from rdbroker_broker.service import BrokerService
from rdbroker_broker.store import Store
from rdbroker_proto.v1 import broker_pb2 as pb
from tests.integration.rest.conftest import ADMIN, READ, SERVERS, settings_for


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


START = datetime(2026, 12, 7, 9, 0, 30, tzinfo=UTC)


async def _client(service: BrokerService) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_app(service))
    headers = {"Authorization": f"Bearer {READ}"}
    return httpx.AsyncClient(transport=transport, base_url="http://broker", headers=headers)


@pytest.fixture(params=["postgresql", "sqlite"])
async def farm(request, tmp_path) -> AsyncIterator[tuple[BrokerService, Clock]]:
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_database_url")
    else:
        url = f"sqlite+aiosqlite:///{tmp_path / 'rdbroker.db'}"
    engine = make_engine(url)
    await migrate.upgrade(engine)
    await apply_farm(
        engine,
        Farm(
            pools=[d.Pool("default", True, 3600.0)],
            servers=[d.Server(SERVERS[0], "default"), d.Server(SERVERS[1], "default", weight=1)],
        ),
    )
    clock = Clock(START)
    try:
        yield BrokerService(Store(engine), settings_for(url), clock=clock), clock
    finally:
        await engine.dispose()


async def _route(service: BrokerService, user: str, connection_id: str, attempt: int = 0, failed: str = ""):
    return await service.route(
        d.RouteRequest(
            connection_id=connection_id,
            proxy_id="p1",
            cookie=user,
            attempt=attempt,
            failed_server_address=failed,
        )
    )


async def test_an_empty_farm_has_no_minutes(farm):
    service, _ = farm
    async with await _client(service) as http:
        answer = await http.get("/v1/history", params={"hours": 2})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["minutes"] == []
    assert body["hours"] == 2
    assert body["until"] == "2026-12-07T09:01:00Z"
    assert body["since"] == "2026-12-07T07:01:00Z"


async def test_logons_per_minute_by_reason(farm):
    service, clock = farm
    await _route(service, "alice", "c1")  # 09:00 new
    await _route(service, "bob", "c2")  # 09:00 new
    clock.now = START + timedelta(seconds=20)
    await _route(service, "alice", "c3")  # 09:00 reconnect (her claim is still live)
    clock.now = START + timedelta(seconds=29)
    await _route(service, "bea", "c7")  # 09:00 new, at another second of the minute
    clock.now = START + timedelta(minutes=2)
    await _route(service, "", "c4")  # 09:02 no identity
    # A proxy's retry after a failure (attempt 1) is not another logon.
    first = await _route(service, "carol", "c5")
    await _route(service, "carol", "c5", attempt=1, failed=first.server_address)
    clock.now = START + timedelta(hours=3)  # 12:00: the 09:00 minute is out of the last 3 hours
    await _route(service, "dave", "c6")
    async with await _client(service) as http:
        three = (await http.get("/v1/history", params={"hours": 3})).json()
        four = (await http.get("/v1/history", params={"hours": 4})).json()
    assert [(m["at"], m["logons"], m["new"], m["reconnect"], m["no_identity"]) for m in four["minutes"]] == [
        ("2026-12-07T09:00:00Z", 4, 3, 1, 0),
        ("2026-12-07T09:02:00Z", 2, 1, 0, 1),
        ("2026-12-07T12:00:00Z", 1, 1, 0, 0),
    ]
    assert [m["at"] for m in three["minutes"]] == ["2026-12-07T09:02:00Z", "2026-12-07T12:00:00Z"]
    # Counted per minute in the database: a row per minute and reason, whatever the seconds.
    rows = await service.run_tx(
        lambda r: HistoryRepository(r.conn).answers_per_minute(
            START - timedelta(hours=1), clock.now + timedelta(minutes=1)
        )
    )
    assert len(rows) == len({(minute, reason) for minute, reason, _ in rows}) == 5
    assert all(m["token"] == 0 for m in four["minutes"])


@pytest.mark.parametrize("hours", ["0", "25", "-1", "x", "1.5"])
async def test_bad_hours_are_422(farm, hours):
    service, _ = farm
    async with await _client(service) as http:
        answer = await http.get("/v1/history", params={"hours": hours})
    assert answer.status_code == 422, answer.text
    assert answer.headers["content-type"] == "application/problem+json"


async def test_history_needs_a_token(farm):
    service, _ = farm
    async with await _client(service) as http:
        answer = await http.get("/v1/history", headers={"Authorization": "Bearer wrong"})
    assert answer.status_code == 401


async def test_servers_show_live_sessions_by_state(farm):
    service, _ = farm
    for n, user in enumerate(("ann", "ben", "cat")):
        await _route(service, user, f"c{n}")
    async with await _client(service) as http:
        http.headers["Authorization"] = f"Bearer {ADMIN}"
        listed = (await http.get("/v1/sessions", params={"user": "ben"})).json()["items"]
        assert (await http.delete(f"/v1/sessions/{listed[0]['id']}")).status_code == 200
        servers = {s["address"]: s for s in (await http.get("/v1/servers")).json()["servers"]}
        one = (await http.get(f"/v1/servers/{SERVERS[0]}")).json()
    # The weight-1 server takes none while the other is this empty: all three went to SERVERS[0].
    assert servers[SERVERS[0]]["session_states"] == {"pending": 2, "active": 0, "disconnected": 0}
    assert servers[SERVERS[1]]["session_states"] == {"pending": 0, "active": 0, "disconnected": 0}
    assert one["session_states"] == servers[SERVERS[0]]["session_states"]


async def _refused(servicer: BrokerServicer, user: str, connection_id: str, pool: str = "") -> str:
    request = pb.RouteRequest(connection_id=connection_id, proxy_id="p1", cookie=user, pool=pool)
    with pytest.raises(BrokerError) as refused:
        await servicer.route(request)
    return type(refused.value).__name__


async def test_refusals_are_written_per_minute_at_the_sweep(farm):
    service, clock = farm
    servicer = BrokerServicer(service, ProbeService(service))
    await _route(service, "alice", "c1")
    assert await _refused(servicer, "bob", "c2", pool="nowhere") == "NotFound"
    async with await _client(service) as http:
        http.headers["Authorization"] = f"Bearer {ADMIN}"
        for server in SERVERS[:2]:
            assert (await http.post(f"/v1/servers/{server}/maintenance")).status_code == 200
        assert await _refused(servicer, "carol", "c3") == "NoCapacity"
        assert await _refused(servicer, "dave", "c4") == "NoCapacity"
        # Counted in memory: nothing in the history until the broker's sweep writes it.
        before = (await http.get("/v1/history", params={"hours": 1})).json()["minutes"]
        assert [(m["logons"], m["refused"]) for m in before] == [(1, 0)]
        assert await refusals.flush(service) == 3
        assert await refusals.flush(service) == 0
        clock.now = START + timedelta(minutes=1)
        assert await _refused(servicer, "erin", "c5") == "NoCapacity"
        assert await refusals.flush(service) == 1
        # A second replica's counts for the same minute add up.
        clock.now = START + timedelta(minutes=1, seconds=10)
        other = BrokerService(service.store, service.settings, clock=clock)
        await _refused(BrokerServicer(other, ProbeService(other)), "fay", "c6")
        assert await refusals.flush(other) == 1
        minutes = (await http.get("/v1/history", params={"hours": 1})).json()["minutes"]
    assert [(m["at"], m["logons"], m["refused"], m["refusals"]) for m in minutes] == [
        ("2026-12-07T09:00:00Z", 1, 3, {"not_found": 1, "resource_exhausted": 2}),
        ("2026-12-07T09:01:00Z", 0, 2, {"resource_exhausted": 2}),
    ]


async def test_refusals_not_written_are_kept_for_the_next_sweep(farm):
    service, _ = farm
    servicer = BrokerServicer(service, ProbeService(service))
    # A user held while a server starts is no refusal: the proxy asks again.
    refusals.count(service, CapacityStarting("a server is starting", 20.0), "UNAVAILABLE")
    assert refusals.pending(service) == {}
    await _refused(servicer, "bob", "c1", pool="nowhere")
    real = service.run_tx

    async def down(work):
        raise DatabaseUnavailable("the database is away")

    service.run_tx = down  # type: ignore[method-assign]
    with pytest.raises(DatabaseUnavailable):
        await refusals.flush(service)
    service.run_tx = real  # type: ignore[method-assign]
    assert sum(refusals.pending(service).values()) == 1
    assert await refusals.flush(service) == 1
    async with await _client(service) as http:
        minutes = (await http.get("/v1/history", params={"hours": 1})).json()["minutes"]
    assert [(m["refused"], m["refusals"]) for m in minutes] == [(1, {"not_found": 1})]
