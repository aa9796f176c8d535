"""The store-specific first try of a Route (`service/route_paths.py`: one `FastRoute` per store) answers
as the transactional path does. The same steps run on PostgreSQL, on SQLite, and on SQLite through the
transactional path alone; every answer comes out the same, and each store's first try settles the
common cases itself."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from rdbroker_broker import domain as d
from rdbroker_broker.db import migrate
from rdbroker_broker.db.engine import make_engine
from rdbroker_broker.service import BrokerService
from rdbroker_broker.store import Store
from tests.integration.broker.conftest import Clock, seed, server, settings_for

A, B = "10.0.0.1:3389", "10.0.0.2:3389"


class World:
    """One broker and its database: the answers it gave, with session ids numbered by first sight
    (ids are random, the sessions they name are not)."""

    def __init__(self, service: BrokerService, clock: Clock, transactional_only: bool = False) -> None:
        self.service, self.clock = service, clock
        self.answers: list[Any] = []
        self.settled: list[str] = []  # connection ids the first try answered
        self.decisions: dict[str, d.RouteDecision] = {}
        self._ids: dict[str, int] = {}
        real = service.routing.fast.route

        async def first_try(request: d.RouteRequest, user: str) -> d.RouteDecision | None:
            decision = None if transactional_only else await real(request, user)
            if decision is not None:
                self.settled.append(request.connection_id)
            return decision

        service.routing.fast.route = first_try  # type: ignore[method-assign]

    async def route(self, connection_id: str, cookie: str = "", pool: str = "") -> None:
        try:
            decision = await self.service.route(d.RouteRequest(connection_id, cookie=cookie, pool=pool))
        except Exception as exc:
            self.answers.append((connection_id, type(exc).__name__))
            return
        self.decisions[connection_id] = decision
        session = self._ids.setdefault(decision.session_id, len(self._ids))
        self.answers.append(
            (
                connection_id,
                decision.server_address,
                decision.reason.value,
                decision.user,
                decision.pool,
                session,
            )
        )


Step = Callable[[World], Awaitable[None]]


async def _maintenance_where_alice_is(w: World) -> None:
    await w.service.set_server_state(w.decisions["c1"].server_address, d.AdminState.MAINTENANCE)


async def _past_pending_timeout(w: World) -> None:
    w.clock.advance(w.service.settings.pending_timeout_s + 1)


STEPS: list[Step] = [
    lambda w: w.route("c1", "alice"),  # new
    lambda w: w.route("c2", "alice"),  # reconnect
    lambda w: w.route("c3"),  # no identity
    lambda w: w.route("c1", "alice"),  # a retried call: its first answer
    lambda w: w.route("c4", "bob"),  # new, on the other server (spread)
    lambda w: w.route("c5", "ALICE"),  # another spelling of the same account
    _maintenance_where_alice_is,
    lambda w: w.route("c6", "alice"),  # her server takes no reconnects: placed anew
    _past_pending_timeout,
    lambda w: w.route("c7", "bob"),  # his pending session expired: placed anew
    lambda w: w.route("c8", "carol", pool="nope"),  # unknown pool
    lambda w: w.route("c9", "dave", pool="DEFAULT"),  # the pool by another case
]
# Steps every store's first try answers by itself.
SETTLED = {"c1", "c2", "c3", "c4", "c5", "c9"}


async def _run(world: World, engine: AsyncEngine) -> World:
    await seed(engine, server(A), server(B))
    for step in STEPS:
        await step(world)
    return world


async def _sqlite(path: Path, clock: Clock) -> tuple[BrokerService, AsyncEngine]:
    url = f"sqlite:///{path}"
    engine = make_engine(url)
    await migrate.upgrade(engine)
    return BrokerService(Store(engine), settings_for(url), clock), engine


@pytest.fixture
async def sqlite_worlds(tmp_path: Path) -> Any:
    made = []
    for name in ("fast", "slow"):
        clock = Clock()
        service, engine = await _sqlite(tmp_path / f"{name}.db", clock)
        made.append((World(service, clock, transactional_only=name == "slow"), engine))
    try:
        yield made
    finally:
        for _, engine in made:
            await engine.dispose()


async def test_every_store_answers_as_the_transactional_path(engine, pg_database_url, sqlite_worlds):
    clock = Clock()
    postgres = await _run(
        World(BrokerService(Store(engine), settings_for(pg_database_url), clock), clock), engine
    )
    (fast, fast_engine), (slow, slow_engine) = sqlite_worlds
    sqlite = await _run(fast, fast_engine)
    reference = await _run(slow, slow_engine)

    assert reference.settled == []
    assert postgres.answers == reference.answers
    assert sqlite.answers == reference.answers
    assert set(postgres.settled) >= SETTLED
    assert set(sqlite.settled) >= SETTLED
    # The reference itself: what each step is meant to reach.
    reasons = {answer[0]: answer[2] for answer in reference.answers if len(answer) > 2}
    assert reasons["c2"] == reasons["c5"] == "reconnect"
    assert reasons["c6"] == reasons["c7"] == "new"
    assert ("c8", "NotFound") in reference.answers
