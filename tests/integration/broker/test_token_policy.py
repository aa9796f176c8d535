"""Routing tokens obey policy (docs/broker.md, Routing step 2), on PostgreSQL and on SQLite.

A `Cookie: msts=` token is the client's word: it is followed to a server that takes new sessions in
the connection's own pool, and to a draining, full or other pool's server only as a reconnect (the
directory holds the user's live session there, or the connection carries no identity). Down and
maintenance servers are never followed to. Otherwise the connection is placed by policy as if it had
no token. `honor_routing_tokens: false` turns tokens off per pool. Each outcome is counted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from rdbroker_broker import domain as d
from rdbroker_broker import metrics
from rdbroker_broker.db import migrate
from rdbroker_broker.db.engine import make_engine
from rdbroker_broker.db.tables import sessions
from rdbroker_broker.errors import InvalidInput, PermissionDenied
from rdbroker_broker.farm import apply_farm, load_farm
from rdbroker_broker.probing import ProbeService
from rdbroker_broker.service import BrokerService
from rdbroker_broker.store import Store
from rdbroker_rdp import encode_routing_token
from tests.integration.broker.conftest import Clock, farm, server, settings_for

# The default pool: T is the tokens' target; B, first in address order, is where policy places first.
T, B = "10.0.0.5:3389", "10.0.0.4:3389"
S = "10.0.1.5:3389"  # the pool Sales
TO_T, TO_S = encode_routing_token("10.0.0.5", 3389), encode_routing_token("10.0.1.5", 3389)
TO_NOWHERE = encode_routing_token("192.0.2.7", 3389)
DEFAULT = d.Pool("default", True, 3600.0, domain="CORP")
SALES = d.Pool("Sales", False, 3600.0)


@dataclass
class Farm:
    service: BrokerService
    engine: AsyncEngine
    clock: Clock
    n: int = 0

    async def route(self, cookie: str = "", token: str = "", pool: str = "", **kw: Any) -> d.RouteDecision:
        self.n += 1
        connection_id = kw.pop("connection_id", f"c{self.n}")
        request = d.RouteRequest(connection_id, "p1", pool, cookie, token, **kw)
        return await self.service.route(request)

    async def seed(self, *servers: d.Server, pools: tuple[d.Pool, ...] = (DEFAULT, SALES)) -> None:
        assert not (await apply_farm(self.engine, farm(*servers, pools=pools))).refusals

    async def report(self, address: str, **kw: Any) -> None:
        """A health replica's result for `address` (health up unless said otherwise)."""
        probes = ProbeService(self.service)
        assert await probes.claim_targets("h1", 60_000)
        result = d.ProbeResult(
            address=address,
            health=kw.pop("health", d.Health.UP),
            rdp_ok=True,
            rdp_detail="neg_rsp",
            load=kw.pop("load", -1),
            agent_state=d.AgentState.NONE,
            agent_detail="",
        )
        assert await probes.report_results("h1", [result]) == []

    async def live_on(self, address: str) -> list[str]:
        """The users of the live sessions on `address` ("" for a session without identity)."""
        query = select(sessions.c.user).where(
            sessions.c.server_address == address, sessions.c.state.in_(["pending", "active", "disconnected"])
        )
        async with self.engine.connect() as conn:
            return sorted(str(user or "") for user in (await conn.execute(query)).scalars())


@pytest.fixture(params=["postgresql", "sqlite"])
async def routing(request: pytest.FixtureRequest, tmp_path) -> AsyncIterator[Farm]:
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_database_url")
    else:
        url = f"sqlite+aiosqlite:///{tmp_path / 'broker.db'}"
    engine = make_engine(url)
    await migrate.upgrade(engine)
    clock = Clock()
    try:
        yield Farm(BrokerService(Store(engine), settings_for(url), clock), engine, clock)
    finally:
        await engine.dispose()


