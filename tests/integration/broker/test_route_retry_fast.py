"""A retried Route (same connection_id and attempt) whose session is no longer live gets the first
answer on the fast path, without a transaction: placing it again meets the stored answer on the
connections key, nothing of that statement remains, and the stored answer is read. Nothing is placed
or stored (the failed statement's row locks and counter updates are rolled back with it)."""

from __future__ import annotations

from typing import Any

import pytest

from rdbroker_broker import domain as d
from rdbroker_broker.service import BrokerService
from tests.integration.broker.conftest import Clock, assert_live_counters_exact, seed, server

A, B = "10.0.0.1:3389", "10.0.0.2:3389"
NOW = Clock().now

# Every row of the tables a Route writes, with its version (xmin) and locker (xmax): equal snapshots
# mean nothing was inserted, updated or deleted in between.
TABLES = {
    "sessions": "SELECT xmin::text, xmax::text, * FROM sessions ORDER BY id",
    "connections": "SELECT xmin::text, xmax::text, * FROM connections ORDER BY connection_id, attempt",
    # The failed placing statement locked and counted on a server row, then rolled back: the row
    # keeps its version (xmin) and values; only its xmax names the aborted transaction.
    "servers": "SELECT xmin::text, * FROM servers ORDER BY address",
}


async def _snapshot(service: BrokerService) -> dict[str, list[tuple[Any, ...]]]:
    async with service.store.raw_autocommit() as conn:
        return {name: await (await conn.execute(sql)).fetchall() for name, sql in TABLES.items()}


class Calls:
    """Counts the service's transactions and fast-path tries, and still runs them."""

    def __init__(self, service: BrokerService, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tx = self.fast = 0
        run_tx, route_postgres = service.run_tx, service.routing.fast.route

        async def counted_tx(work: Any) -> Any:
            self.tx += 1
            return await run_tx(work)

        async def counted_fast(*args: Any) -> Any:
            self.fast += 1
            return await route_postgres(*args)

        monkeypatch.setattr(service, "run_tx", counted_tx)
        monkeypatch.setattr(service.routing.fast, "route", counted_fast)


async def _end(how: str, service: BrokerService, clock: Clock, session_id: str) -> None:
    """The first answer's pending session stops being live."""
    if how == "ended":
        await service.end_session(session_id)
        return
    clock.advance(service.settings.pending_timeout_s + 1)
    if how == "swept":
        assert (await service.sweep())["expired"] == 1
    # "expired": still `pending` in the table, its time up


COOKIES = {
    "plain": ("alice", d.RouteReason.NEW),  # the user-part guarded variant (qualified names' `alice`)
    "no identity": ("", d.RouteReason.NO_IDENTITY),
    "truncated": ("FTBCO\\A70", d.RouteReason.NEW),  # the key-range guarded variant (own prefix, bare)
    "domain": ("CORP\\alice", d.RouteReason.NEW),  # key ranges: the bare name, mstsc's cut of it
    "bare cut": ("abcdefghi", d.RouteReason.NEW),  # both: keys and user parts starting with it
}


@pytest.mark.parametrize("how", ["expired", "swept", "ended"])
@pytest.mark.parametrize("cookie", COOKIES, ids=list(COOKIES))
async def test_a_retry_after_the_session_went_away_gets_the_first_answer_in_one_statement(
    engine, service, clock, monkeypatch, how, cookie
):
    await seed(engine, server(A), server(B))
    value, reason = COOKIES[cookie]
    request = d.RouteRequest(connection_id="c1", cookie=value)
    calls = Calls(service, monkeypatch)
    first = await service.route(request)
    assert first.reason is reason
    assert (calls.fast, calls.tx) == (1, 0)  # placed by the statement this test is about
    await _end(how, service, clock, first.session_id)
    before = await _snapshot(service)
    calls.fast = calls.tx = 0

    again = await service.route(request)

    assert again == first
    assert (calls.fast, calls.tx) == (1, 0)
    assert await _snapshot(service) == before
    await assert_live_counters_exact(engine)


async def test_only_attempt_0_tries_the_statement(engine, service, clock, monkeypatch):
    """A later attempt goes to the transactional path; attempt 0's retry still gets its own answer
    from the statement, also once the user lives in a newer session."""
    await seed(engine, server(A), server(B))
    first = await service.route(d.RouteRequest(connection_id="c1", cookie="alice"))
    await _end("swept", service, clock, first.session_id)
    calls = Calls(service, monkeypatch)

    later = await service.route(d.RouteRequest(connection_id="c1", attempt=1, cookie="alice"))
    assert (calls.fast, calls.tx) == (0, 1)
    assert later.reason is d.RouteReason.NEW
    assert later.session_id != first.session_id

    before = await _snapshot(service)
    calls.fast = calls.tx = 0
    again = await service.route(d.RouteRequest(connection_id="c1", cookie="alice"))
    assert again == first
    assert (calls.fast, calls.tx) == (1, 0)
    assert await _snapshot(service) == before


@pytest.mark.parametrize("cookie", ["bob", "CORP\\bob", "bob@corp.example.com", "alice@cor", "CORP\\alic"])
async def test_with_a_pool_domain_a_retry_gets_the_first_answer_in_one_statement(
    engine, service, clock, monkeypatch, cookie
):
    """With the pool's account settings known, a placement under the canonical key and its retry
    are one statement each, cut spellings included."""
    corp = d.Pool("default", True, 3600.0, domain="CORP", upn_suffixes=("corp.example.com",))
    await seed(engine, server(A), server(B), pools=(corp,))
    await service.route(d.RouteRequest(connection_id="c0", cookie="someone"))  # learns the settings
    request = d.RouteRequest(connection_id="c1", cookie=cookie)
    calls = Calls(service, monkeypatch)
    first = await service.route(request)
    assert first.reason is d.RouteReason.NEW
    assert (calls.fast, calls.tx) == (1, 0)
    await _end("ended", service, clock, first.session_id)
    calls.fast = calls.tx = 0
    assert await service.route(request) == first
    assert (calls.fast, calls.tx) == (1, 0)
    await assert_live_counters_exact(engine)
