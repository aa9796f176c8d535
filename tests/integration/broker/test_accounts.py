"""One account, whatever its spelling (docs/accounts.md): the table of cases, in both orders, with
and without a pool domain, on PostgreSQL (the one-statement Route and the transactional path) and
on SQLite; lookups (REST use case and gRPC use case) and agent reports through the same rules;
ambiguous cuts join nothing and are counted; a changed pool domain re-keys live sessions."""

from __future__ import annotations

from dataclasses import replace

import pytest
from sqlalchemy import select

from rdbroker_broker import domain as d
from rdbroker_broker import metrics
from rdbroker_broker.db import migrate
from rdbroker_broker.db.engine import make_engine
from rdbroker_broker.db.tables import sessions
from rdbroker_broker.errors import InvalidInput
from rdbroker_broker.farm import apply_farm
from rdbroker_broker.service import BrokerService
from rdbroker_broker.store import Store
from tests.integration.broker.conftest import (
    Clock,
    assert_live_counters_exact,
    farm,
    seed,
    server,
    settings_for,
)

A, B, C = "10.0.5.1:3389", "10.0.5.2:3389", "10.0.5.3:3389"
PLAIN = d.Pool("default", True, 3600.0)
CORP = replace(PLAIN, domain="CORP", upn_suffixes=("corp.example.com", "corp.local"))

# (recorded under, then seen as): one account, with the pool's domain.
JOINS_WITH_DOMAIN = [
    ("CORP\\bob", "bob"),
    ("CORP\\bob", "bob@corp.example.com"),
    ("bob", "BOB@CORP.LOCAL"),
    ("CORP\\bob", "corp\\BOB   "),  # case, mstsc's space padding
    ("alice@corp.example.com", "alice@cor"),  # mstsc's cut of a UPN: the suffix part starts a suffix
    ("bob@corp.example.com", "bob@corp."),
    ("CORP\\alice", "CORP\\alic"),  # mstsc's cut of `DOMAIN\user`
    ("alice", "CORP\\alic"),
    ("alexandria", "alexandri"),  # a bare name's cut (or a UPN's whose user part is that long)
]
# ... without one: keys are the names; a bare name and a qualified one are one account.
JOINS_WITHOUT_DOMAIN = [
    ("CORP\\bob", "bob"),
    ("CORP\\bob", "corp\\BOB  "),
    ("bob@corp.example.com", "bob"),
    ("CORP\\alice", "CORP\\alic"),
    ("alice", "CORP\\alic"),
    ("alexandria", "alexandri"),
]
# Two accounts, never joined.
APART_WITH_DOMAIN = [
    ("CORPORATE\\bob", "bob"),  # another domain
    ("bob@other.example.com", "bob"),  # a UPN suffix that is not the domain's
    ("CORP\\bob", "CORP\\bobby"),
]
APART_WITHOUT_DOMAIN = [
    ("CORP\\bob", "CORPORATE\\bob"),
    ("bob@corp.example.com", "CORP\\bob"),  # without settings nothing says they are one domain
    ("CORP\\bob", "bobby"),
]