@pytest.fixture
def counted() -> dict[str, int]:
    """The routing-token counts the test adds (`rdbroker_routing_tokens_total{outcome}`): a diff
    against the process's counts when the test started."""
    before = dict(metrics._token_counts)

    class Diff(dict[str, int]):
        def __call__(self) -> dict[str, int]:
            now = dict(metrics._token_counts)
            return {k: now[k] - before.get(k, 0) for k in now if now[k] != before.get(k, 0)}

    return Diff()


async def test_a_token_to_an_enabled_server_with_room_is_followed(routing: Farm, counted) -> None:
    await routing.seed(server(T), server(B))
    placed = await routing.route("CORP\\ann", TO_T, connection_id="a1")
    assert (placed.reason, placed.server_address, placed.user) == (d.RouteReason.TOKEN, T, "CORP\\ann")
    assert await routing.route("CORP\\ann", TO_T, connection_id="a1") == placed  # retried: same, not counted
    # The session keeps the user: she comes back to it without a token, and with one.
    again = await routing.route("ann")
    assert (again.reason, again.session_id) == (d.RouteReason.RECONNECT, placed.session_id)
    back = await routing.route("ann", TO_T)
    assert (back.reason, back.session_id) == (d.RouteReason.TOKEN, placed.session_id)
    anonymous = await routing.route("", TO_T)
    assert (anonymous.reason, anonymous.server_address, anonymous.user) == (d.RouteReason.TOKEN, T, "")
    assert counted() == {"honoured": 2, "reconnect": 1}


async def test_a_token_to_a_draining_server_takes_back_only_its_users(routing: Farm, counted) -> None:
    await routing.seed(server(T), server(B))
    # cat's session is on T; the pool's account rules make `cat` and `CORP\cat` one account.
    cat = await routing.route("CORP\\cat", TO_T)
    assert (cat.reason, cat.server_address) == (d.RouteReason.TOKEN, T)
    await routing.service.set_server_state(T, d.AdminState.DRAINING)

    new = await routing.route("bob", TO_T)
    assert (new.reason, new.server_address, new.user) == (d.RouteReason.NEW, B, "bob")
    back = await routing.route("cat", TO_T)
    assert (back.reason, back.server_address, back.session_id) == (d.RouteReason.TOKEN, T, cat.session_id)
    anonymous = await routing.route("", TO_T)
    assert (anonymous.reason, anonymous.server_address, anonymous.pool) == (d.RouteReason.TOKEN, T, "default")
    assert await routing.live_on(T) == ["", "CORP\\cat"]
    assert await routing.live_on(B) == ["bob"]
    assert counted() == {"honoured": 1, "ignored_policy": 1, "reconnect": 1, "no_identity": 1}


async def test_a_user_whose_session_is_elsewhere_goes_to_it(routing: Farm, counted) -> None:
    await routing.seed(server(T), server(B))
    dan = await routing.route("dan")
    assert dan.server_address == B
    await routing.service.set_server_state(T, d.AdminState.DRAINING)
    again = await routing.route("CORP\\dan", TO_T)  # the token says T, dan's session is on B
    assert (again.reason, again.server_address, again.session_id) == (
        d.RouteReason.RECONNECT,
        B,
        dan.session_id,
    )
    assert counted() == {"ignored_policy": 1}


async def test_a_token_never_gives_an_account_a_second_session(routing: Farm, counted) -> None:
    await routing.seed(server(T), server(B))
    dan = await routing.route("dan")
    assert dan.server_address == B
    # T takes new sessions, but dan's session is on B: following the token would open a second one.
    again = await routing.route("dan", TO_T)
    assert (again.reason, again.server_address, again.session_id) == (
        d.RouteReason.RECONNECT,
        B,
        dan.session_id,
    )
    assert await routing.live_on(T) == []
    assert counted() == {"ignored_policy": 1}


