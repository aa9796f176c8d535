"""Capacity on demand: the power loop (docs/power.md).

Every broker replica runs the loop; for each pool with power hooks, one transaction under the pool's
`pool_power` row lock (SKIP LOCKED: a replica deciding for that pool right now makes the others pass)
- notes which servers hold no live session since when (the stop rule's idle time);
- moves each server's power state as the probes say (`power_rules.observed`): a server no probe
  reaches is off, one that answers after a start is on, a start or stop past its deadline is given up;
- claims at most one start (free capacity below `min_free_sessions`) and one stop (idle for `idle_for`
  beyond `keep_running`), each a conditional UPDATE from the state it was read in.
The hooks are called after the commit, outside any transaction, one call in flight per server; a
hook that does not take the request puts the server back (`PowerRepository.give_up`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
from dataclasses import dataclass
from datetime import timedelta

from rdbroker_broker import audit, callers, metrics
from rdbroker_broker import domain as d
from rdbroker_broker import power_rules as rules
from rdbroker_broker.config import BrokerSettings
from rdbroker_broker.db.power_repository import PowerRepository
from rdbroker_broker.errors import BrokerError, DatabaseUnavailable
from rdbroker_broker.power_hooks import HookClient, HookFailed
from rdbroker_broker.service import BrokerService
from rdbroker_broker.store import Repos
from rdbroker_common.settings import split_host_port

log = logging.getLogger(__name__)

# The audit trail's actor of the loop's own changes (a drain, a start or stop called).
POWER_CALLER = callers.Caller("broker:power")


class PowerConfigError(Exception):
    """Pools declare power hooks the broker cannot call; the message says what to set."""


class Verb(enum.StrEnum):
    START = "start"
    STOP = "stop"


@dataclass(frozen=True)
class PowerAction:
    """A hook call a tick claimed: the server is `starting` or `stopping` until the probes tell."""

    verb: Verb
    pool: str
    address: str
    url: str

    def payload(self) -> dict[str, object]:
        host, port = split_host_port(self.address, default_port=3389)
        return {
            "action": self.verb.value,
            "server": self.address,
            "host": host,
            "port": port,
            "pool": self.pool,
        }


def hooks_for(settings: BrokerSettings) -> HookClient | None:
    """The hook client, or None when RDBROKER_POWER_HOOK_SECRET is not set (hooks are never called
    unsigned)."""
    secret = settings.power_hook_secret.get_secret_value()
    if not secret:
        return None
    return HookClient(secret, timeout_s=settings.power_hook_timeout_s, retry_s=settings.power_hook_retry_s)


class PowerService:
    def __init__(self, broker: BrokerService, hooks: HookClient | None) -> None:
        self.broker = broker
        self.hooks = hooks
        self._in_flight: set[str] = set()  # addresses whose hook this broker is calling now
        self._refusal_logged = False
        self._entries: list[d.AuditEntry] = []  # audit lines to write once their transaction commits

    async def check(self) -> None:
        """Refuse to run when pools declare hooks and there is no secret to sign them with."""

        async def pools(r: Repos) -> list[str]:
            return [p.pool for p in await PowerRepository(r.conn).all()]

        declared = await self.broker.run_tx(pools)
        if declared and self.hooks is None:
            raise PowerConfigError(_no_secret(declared))

    # --- one round -----------------------------------------------------------------------------

    async def tick(self) -> list[PowerAction]:
        """Observe and decide for every pool with hooks; answers the hook calls claimed (not made)."""

        async def pools(r: Repos) -> list[str]:
            return [p.pool for p in await PowerRepository(r.conn).all()]

        names = await self.broker.run_tx(pools)
        if names and self.hooks is None and not self._refusal_logged:
            self._refusal_logged = True
            log.error("%s; power states are kept, no hook is called", _no_secret(names))
        actions: list[PowerAction] = []
        for name in names:

            async def decide(r: Repos, pool: str = name) -> list[PowerAction]:
                return await self._decide(r, pool)

            actions += await self.broker.run_tx(decide)
            for item in self._entries:
                audit.write_log(item)
            self._entries.clear()
        return actions

    async def _decide(self, r: Repos, pool: str) -> list[PowerAction]:
        self._entries.clear()  # a transaction run again decides again
        repo = PowerRepository(r.conn)
        power = await repo.lock(pool)
        if power is None:
            return []  # another broker decides for this pool right now (or its hooks went)
        now = self.broker.now()
        await repo.note_idle(pool, now)
        items = await repo.servers(pool)
        moved = False
        for item in items:
            after = rules.observed(item, now)
            if after is not None and await repo.move(item.address, item.power, after, now):
                moved = True
                log.info(
                    "server %s: power %s -> %s",
                    item.address,
                    item.power.value,
                    after.value,
                    extra={"server": item.address, "pool": pool},
                )
        if moved:
            items = await repo.servers(pool)
        if self.hooks is None:
            return []
        actions = []
        start = rules.to_start(items, power, now)
        if start is not None and start.address not in self._in_flight:
            deadline = now + timedelta(seconds=power.start_timeout_s)
            if await repo.claim_start(start.address, now, deadline):
                actions.append(PowerAction(Verb.START, pool, start.address, power.start_url))
        stop = rules.to_stop(items, power, now)
        if stop is not None and stop.address not in self._in_flight:
            deadline = now + timedelta(seconds=power.stop_timeout_s)
            if await repo.claim_stop(stop.address, now, deadline):
                actions.append(PowerAction(Verb.STOP, pool, stop.address, power.stop_url))
        free = rules.free_capacity(items, now)
        entries = [
            audit.entry(
                f"server.power_{action.verb.value}",
                action.address,
                audit.OK,
                _claimed(action, free, power),
                POWER_CALLER,
            )
            for action in actions
        ]
        await r.audit.add(entries, now)
        self._entries.extend(entries)
        return actions

    async def act(self, action: PowerAction) -> bool:
        """Call the hook a tick claimed; False (and the server put back) when it was not taken."""
        assert self.hooks is not None
        self._in_flight.add(action.address)
        try:
            await self.hooks.call(action.url, action.payload())
        except HookFailed as exc:
            metrics.record_power_hook(action.verb.value, ok=False)
            log.warning(
                "power hook %s %s failed: %s", action.verb.value, action.address, exc,
                extra={"server": action.address, "pool": action.pool},
            )  # fmt: skip
            state = d.PowerState.STARTING if action.verb is Verb.START else d.PowerState.STOPPING
            failed = audit.entry(
                f"server.power_{action.verb.value}", action.address, audit.ERROR, str(exc), POWER_CALLER
            )

            async def give_up(r: Repos) -> bool:
                now = self.broker.now()
                await r.audit.add([failed], now)
                return await PowerRepository(r.conn).give_up(action.address, state, now)

            await self.broker.run_tx(give_up)
            audit.write_log(failed)
            return False
        finally:
            self._in_flight.discard(action.address)
        metrics.record_power_hook(action.verb.value, ok=True)
        return True

    async def run_once(self) -> list[PowerAction]:
        """A tick and its hook calls (tests and tools; the loop does not wait for the calls)."""
        actions = await self.tick()
        await asyncio.gather(*(self.act(a) for a in actions))
        return actions

    # --- the loop ------------------------------------------------------------------------------

    async def run(self, interval_s: float, stop: asyncio.Event) -> None:
        """Tick every `interval_s` (with jitter) until `stop`; hook calls run beside the loop and are
        cancelled at stop (their servers' starts or stops then end at their deadlines)."""
        calls: set[asyncio.Task[None]] = set()
        try:
            async with asyncio.TaskGroup() as group:
                while not stop.is_set():
                    for action in await self._tick_safely():
                        task = group.create_task(self._act_safely(action))
                        calls.add(task)
                        task.add_done_callback(calls.discard)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), interval_s * random.uniform(0.8, 1.2))
                for task in list(calls):
                    task.cancel()
        finally:
            for task in list(calls):
                task.cancel()

    async def _tick_safely(self) -> list[PowerAction]:
        try:
            return await self.tick()
        except DatabaseUnavailable:
            return []  # the database state logs each change
        except BrokerError as exc:
            log.warning("power loop: %s", exc)
        except Exception:
            log.exception("power loop failed")
        return []

    async def _act_safely(self, action: PowerAction) -> None:
        try:
            await self.act(action)
        except BrokerError as exc:
            log.warning("power hook %s %s: %s", action.verb.value, action.address, exc)
        except Exception:
            log.exception("power hook %s %s failed", action.verb.value, action.address)


def _claimed(action: PowerAction, free: int, power: rules.PoolPower) -> str:
    if action.verb is Verb.START:
        return (
            f"power off -> starting: pool {action.pool} has {free} free sessions, fewer than "
            f"{power.min_free_sessions} (start hook called)"
        )
    return (
        f"power on -> stopping, admin_state enabled -> draining: idle for {power.idle_for_s:g} s beyond "
        f"keep_running {power.keep_running} (stop hook called)"
    )


def _no_secret(pools: list[str]) -> str:
    return (
        f"power hooks are declared (pools {', '.join(pools)}) but RDBROKER_POWER_HOOK_SECRET is not set: "
        "set it (the hooks' receivers check the signature made with it) or remove `power:` from the "
        "farm file"
    )
