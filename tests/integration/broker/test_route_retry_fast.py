"""A retried Route (same connection_id and attempt) whose session is no longer live is answered by the
one placing statement: the first answer, nothing placed, locked or stored, no transaction. A retry
storm after an outage arrives after the pending sessions have expired."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from rdbroker_broker import domain as d
from rdbroker_broker.db import routing_sql
from rdbroker_broker.service import BrokerService
from tests.integration.broker.conftest import Clock, assert_live_counters_exact, seed, server

A, B = "10.0.0.1:3389", "10.0.0.2:3389"
NOW = Clock().now

# Every row of the tables a Route writes, with its version (xmin) and locker (xmax): equal snapshots
# mean nothing was inserted, updated, deleted or locked in between.
TABLES = {
    "sessions": "SELECT xmin::text, xmax::text, * FROM sessions ORDER BY id",
    "connections": "SELECT xmin::text, xmax::text, * FROM connections ORDER BY connection_id, attempt",
    "servers": "SELECT xmin::text, xmax::text, * FROM servers ORDER BY address",
}


async def _snapshot(service: BrokerService) -> dict[str, list[tuple[Any, ...]]]:
    async with service.store.raw_autocommit() as conn:
        return {name: await (await conn.execute(sql)).fetchall() for name, sql in TABLES.items()}


class Calls:
    """Counts the service's transactions and fast-path tries, and still runs them."""

    def __init__(self, service: BrokerService, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tx = self.fast = 0
        run_tx, route_postgres = service.run_tx, service._route_postgres

        async def counted_tx(work: Any) -> Any:
            self.tx += 1
            return await run_tx(work)

        async def counted_fast(*args: Any) -> Any:
            self.fast += 1
            return await route_postgres(*args)

        monkeypatch.setattr(service, "run_tx", counted_tx)
        monkeypatch.setattr(service, "_route_postgres", counted_fast)


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
    "plain": ("alice", d.RouteReason.NEW),
    "no identity": ("", d.RouteReason.NO_IDENTITY),
    "truncated": ("FTBCO\\A70", d.RouteReason.NEW),  # the own-prefix (and bare) guarded variant
    "domain": ("CORP\\alice", d.RouteReason.NEW),  # the bare-name guarded variant
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


async def test_a_retry_with_a_live_session_reads_the_answer_once(engine, service, monkeypatch):
    """The statement returns the stored answer itself: no second query for it."""
    await seed(engine, server(A))
    first = await service.route(d.RouteRequest(connection_id="c1", cookie="alice"))
    reconnect = await service.route(d.RouteRequest(connection_id="c2", cookie="alice"))
    assert reconnect.reason is d.RouteReason.RECONNECT

    async def no_second_query(*args: object) -> object:
        raise AssertionError("the stored answer was read again")

    monkeypatch.setattr(routing_sql, "stored_answer", no_second_query)
    assert await service.route(d.RouteRequest(connection_id="c1", cookie="alice")) == first
    assert await service.route(d.RouteRequest(connection_id="c2", cookie="alice")) == reconnect


@pytest.mark.parametrize("statement", ["CONTEXT_PLACE_DEFAULT", "CONTEXT_PLACE_GUARDED_NAMED"])
async def test_the_stored_answer_is_a_primary_key_probe(engine, pg_database_url, statement):
    await seed(engine, server(A))
    with psycopg.connect(pg_database_url, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO connections (connection_id, attempt, session_id, proxy_id, server_address,
                                        reason, "user", pool, client_address, created_at,
                                        bytes_from_client, bytes_from_server, duration_ms, end_reason)
               SELECT 'c' || n, 0, 's' || n, 'p', %s, 'new', 'u' || n, 'default', '', now(), 0, 0, 0, ''
               FROM generate_series(1, 5000) n""",
            (A,),
        )
        conn.execute("ANALYZE connections")
        params = {
            "user_key": "ftbco\\a70", "own_from": "ftbco\\a70", "own_to": "ftbco\\a71",
            "bare_from": "a70", "bare_to": "a71",
            "pool_key": "default", "now": NOW, "connection_id": "c17", "attempt": 0, "proxy_id": "p",
            "client_address": "", "session_id": "s1", "user": "FTBCO\\A70", "session_proxy_id": "p",
            "expires_at": NOW, "reason": "new",
        }  # fmt: skip
        sql = getattr(routing_sql, statement)
        plan = "\n".join(row[0] for row in conn.execute("EXPLAIN " + sql, params))
    assert "pk_connections on connections" in plan, plan
    assert "Seq Scan on connections" not in plan, plan
