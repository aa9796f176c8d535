"""Placement modes and assignment rules through real Routes, on PostgreSQL (the one-statement fast
path) and on SQLite (the transactional path): the farm applied as `rdbroker apply` applies it."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from rdbroker_broker import assignments as a
from rdbroker_broker import domain as d
from rdbroker_broker.db import migrate
from rdbroker_broker.db.engine import make_engine
from rdbroker_broker.errors import InvalidInput, NoCapacity
from rdbroker_broker.farm import Farm, apply_farm
from rdbroker_broker.service import BrokerService
from rdbroker_broker.service.servers import ServerChanges
from rdbroker_broker.store import Store
from tests.integration.broker.conftest import Clock, assert_live_counters_exact, settings_for

DEFAULT = ("10.0.0.1:3389", "10.0.0.2:3389")
FINANCE = ("10.0.1.1:3389", "10.0.1.2:3389", "10.0.1.3:3389")
LAB = ("10.0.2.1:3389",)
POOLS = (
    d.Pool("default", True, 3600.0),
    d.Pool("finance", False, 3600.0, domain="CORP", placement=d.Placement.DEPTH),
    d.Pool("lab", False, 3600.0),
)
RULES = [a.Rule("finance", user="CORP\\fin-*"), a.Rule("lab", network="10.20.0.0/16")]


def the_farm(rules: list[a.Rule] = RULES, pools: tuple[d.Pool, ...] = POOLS) -> Farm:
    servers = [d.Server(address, "default") for address in DEFAULT]
    servers += [d.Server(address, "finance", max_sessions=2) for address in FINANCE]
    servers += [d.Server(address, "lab") for address in LAB]
    return Farm(pools=list(pools), servers=servers, assignments=list(rules))


@dataclass
class Broker:
    service: BrokerService
    engine: AsyncEngine
    url: str

    async def route(
        self, connection_id: str, user: str = "", client: str = "", pool: str = ""
    ) -> d.RouteDecision:
        request = d.RouteRequest(connection_id, proxy_id="p1", cookie=user, client_address=client, pool=pool)
        return await self.service.route(request)

    def replica(self, **settings: object) -> BrokerService:
        """Another broker on the same database."""
        return BrokerService(Store(self.engine), settings_for(self.url, **settings), Clock())


@pytest.fixture(params=["postgresql", "sqlite"])
async def broker(request, pg_database_url, tmp_path) -> AsyncIterator[Broker]:
    url = pg_database_url if request.param == "postgresql" else f"sqlite+aiosqlite:///{tmp_path / 'b.db'}"
    engine = make_engine(url)
    await migrate.upgrade(engine)
    try:
        plan = await apply_farm(engine, the_farm())
        assert not plan.refusals
        yield Broker(
            BrokerService(Store(engine), settings_for(url, assignments_refresh_ms=0), Clock()), engine, url
        )
    finally:
        await engine.dispose()


async def test_rules_pick_the_pool_by_account_and_by_network(broker):
    fin = await broker.route("c1", "CORP\\fin-alice", "192.168.1.5:50000")
    assert (fin.pool, fin.server_address in FINANCE, fin.reason) == ("finance", True, d.RouteReason.NEW)
    # A bare name is CORP\\fin-bob in pool finance (its domain): the rule matches it too.
    assert (await broker.route("c2", "fin-bob")).pool == "finance"
    lab = await broker.route("c3", "bob", "10.20.7.1:50000")
    assert (lab.pool, lab.server_address) == ("lab", LAB[0])
    # The first rule that matches wins: a finance user from the lab network goes to finance.
    assert (await broker.route("c4", "CORP\\fin-carol", "10.20.7.2:50000")).pool == "finance"
    # No user name: the network rule still places the connection (without affinity).
    anonymous = await broker.route("c5", "", "10.20.7.3:50000")
    assert (anonymous.pool, anonymous.reason) == ("lab", d.RouteReason.NO_IDENTITY)
    other = await broker.route("c6", "dave", "10.21.0.1:50000")
    assert (other.pool, other.server_address in DEFAULT) == ("default", True)
    # A client that names its pool (tsv://) goes there: no rule is read.
    named = await broker.route("c7", "CORP\\fin-erin", "10.20.7.4:50000", pool="default")
    assert named.pool == "default"
    # Reconnects find the session in the pool the rules picked, by any spelling of the account.
    again = await broker.route("c8", "corp\\FIN-ALICE", "10.20.7.9:50000")
    assert (again.reason, again.session_id, again.server_address) == (
        d.RouteReason.RECONNECT,
        fin.session_id,
        fin.server_address,
    )
    await assert_live_counters_exact(broker.engine)


async def test_a_depth_pool_fills_each_server_to_its_limit_before_the_next(broker, monkeypatch):
    placed = [(await broker.route("c0", "CORP\\fin-0", pool="finance")).server_address]
    if broker.service.store.is_postgres:
        # The broker knows the pool's account settings now: on PostgreSQL each placement is the one
        # statement of the fast path, which ranks in SQL.
        async def no_transaction(work: object) -> object:
            raise AssertionError("the transactional path ran")

        monkeypatch.setattr(broker.service, "run_tx", no_transaction)
    placed += [
        (await broker.route(f"c{i}", f"CORP\\fin-{i}", pool="finance")).server_address for i in range(1, 6)
    ]
    assert placed == [FINANCE[0], FINANCE[0], FINANCE[1], FINANCE[1], FINANCE[2], FINANCE[2]]
    monkeypatch.undo()
    with pytest.raises(NoCapacity):
        await broker.route("c6", "CORP\\fin-6")
    # Breadth, the default pool, spreads.
    spread = [(await broker.route(f"d{i}", f"user{i}")).server_address for i in range(4)]
    assert Counter(spread) == {DEFAULT[0]: 2, DEFAULT[1]: 2}
    # A session ending frees its place: the next finance user fills that server again.
    first = (await broker.service.lookup_user_sessions("CORP\\fin-2"))[0]
    await broker.service.end_session(first.session_id)
    assert (await broker.route("c7", "CORP\\fin-7")).server_address == FINANCE[1]
    await assert_live_counters_exact(broker.engine)


async def test_depth_counts_placements_a_load_report_does_not_show_yet(broker):
    """With agent loads, a server's figure is old during a logon storm: the placements made since
    count, so depth fills the busiest server to its limit, not beyond, and breadth spreads."""
    from rdbroker_broker.probing import ProbeService

    probes = ProbeService(broker.service)
    await probes.claim_targets("r1", 60_000)
    # 10.0.1.2 reports the highest load: depth fills it first.
    loads = dict(zip(FINANCE, (10, 30, 20), strict=True))
    results = [
        d.ProbeResult(address, d.Health.UP, True, "ok", load, d.AgentState.UP, "")
        for address, load in loads.items()
    ]
    assert await probes.report_results("r1", results) == []
    placed = [(await broker.route(f"c{i}", f"CORP\\fin-{i}")).server_address for i in range(6)]
    assert placed == [FINANCE[1], FINANCE[1], FINANCE[2], FINANCE[2], FINANCE[0], FINANCE[0]]


async def test_every_replica_reads_the_rules_from_the_database(broker):
    """Rules applied after a broker started reach it once it reads them again (at every Route here:
    assignments_refresh_ms=0); another replica with a long refresh keeps the rules it read until then."""
    lazy = broker.replica(assignments_refresh_ms=3_600_000)
    assert (await broker.route("c1", "bob", "10.20.0.9:1")).pool == "lab"
    request = d.RouteRequest("c2", proxy_id="p1", cookie="carol", client_address="10.20.0.9:1")
    assert (await lazy.route(request)).pool == "lab"
    plan = await apply_farm(broker.engine, the_farm(rules=[a.Rule("finance", network="10.20.0.0/16")]))
    assert plan.changes == ["set 1 assignment rule: 1. network 10.20.0.0/16 -> finance"]
    assert (await broker.route("c3", "dave", "10.20.0.9:1")).pool == "finance"
    assert (await lazy.route(replace(request, connection_id="c4", cookie="erin"))).pool == "lab"
    fresh = broker.replica()
    assert (await fresh.route(replace(request, connection_id="c5", cookie="frank"))).pool == "finance"
    # Applying the same file again changes nothing; a file without `assignments:` clears them.
    assert (
        await apply_farm(broker.engine, the_farm(rules=[a.Rule("finance", network="10.20.0.0/16")]))
    ).changes == []
    plan = await apply_farm(broker.engine, the_farm(rules=[]))
    assert plan.changes == [
        "clear the assignment rules (every connection that names no pool goes to the default pool)"
    ]
    assert (await broker.route("c6", "gina", "10.20.0.9:1")).pool == "default"


async def test_depth_is_refused_while_a_server_of_the_pool_has_no_limit(broker):
    service = broker.service
    with pytest.raises(
        InvalidInput,
        match=r"placement: depth placement fills .* 10\.0\.0\.1:3389, 10\.0\.0\.2:3389 have none",
    ):
        await service.update_pool("default", {"placement": d.Placement.DEPTH})
    with pytest.raises(InvalidInput, match=r"pool finance: depth placement .* 10\.0\.1\.9:3389 has none"):
        await service.add_server(d.Server("10.0.1.9:3389", "finance"))
    with pytest.raises(InvalidInput, match="pool finance: depth placement"):
        await service.update_server(FINANCE[0], ServerChanges(max_sessions=0))
    # With limits everywhere, the pool may change to depth and back.
    for address in DEFAULT:
        await service.update_server(address, ServerChanges(max_sessions=5))
    summary = await service.update_pool("default", {"placement": d.Placement.DEPTH})
    assert summary.pool.placement is d.Placement.DEPTH
    assert (await service.add_server(d.Server("10.0.1.9:3389", "finance", max_sessions=3))).max_sessions == 3
    # `apply` refuses a depth pool that keeps a server (not in the file) without a limit, and keeps nothing.
    farm = the_farm()
    kept = d.Server("10.0.1.8:3389", "finance")
    await service.add_server(replace(kept, max_sessions=1))
    await service.update_pool("finance", {"placement": d.Placement.BREADTH})
    await service.update_server(kept.address, ServerChanges(max_sessions=0))
    plan = await apply_farm(broker.engine, farm)
    assert plan.refusals == [
        "pool finance places by depth, which fills each server up to its max_sessions, and server "
        "10.0.1.8:3389 (kept: not in the file) has none: declare it with max_sessions, or delete it "
        "with --prune"
    ]
    [finance] = [p for p in await service.list_pools() if p.name == "finance"]
    assert finance.placement is d.Placement.BREADTH  # nothing of the refused plan was kept
    assert not (await apply_farm(broker.engine, farm, prune=True)).refusals