@pytest.mark.parametrize("full", ["max_sessions", "load"])
async def test_a_token_to_a_full_server_takes_back_only_its_users(routing: Farm, counted, full: str) -> None:
    await routing.seed(server(T, max_sessions=1 if full == "max_sessions" else 0), server(B))
    eve = await routing.route("eve", TO_T)
    assert (eve.reason, eve.server_address) == (d.RouteReason.TOKEN, T)
    if full == "load":
        await routing.report(T, load=100)

    fay = await routing.route("fay", TO_T)
    assert (fay.reason, fay.server_address) == (d.RouteReason.NEW, B)
    back = await routing.route("EVE", TO_T)
    assert (back.reason, back.session_id) == (d.RouteReason.TOKEN, eve.session_id)
    anonymous = await routing.route("", TO_T)
    assert (anonymous.reason, anonymous.server_address) == (d.RouteReason.TOKEN, T)
    assert await routing.live_on(T) == ["", "eve"]
    assert counted() == {"honoured": 1, "ignored_policy": 1, "reconnect": 1, "no_identity": 1}


async def test_a_token_to_a_server_of_weight_0_is_not_a_placement(routing: Farm, counted) -> None:
    await routing.seed(server(T, weight=0), server(B))
    placed = await routing.route("gil", TO_T)
    assert (placed.reason, placed.server_address) == (d.RouteReason.NEW, B)
    assert counted() == {"ignored_policy": 1}


async def test_a_token_to_another_pools_server_is_only_a_reconnect(routing: Farm, counted) -> None:
    await routing.seed(server(T), server(B), server(S, pool="Sales"))
    hal = await routing.route("hal", pool="sales")  # hal works in Sales
    assert hal.server_address == S

    gus = await routing.route("gus", TO_S)  # a default-pool connection naming a Sales server
    assert (gus.reason, gus.pool) == (d.RouteReason.NEW, "default")
    assert gus.server_address in (T, B)
    back = await routing.route("hal", TO_S)  # from the default pool's listener, back to his session
    assert (back.reason, back.server_address, back.session_id, back.pool) == (
        d.RouteReason.TOKEN,
        S,
        hal.session_id,
        "Sales",
    )
    anonymous = await routing.route("", TO_S)
    assert (anonymous.reason, anonymous.server_address, anonymous.pool) == (d.RouteReason.TOKEN, S, "Sales")
    assert await routing.live_on(S) == ["", "hal"]
    assert counted() == {"ignored_policy": 1, "reconnect": 1, "no_identity": 1}


@pytest.mark.parametrize("state", ["maintenance", "down"])
async def test_a_token_to_a_server_in_maintenance_or_down_is_not_followed(
    routing: Farm, counted, state: str
) -> None:
    await routing.seed(server(T), server(B))
    ivy = await routing.route("ivy", TO_T)
    assert ivy.server_address == T
    if state == "maintenance":
        await routing.service.set_server_state(T, d.AdminState.MAINTENANCE)
    else:
        await routing.report(T, health=d.Health.DOWN)

    moved = await routing.route("ivy", TO_T)  # not even her own session's server
    assert (moved.reason, moved.server_address) == (d.RouteReason.NEW, B)
    anonymous = await routing.route("", TO_T)
    assert (anonymous.reason, anonymous.server_address) == (d.RouteReason.NO_IDENTITY, B)
    assert await routing.live_on(T) == []
    assert counted() == {"honoured": 1, f"refused_{state}": 2}


async def test_a_token_to_a_server_whose_down_result_is_stale_is_followed_like_a_placement(
    routing: Farm, counted
) -> None:
    # Routing reads a stale result as none (domain.as_seen_at): the token path as the placement path.
    await routing.seed(server(T))
    await routing.report(T, health=d.Health.DOWN)
    routing.clock.advance(3600)
    assert (await routing.route("joe")).server_address == T  # placed by policy: T takes users again
    placed = await routing.route("kay", TO_T)
    assert (placed.reason, placed.server_address) == (d.RouteReason.TOKEN, T)
    assert counted() == {"honoured": 1}


