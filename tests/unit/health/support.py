"""Helpers for the health replica tests: a scripted RDP probe, bounded waits, replicas as tasks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx

from rdbroker_common.bearer import Tokens
from rdbroker_health.config import HealthSettings
from rdbroker_health.probes.rdp import ProbeResult, RdpProbe
from rdbroker_health.rpc.broker_client import BrokerClient
from rdbroker_health.scheduler import Scheduler


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0, step_s: float = 0.02) -> None:
    """Poll `predicate` until it holds; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(step_s)


@dataclass
class ProbeLog:
    """What the scripted probes did: (replica, address, monotonic time) per probe; `down` fail."""

    down: set[str] = field(default_factory=set)
    calls: list[tuple[str, str, float]] = field(default_factory=list)

    def probe_for(self, replica_id: str) -> RdpProbe:
        async def probe(address: str, timeout_s: float) -> ProbeResult:
            self.calls.append((replica_id, address, time.monotonic()))
            if address in self.down:
                return ProbeResult(ok=False, reason="connection refused")
            return ProbeResult(ok=True, kind="neg_rsp", selected_protocol=1)

        return probe

    def by(self, address: str, since: float = 0.0) -> set[str]:
        return {r for r, a, t in self.calls if a == address and t >= since}

    def first_after(self, address: str, since: float, replica_id: str | None = None) -> float | None:
        times = [t for r, a, t in self.calls if a == address and t >= since and replica_id in (None, r)]
        return min(times) if times else None


def fast_settings(broker: str, **overrides: object) -> HealthSettings:
    values: dict[str, object] = {
        "broker": broker,
        "grpc_listen": "127.0.0.1:0",
        "probe_interval_s": 0.2,
        "probe_timeout_s": 0.15,
        "lease_ms": 300,
        "report_batch_s": 0.05,
        "rpc_timeout_s": 0.5,
        "rise": 2,
        "fall": 3,
    }
    values.update(overrides)
    return HealthSettings(**values)  # type: ignore[arg-type]


@asynccontextmanager
async def replica(
    settings: HealthSettings,
    replica_id: str,
    probe: RdpProbe,
    http: httpx.AsyncClient | None = None,
    agent_tokens: Tokens | None = None,
) -> AsyncIterator[tuple[Scheduler, asyncio.Event, asyncio.Task[None]]]:
    """A running Scheduler; set the event to stop it cleanly, or cancel the task to 'kill' it."""
    broker = BrokerClient(settings.broker_addresses, timeout_s=settings.rpc_timeout_s)
    client = http or httpx.AsyncClient()
    scheduler = Scheduler(settings, broker, replica_id, client, probe_rdp=probe, agent_tokens=agent_tokens)
    stop = asyncio.Event()
    try:
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(scheduler.run(stop), name=f"replica {replica_id}")
            try:
                yield scheduler, stop, task
            finally:
                stop.set()
    finally:
        await broker.close()
        await client.aclose()
