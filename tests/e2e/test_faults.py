"""Kill any single node under load, lose nothing (issue 7).

Each test builds the whole cluster (tests.support.farm), seeds every user with one logon, then runs the
login storm and injects one fault with a signal while it runs. What every test asserts:

- no committed session lost: every live session in the directory just before the fault is still
  there afterwards, on the same server, and not ended (unless its server is the one that died);
- every user lands, every time, on the server of their session while that server lives; no user
  ever holds two live sessions;
- failed attempts are counted, and the client's one retry succeeds once the bound below has passed;
- the time from the fault to full service is measured and printed (run with -s to see the figures);
- nothing the test started is left running, and its temporary directory is gone.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from rdbroker_proto.v1 import broker_pb2
from tests.support.cluster import Harness
from tests.support.farm import Farm, SessionRow
from tests.support.storm import (
    Attempt,
    LoginStorm,
    StormSettings,
    failed,
    failed_after_retry,
    first_servers,
    recovery_s,
    setup_figures,
    slow,
    summary,
    wrong_server,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

# Broker, proxy, health: new connections unaffected or back within this. "Back" means no attempt
# fails or is cut, and none still being set up at the fault or started after it takes longer than
# storm.SLOW_S, from this long after the fault on (storm.recovery_s).
SERVICE_BOUND_S = 2.0
FAILOVER_BOUND_S = 15.0  # PostgreSQL: routing back within this after the promotion
# A dead health replica's servers: probed again by the other once its leases (600 ms) lapse. This is
# our own figure, not the bound (that one is about new connections, SERVICE_BOUND_S, asserted
# too). Typically under a second here; the loose sanity bound leaves room for a loaded 2-core machine
# (routing is not affected meanwhile: the servers keep their last state).
REPROBE_BOUND_S = 5.0
# A dead terminal server is marked down after `fall` failed probes: the first one comes up to one
# interval after the kill, so fall * interval in all, plus the time to write the mark, which a loaded
# 2-core machine stretches (a probe task or a lease renewal scheduled late); the slack is for that.
# The bound itself (no new placement on it after fall * interval) is asserted with no slack,
# "nothing routed to it once marked down" is asserted too (see MARK_RACE_S).
MARK_DOWN_SLACK_S = 1.0
# A Route that read the server as up just before the mark committed records its connection a moment
# after the mark's own timestamp (taken before its commit): "nothing routed to it once marked down"
# allows this much for that race between two concurrent transactions.
MARK_RACE_S = 0.25
LIVE_STATES = (
    broker_pb2.SESSION_STATE_PENDING,
    broker_pb2.SESSION_STATE_ACTIVE,
    broker_pb2.SESSION_STATE_DISCONNECTED,
)
STORM = StormSettings(users=24, hold_s=(0.3, 1.0), pause_s=(0.2, 0.6), retry_delay_s=0.3)


@pytest.fixture
def farm() -> Iterator[Farm]:
    harness = Harness()
    try:
        yield Farm(harness).start()
    finally:
        harness.cleanup()
    assert harness.leaked_processes() == []
    assert not harness.root.exists()


@dataclass
class Run:
    storm: LoginStorm
    homes: dict[str, str]  # the server each user's session was on before the storm
    before: dict[str, SessionRow]  # live sessions committed just before the fault
    storm_at: float  # time.monotonic() when the storm began (after the seed logons)
    fault_at: float  # time.monotonic() when the signal was sent
    fault_wall: datetime


async def storm_with_fault(
    farm: Farm, inject: Callable[[], Awaitable[None]], *, warmup_s: float = 2.0, duration_s: float = 10.0
) -> Run:
    storm = LoginStorm(farm.proxies, STORM)
    await storm.logon_all_once()
    bad = failed(storm.attempts)
    assert bad == [], f"the cluster must work before the fault: {bad[:2]}\n{farm.log_tails()}"
    homes = first_servers(storm.attempts)
    assert set(homes) == set(storm.users)
    directory = await asyncio.to_thread(farm.sessions)
    assert {s.user: s.server for s in directory.values()} == homes, (
        "the directory agrees with where users landed"
    )

    async def fault() -> tuple[dict[str, SessionRow], float, datetime]:
        await asyncio.sleep(warmup_s)
        before = await asyncio.to_thread(farm.sessions)
        at, wall = time.monotonic(), datetime.now(UTC)
        await inject()
        return before, at, wall

    storm_at = time.monotonic()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(storm.run(duration_s))
        faulted = tg.create_task(fault())
    before, fault_at, fault_wall = faulted.result()
    assert len(started_after(storm.attempts, fault_at + 1.0)) >= len(storm.users), "the storm went on"
    return Run(storm, homes, before, storm_at, fault_at, fault_wall)


async def directory_figures(farm: Farm, run: Run, dead: frozenset[str] = frozenset()) -> dict[str, object]:
    """What the directory says after the fault, as counts that must all be 0 (and examples)."""
    pending = await settled_pending(farm, dead)
    after = await asyncio.to_thread(farm.sessions, live_only=False)
    lost = [s for s in run.before.values() if s.id not in after or after[s.id].server != s.server]
    ended = [s for s in run.before.values() if s.server not in dead and after[s.id].state == "ended"]
    duplicates = await asyncio.to_thread(farm.duplicate_live_users)
    wrong = wrong_server(run.storm.attempts, run.homes, dead)
    # The broker's own answer agrees: one live session per user, where the user last landed.
    last: dict[str, str] = {}
    for a in sorted(run.storm.attempts, key=lambda a: a.started):
        if a.server is not None:
            last[a.user] = a.server
    answers = await farm.lookup(run.storm.users)
    mismatches = [
        (user, answers[user])
        for user in run.storm.users
        if [s.server_address for s in answers[user] if s.state in LIVE_STATES] != [last[user]]
    ]
    return {
        "sessions_lost": len(lost),
        "sessions_ended_on_live_servers": len(ended),
        "duplicate_live_sessions": len(duplicates),
        "landed_on_wrong_server": len(wrong),
        "lookup_mismatches": len(mismatches),
        "pending_after_storm": len(pending),
        "examples": [str(x) for x in [*lost, *ended, *duplicates, *wrong, *mismatches, *pending][:5]],
    }


async def settled_pending(farm: Farm, dead: frozenset[str], wait_s: float = 5.0) -> list[SessionRow]:
    """Sessions still `pending` (routed, never reported opened) once the storm is over and the proxies'
    report buffers had `wait_s` to drain. One left behind would expire and cost its user the session."""
    deadline = time.monotonic() + wait_s
    while True:
        rows = await asyncio.to_thread(farm.sessions)
        pending = [r for r in rows.values() if r.state == "pending" and r.server not in dead]
        if not pending or time.monotonic() > deadline:
            return pending
        await asyncio.sleep(0.2)


def assert_directory(figures: dict[str, object]) -> None:
    counts = {k: v for k, v in figures.items() if k != "examples"}
    assert set(counts.values()) == {0}, figures


def report(fault: str, **figures: object) -> None:
    """Print the figures; also append them to $RDBROKER_FAULT_REPORT (JSON lines) when set."""
    line = {"fault": fault, **figures}
    sys.stdout.write(f"\nFAULT {json.dumps(line)}\n")
    target = os.environ.get("RDBROKER_FAULT_REPORT")
    if target:
        with open(target, "a", encoding="utf-8") as out:
            out.write(json.dumps(line) + "\n")


def storm_figures(run: Run, since: float | None = None, settled: float | None = None) -> dict[str, object]:
    """The storm's counts, recovery measured from `since` (default: the fault), and the set-up times
    of logons started before the fault, during it (until `settled`, default: SERVICE_BOUND_S after
    the fault) and after it."""
    attempts = run.storm.attempts
    start = run.fault_at if since is None else since
    end = run.fault_at + SERVICE_BOUND_S if settled is None else settled
    return {
        "attempts": len(attempts),
        "failed_attempts": len(failed(attempts)),
        "failed_after_retry": len(failed_after_retry(attempts)),
        "dropped_connections": sum(a.dropped for a in attempts),
        "slow_attempts": len(slow(attempts, start)),
        "recovery_s": round(recovery_s(attempts, start), 2),
        "setup_s": {
            "before": setup_figures(attempts, run.storm_at, run.fault_at),
            "during": setup_figures(attempts, run.fault_at, end),
            "after": setup_figures(attempts, end),
        },
        "sessions_before_fault": len(run.before),
        "summary": summary(attempts, start),
    }


def started_after(attempts: list[Attempt], t: float) -> list[Attempt]:
    return [a for a in attempts if a.started >= t]


async def test_a_broker_dies(farm: Farm) -> None:
    async def inject() -> None:
        farm.harness.supervisor.kill("broker0")

    run = await storm_with_fault(farm, inject)
    directory = await directory_figures(farm, run)
    report("broker", **storm_figures(run), **directory)
    assert_directory(directory)
    assert failed_after_retry(run.storm.attempts) == []
    assert recovery_s(run.storm.attempts, run.fault_at) <= SERVICE_BOUND_S


async def test_a_proxy_dies(farm: Farm) -> None:
    async def inject() -> None:
        farm.harness.supervisor.kill("proxy0")

    run = await storm_with_fault(farm, inject)
    directory = await directory_figures(farm, run)
    report("proxy", **storm_figures(run), **directory)
    assert_directory(directory)
    assert failed_after_retry(run.storm.attempts) == []
    moved = [
        a for a in started_after(run.storm.attempts, run.fault_at) if a.ok and a.proxy == farm.proxies[1]
    ]
    assert {a.user for a in moved} == set(run.storm.users), "every user came back through the other proxy"
    assert recovery_s(run.storm.attempts, run.fault_at) <= SERVICE_BOUND_S


async def test_a_health_replica_dies(farm: Farm) -> None:
    lease_sql = "SELECT count(DISTINCT replica_id), count(*) FROM probe_leases WHERE expires_at > now()"
    reprobed: list[float] = []

    async def inject() -> None:
        shared = await asyncio.to_thread(farm.query, lease_sql)
        assert shared[0] == (2, len(farm.hosts)), f"both replicas share the servers: {shared}"
        farm.harness.supervisor.kill("health0")
        fault_wall = datetime.now(UTC)
        start = time.monotonic()
        while time.monotonic() - start < 10:  # until every server has been probed since the kill
            probed = await asyncio.to_thread(farm.probed_at)
            if all(t is not None and t > fault_wall for t in probed.values()):
                reprobed.append(time.monotonic())
                return
            await asyncio.sleep(0.05)

    run = await storm_with_fault(farm, inject, duration_s=8.0)
    assert reprobed, "the dead replica's servers were never probed again"
    reprobe_s = reprobed[0] - run.fault_at
    directory = await directory_figures(farm, run)
    report("health", every_server_reprobed_s=round(reprobe_s, 2), **storm_figures(run), **directory)
    assert_directory(directory)
    held = await asyncio.to_thread(farm.query, lease_sql)
    assert held[0] == (1, len(farm.hosts)), f"the surviving replica holds every server: {held}"
    assert set((await asyncio.to_thread(farm.server_health)).values()) == {"up"}
    assert failed_after_retry(run.storm.attempts) == []
    assert recovery_s(run.storm.attempts, run.fault_at) <= SERVICE_BOUND_S
    assert reprobe_s <= REPROBE_BOUND_S


async def test_the_postgresql_primary_dies_and_the_standby_is_promoted(farm: Farm) -> None:
    pg = farm.harness.pg
    assert pg is not None
    promoted: list[float] = []

    async def inject() -> None:
        await asyncio.to_thread(pg.kill_primary)
        await asyncio.to_thread(pg.promote_standby)
        farm.harness.remember_pg_pids()
        promoted.append(time.monotonic())

    run = await storm_with_fault(farm, inject, duration_s=22.0)
    promoted_at = promoted[0]
    directory = await directory_figures(farm, run)
    report(
        "postgresql-failover",
        promote_s=round(promoted_at - run.fault_at, 2),
        recovery_from_kill_s=round(recovery_s(run.storm.attempts, run.fault_at), 2),
        **storm_figures(run, since=promoted_at, settled=promoted_at),
        **directory,
    )
    assert_directory(directory)
    late = [a for a in failed_after_retry(run.storm.attempts) if a.started > promoted_at + FAILOVER_BOUND_S]
    assert late == []
    assert recovery_s(run.storm.attempts, promoted_at) <= FAILOVER_BOUND_S
    assert [a for a in run.storm.attempts if a.ok and a.started > promoted_at], "routing resumed"


async def test_a_terminal_server_dies(farm: Farm) -> None:
    dead = farm.hosts[0]
    marked: list[float] = []

    async def inject() -> None:
        farm.harness.supervisor.kill("host0")
        start = time.monotonic()
        while time.monotonic() - start < 10:
            if (await asyncio.to_thread(farm.server_health))[dead] == "down":
                marked.append(time.monotonic())
                return
            await asyncio.sleep(0.05)

    run = await storm_with_fault(farm, inject)
    assert marked, "the dead server was never marked down"
    settings = farm.settings
    fall_s = settings.fall * settings.probe_interval_ms / 1000
    on_dead = [u for u, s in run.homes.items() if s == dead]
    # The directory's own time of the mark and its created_at columns are on the same host clock as
    # fault_wall; the test's poll (`marked`) only bounds when the mark became visible.
    marked_wall = await asyncio.to_thread(farm.health_changed_at, dead)
    assert marked_wall is not None
    assert marked_wall >= run.fault_wall, "the mark is the one after the kill"
    down_s = (marked_wall - run.fault_wall).total_seconds()
    fall_wall = run.fault_wall + timedelta(seconds=fall_s)
    new_after_fall = await asyncio.to_thread(farm.sessions_placed_on, dead, fall_wall)
    routed_after_kill = await asyncio.to_thread(farm.placements_on, dead, run.fault_wall)
    routed_after_fall = await asyncio.to_thread(farm.placements_on, dead, fall_wall)
    routed_after_mark = await asyncio.to_thread(farm.placements_on, dead, marked_wall)
    routed_after_race = await asyncio.to_thread(
        farm.placements_on, dead, marked_wall + timedelta(seconds=MARK_RACE_S)
    )
    last_routed = await asyncio.to_thread(farm.last_routed_to, dead)
    directory = await directory_figures(farm, run, dead=frozenset({dead}))
    report(
        "terminal-server",
        marked_down_s=round(down_s, 2),
        mark_seen_by_test_s=round(marked[0] - run.fault_at, 2),
        fall_x_interval_s=fall_s,
        users_on_dead_server=len(on_dead),
        new_sessions_on_it_after_fall_x_interval=new_after_fall,
        routed_to_it_after_kill=routed_after_kill,
        routed_to_it_after_fall_x_interval=routed_after_fall,
        routed_to_it_after_mark=routed_after_mark,
        last_route_to_it_after_mark_s=(
            None if last_routed is None else round((last_routed - marked_wall).total_seconds(), 3)
        ),
        **storm_figures(run, settled=marked[0]),
        **directory,
    )
    assert on_dead, "the dead server held sessions"
    # The bound, with no slack: no new placement on it after fall * interval.
    assert new_after_fall == 0
    # Stronger: once marked down nothing at all is routed to it, but for MARK_RACE_S (before the mark
    # its users' reconnects are routed to it and fail: the broker does not move a session silently).
    assert routed_after_race == 0
    assert down_s <= fall_s + MARK_DOWN_SLACK_S
    assert_directory(directory)
    # Once it is marked down, every logon succeeds (after at most one retry), elsewhere.
    after_down = started_after(run.storm.attempts, marked[0] + 0.5)
    assert [a for a in after_down if a.retry and not a.ok] == []
    moved = {a.user for a in after_down if a.ok and a.user in on_dead}
    assert moved == set(on_dead), "every user of the dead server was placed elsewhere"


async def test_postgresql_stops_then_continues(farm: Farm) -> None:
    pg = farm.harness.pg
    assert pg is not None
    resumed: list[float] = []
    stop_s = 5.0

    async def inject() -> None:
        pg.stop_primary()
        await asyncio.sleep(stop_s)
        pg.continue_primary()
        resumed.append(time.monotonic())

    run = await storm_with_fault(farm, inject, duration_s=18.0)
    directory = await directory_figures(farm, run)
    report(
        "postgresql-sigstop",
        stopped_s=stop_s,
        recovery_from_stop_s=round(recovery_s(run.storm.attempts, run.fault_at), 2),
        **storm_figures(run, since=resumed[0], settled=resumed[0]),
        **directory,
    )
    assert_directory(directory)
    late = [a for a in failed_after_retry(run.storm.attempts) if a.started > resumed[0] + FAILOVER_BOUND_S]
    assert late == []
    assert recovery_s(run.storm.attempts, resumed[0]) <= FAILOVER_BOUND_S