async def test_a_token_naming_no_registered_server_is_refused(routing: Farm, counted) -> None:
    await routing.seed(server(T))
    with pytest.raises(PermissionDenied, match=r"routing token names 192\.0\.2\.7:3389, which is not a"):
        await routing.route("lea", TO_NOWHERE)
    assert await routing.live_on(T) == []
    assert counted() == {"unknown_server": 1}


FARM_WITHOUT_TOKENS = """
pools:
  - name: default
    default: true
    honor_routing_tokens: false
  - name: Sales
servers:
  - address: 10.0.0.5:3389
  - address: 10.0.0.4:3389
  - address: 10.0.1.5:3389
    pool: Sales
"""


async def test_a_pool_that_ignores_tokens_by_its_farm_file_places_by_policy(routing: Farm, counted) -> None:
    declared = load_farm(FARM_WITHOUT_TOKENS)
    assert [p.honor_routing_tokens for p in declared.pools] == [False, True]
    assert not (await apply_farm(routing.engine, declared)).refusals
    placed = await routing.route("max", TO_T)
    assert (placed.reason, placed.server_address) == (d.RouteReason.NEW, B)
    anonymous = await routing.route("", TO_T)
    assert (anonymous.reason, anonymous.server_address) == (d.RouteReason.NO_IDENTITY, T)  # least loaded
    # Ignored means not read: an address no server has is placed, not refused.
    nowhere = await routing.route("ned", TO_NOWHERE)
    assert nowhere.reason is d.RouteReason.NEW
    # A Sales connection's token naming a server of the default pool, which ignores tokens.
    other = await routing.route("max", TO_T, pool="Sales")
    assert (other.reason, other.server_address, other.pool) == (d.RouteReason.NEW, S, "Sales")
    assert counted() == {"ignored_disabled": 4}
    # Applying the file again changes nothing; the default (true) back in the file turns them on.
    assert (await apply_farm(routing.engine, declared)).changes == []
    plan = await apply_farm(routing.engine, load_farm(FARM_WITHOUT_TOKENS.replace("false", "true")))
    assert plan.changes == ["update pool default (honor_routing_tokens false -> true)"]
    assert (await routing.route("ola", TO_T)).reason is d.RouteReason.TOKEN


async def test_a_pool_changed_to_ignore_tokens_places_by_policy(routing: Farm, counted) -> None:
    # PATCH /v1/pools/{name} runs this use case (the REST tests send the HTTP request).
    await routing.seed(server(T), server(B))
    changed = await routing.service.update_pool("DEFAULT", {"honor_routing_tokens": False})
    assert changed.pool.honor_routing_tokens is False
    honoured = {p.name: p.honor_routing_tokens for p in await routing.service.list_pools()}
    assert honoured == {"default": False, "Sales": True}
    assert (await routing.route("pat", TO_T)).server_address == B
    await routing.service.update_pool("default", {"honor_routing_tokens": True})
    assert (await routing.route("quinn", TO_T)).server_address == T
    assert counted() == {"ignored_disabled": 1, "honoured": 1}
    with pytest.raises(InvalidInput, match="not a pool setting: honour_routing_tokens"):
        await routing.service.update_pool("default", {"honour_routing_tokens": False})


async def test_a_token_target_pool_that_ignores_tokens_takes_no_reconnect_by_token(
    routing: Farm, counted
) -> None:
    await routing.seed(server(T), server(B), server(S, pool="Sales"), pools=(DEFAULT, SALES))
    hal = await routing.route("hal", pool="Sales")
    await routing.service.update_pool("Sales", {"honor_routing_tokens": False})
    placed = await routing.route("hal", TO_S)  # from the default pool: Sales ignores tokens
    assert (placed.reason, placed.pool) == (d.RouteReason.NEW, "default")
    assert placed.session_id != hal.session_id
    assert counted() == {"ignored_disabled": 1}