def cases(joins: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Every case in both orders: recorded under X then seen as Y, and the reverse."""
    return joins + [(y, x) for x, y in joins]


@pytest.fixture
def ambiguous(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    seen: list[tuple[str, int]] = []
    monkeypatch.setattr(
        metrics, "record_truncated_ambiguous", lambda where, count=1: seen.append((where, count))
    )
    return seen


@pytest.fixture
async def sqlite_service(tmp_path):
    url = f"sqlite+aiosqlite:///{tmp_path / 'rdbroker.db'}"
    engine = make_engine(url)
    await migrate.upgrade(engine)
    try:
        yield BrokerService(Store(engine), settings_for(url), Clock()), engine
    finally:
        await engine.dispose()


async def live_rows(engine) -> list[tuple[str, str, str]]:
    async with engine.connect() as conn:
        query = select(sessions.c.user, sessions.c.user_key, sessions.c.account_name).where(
            sessions.c.state.in_(["pending", "active", "disconnected"])
        )
        return sorted(tuple(r) for r in await conn.execute(query))


async def route(service, connection_id: str, cookie: str) -> d.RouteDecision:
    return await service.route(d.RouteRequest(connection_id, proxy_id="p1", cookie=cookie))


async def joins(service, engine, first: str, then: str) -> None:
    """`then` reconnects to the session `first` made, and the directory holds one live session."""
    placed = await route(service, "c1", first)
    assert placed.reason is d.RouteReason.NEW
    again = await route(service, "c2", then)
    assert (again.reason, again.session_id, again.server_address) == (
        d.RouteReason.RECONNECT,
        placed.session_id,
        placed.server_address,
    ), (first, then)
    assert len(await live_rows(engine)) == 1
    # Found again by either spelling, on the lookups of both APIs.
    for name in (first, then):
        (found,) = await service.find_user_sessions(name)
        assert found.session_id == placed.session_id, name
        (found,) = await service.lookup_user_sessions(name)
        assert found.session_id == placed.session_id, name
    await assert_live_counters_exact(engine)


async def apart(service, engine, first: str, then: str) -> None:
    placed = await route(service, "c1", first)
    other = await route(service, "c2", then)
    assert other.reason is d.RouteReason.NEW, (first, then)
    assert other.session_id != placed.session_id
    assert len(await live_rows(engine)) == 2


@pytest.mark.parametrize(("first", "then"), cases(JOINS_WITH_DOMAIN))
async def test_with_a_pool_domain_every_spelling_is_one_account(service, engine, first, then):
    await seed(engine, server(A), server(B), pools=(CORP,))
    await joins(service, engine, first, then)


@pytest.mark.parametrize(("first", "then"), cases(JOINS_WITHOUT_DOMAIN))
async def test_without_a_pool_domain_bare_and_qualified_names_find_each_other(service, engine, first, then):
    await seed(engine, server(A), server(B))
    await joins(service, engine, first, then)


@pytest.mark.parametrize(("first", "then"), cases(APART_WITH_DOMAIN))
async def test_with_a_pool_domain_other_accounts_stay_apart(service, engine, first, then):
    await seed(engine, server(A), server(B), pools=(CORP,))
    await apart(service, engine, first, then)


@pytest.mark.parametrize(("first", "then"), cases(APART_WITHOUT_DOMAIN))
async def test_without_a_pool_domain_other_accounts_stay_apart(service, engine, first, then):
    await seed(engine, server(A), server(B))
    await apart(service, engine, first, then)


@pytest.mark.parametrize(
    ("pool", "first", "then"),
    [(CORP, x, y) for x, y in cases(JOINS_WITH_DOMAIN)]
    + [(PLAIN, x, y) for x, y in cases(JOINS_WITHOUT_DOMAIN)],
)
async def test_the_transactional_path_on_sqlite_joins_the_same(sqlite_service, pool, first, then):
    service, engine = sqlite_service
    await seed(engine, server(A), server(B), pools=(pool,))
    await joins(service, engine, first, then)


async def test_sessions_store_the_canonical_key_and_the_user_part(service, engine, probes):
    await seed(engine, server(A), server(B), pools=(CORP,))
    await route(service, "c1", "Bob@Corp.Example.Com")
    await route(service, "c2", "CORP\\alic")
    await probes.claim_targets("r1", 60_000)
    await probes.report_sessions("r1", A, [d.ReportedSession("Carol", d.SessionState.ACTIVE)])
    assert await live_rows(engine) == [
        ("Bob@Corp.Example.Com", "corp\\bob", "bob"),
        ("CORP\\alic", "corp\\alic", "alic"),
        ("Carol", "corp\\carol", "carol"),
    ]


@pytest.mark.parametrize("pool", [CORP, PLAIN])
async def test_an_ambiguous_cut_joins_nobody_and_is_counted(service, engine, ambiguous, pool):
    """Two accounts `CORP\\alice` and `CORP\\alicia` live: mstsc's `CORP\\alic` may be either."""
    await seed(engine, server(A), server(B), server(C), pools=(pool,))
    alice = await route(service, "c1", "CORP\\alice")
    alicia = await route(service, "c2", "CORP\\alicia")
    cut = await route(service, "c3", "CORP\\alic")
    assert cut.reason is d.RouteReason.NEW
    assert cut.session_id not in (alice.session_id, alicia.session_id)
    assert ambiguous == [("route", 1)]
    # Neither account was relabelled to the cut.
    users = [u for u, _, _ in await live_rows(engine)]
    assert sorted(users) == ["CORP\\alic", "CORP\\alice", "CORP\\alicia"]


async def test_a_bare_name_with_two_qualified_candidates_joins_neither(service, engine, ambiguous):
    """Without a pool domain `bob` may be `CORP\\bob` or `LAB\\bob`: one candidate only joins."""
    await seed(engine, server(A), server(B), server(C))
    corp = await route(service, "c1", "CORP\\bob")
    lab = await route(service, "c2", "LAB\\bob")
    bare = await route(service, "c3", "bob")
    assert bare.reason is d.RouteReason.NEW
    assert bare.session_id not in (corp.session_id, lab.session_id)
    assert ambiguous == [("route", 1)]


async def test_an_ambiguous_cut_is_counted_at_reconciliation(service, engine, probes, clock):
    await seed(engine, server(A), pools=(CORP,))
    await probes.claim_targets("r1", 60_000)
    cut = await route(service, "c1", "CORP\\alic")
    await service.connection_opened(cut.session_id, "c1", "p1")
    clock.advance(service.settings.pending_timeout_s + 1)
    reported = [d.ReportedSession(u, d.SessionState.ACTIVE) for u in ("alice", "alicia")]
    counts = await probes.report_sessions("r1", A, reported)
    assert counts.ambiguous == 1
    assert counts.linked == 0
    assert [u for u, _, _ in await live_rows(engine)].count("CORP\\alic") == 1


@pytest.mark.parametrize(
    ("pool", "routed", "reported"),
    [
        (CORP, "CORP\\bob", "bob"),
        (CORP, "bob@corp.example.com", "bob"),
        (CORP, "alice@cor", "alice"),
        (CORP, "CORP\\alic", "alice"),
        (PLAIN, "CORP\\bob", "bob"),
        (PLAIN, "CORP\\alic", "alice"),
    ],
)
async def test_the_agents_bare_names_link_to_the_session(
    service, engine, probes, clock, pool, routed, reported
):
    await seed(engine, server(A), pools=(pool,))
    await probes.claim_targets("r1", 60_000)
    placed = await route(service, "c1", routed)
    await service.connection_opened(placed.session_id, "c1", "p1")
    clock.advance(service.settings.pending_timeout_s + 1)
    counts = await probes.report_sessions("r1", A, [d.ReportedSession(reported, d.SessionState.ACTIVE)])
    assert (counts.ended, counts.recorded, counts.ambiguous) == (0, 0, 0)
    (kept,) = await service.lookup_user_sessions(reported)
    assert kept.session_id == placed.session_id


@pytest.mark.parametrize(
    ("pool", "reported", "routed"),
    [
        (CORP, "bob", "CORP\\bob"),
        (CORP, "bob", "bob@corp."),
        (PLAIN, "bob", "CORP\\bob"),
        (PLAIN, "CORP\\bob", "bob"),
    ],
)
async def test_a_session_the_agent_reported_is_found_by_any_spelling(
    service, engine, probes, pool, reported, routed
):
    await seed(engine, server(A), server(B), pools=(pool,))
    await probes.claim_targets("r1", 60_000)
    await probes.report_sessions("r1", A, [d.ReportedSession(reported, d.SessionState.DISCONNECTED)])
    (learnt,) = await service.lookup_user_sessions(reported)
    again = await route(service, "c1", routed)
    assert (again.reason, again.session_id, again.server_address) == (
        d.RouteReason.RECONNECT,
        learnt.session_id,
        A,
    )


async def test_a_changed_pool_domain_rekeys_live_sessions(service, engine):
    """Sessions recorded without a domain move to their canonical keys when the pool gets one; a
    re-key that would give one account two live sessions under one key is skipped."""
    await seed(engine, server(A), server(B), server(C))
    bob = await route(service, "c1", "bob@corp.example.com")
    carol = await route(service, "c2", "CORP\\carol")
    await route(service, "c3", "carol")  # joined: one session
    twin_a = await route(service, "c4", "CORP\\dave")
    twin_b = await route(service, "c5", "dave@corp.local")  # apart without a domain
    assert twin_a.session_id != twin_b.session_id
    plan = await apply_farm(engine, farm(server(A), server(B), server(C), pools=(CORP,)))
    assert not plan.refusals
    assert "re-key 1 live sessions of pool default" in plan.changes, plan.changes
    assert "keep the key of 1 live sessions of pool default (taken)" in plan.changes, plan.changes
    keys = {u: k for u, k, _ in await live_rows(engine)}
    assert keys["bob@corp.example.com"] == "corp\\bob"
    assert keys["CORP\\carol"] == "corp\\carol"
    assert sorted([keys["CORP\\dave"], keys["dave@corp.local"]]) == ["corp\\dave", "dave@corp.local"]
    # The cache of the pool's settings is stale: the Route statement sees it and the call still joins.
    again = await route(service, "c6", "CORP\\bob")
    assert (again.reason, again.session_id) == (d.RouteReason.RECONNECT, bob.session_id)
    again = await route(service, "c7", "carol@corp.local")
    assert (again.reason, again.session_id) == (d.RouteReason.RECONNECT, carol.session_id)
    await assert_live_counters_exact(engine)


async def test_the_one_statement_route_places_and_reconnects_with_a_pool_domain(service, engine, monkeypatch):
    """With the pool's settings known, the common Route stays one statement: a new account whose
    spellings hold no live session is placed, and any spelling of it comes back, in one statement."""
    await seed(engine, server(A), server(B), pools=(CORP,))
    await route(service, "c0", "someone")  # learns the pool's settings

    async def no_transaction(work: object) -> object:
        raise AssertionError("the transactional path ran")

    monkeypatch.setattr(service, "run_tx", no_transaction)
    placed = await route(service, "c1", "CORP\\bob")
    assert placed.reason is d.RouteReason.NEW
    for i, name in enumerate(("bob", "BOB@corp.example.com", "bob@corp.")):
        again = await route(service, f"c{i + 2}", name)
        assert (again.reason, again.session_id) == (d.RouteReason.RECONNECT, placed.session_id)


async def test_another_spelling_goes_to_the_transactional_path_which_joins(service, engine, monkeypatch):
    await seed(engine, server(A), server(B))
    placed = await route(service, "c1", "bob")
    calls = []
    original = service.run_tx

    async def counted(work):
        calls.append(work)
        return await original(work)

    monkeypatch.setattr(service, "run_tx", counted)
    again = await route(service, "c2", "CORP\\bob")
    assert (again.reason, again.session_id) == (d.RouteReason.RECONNECT, placed.session_id)
    assert len(calls) == 1  # the statement's guard found `bob`: the transactional path decided
    # Relabelled to the fuller name: the next Route of it is one statement again.
    again = await route(service, "c3", "corp\\bob")
    assert again.session_id == placed.session_id
    assert len(calls) == 1


async def test_lookup_in_a_named_pool_uses_that_pools_settings(service, engine):
    lab = d.Pool("lab", False, 3600.0)
    await seed(engine, server(A), server(B, pool="lab"), pools=(CORP, lab))
    placed = await route(service, "c1", "bob")
    (found,) = await service.find_user_sessions("bob@corp.example.com", pool="default")
    assert found.session_id == placed.session_id
    assert await service.find_user_sessions("bob@corp.example.com", pool="lab") == []
    assert await service.lookup_user_sessions("CORP\\bob", pool="lab") == []


@pytest.mark.parametrize("learnt", [False, True])
async def test_a_name_too_long_once_qualified_is_invalid(service, engine, learnt):
    """A 254-character bare name fits its column; `corp\\` and it do not: INVALID_ARGUMENT, whether
    the broker knows the pool's domain yet (checked before the statement) or not (at the insert)."""
    await seed(engine, server(A), pools=(CORP,))
    if learnt:
        await route(service, "c0", "someone")
    with pytest.raises(InvalidInput, match="too long once qualified with the pool's domain"):
        await route(service, "c1", "b" * 254)
    assert [u for u, _, _ in await live_rows(engine)] == (["someone"] if learnt else [])
