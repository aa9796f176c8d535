"""Health results that age: when a server's last result stops counting, and how long a placement
takes to show in its agent's load figure.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

from rdbroker_broker.domain.model import AgentState, Health, Pool, Server


def result_is_stale(server: Server, now: datetime) -> bool:
    """The last health result is too old to count (no health replica has reported since)."""
    return server.fresh_until is not None and server.fresh_until <= now


def as_seen_at(server: Server, now: datetime) -> Server:
    """The server as routing sees it at `now`: a stale result reads as no result (health unknown,
    no agent state or load), as for a server never probed."""
    if not result_is_stale(server, now):
        return server
    return replace(server, health=Health.UNKNOWN, agent_state=AgentState.NONE, load=-1)


def stale_after(pool: Pool | None, probe_interval_ms: int, lease_ms: int) -> timedelta:
    """How long a health result of the pool's servers counts: the pool's `stale_after_ms`, else three
    probe intervals (the pool's, else the broker's `probe_interval_ms`) plus the probe lease
    (`lease_ms`): long enough for a replica to miss two rounds, or to die and be replaced."""
    if pool is not None and pool.stale_after_ms > 0:
        return timedelta(milliseconds=pool.stale_after_ms)
    interval = (pool.probe_interval_ms if pool is not None else 0) or probe_interval_ms
    return timedelta(milliseconds=3 * interval + lease_ms)


def logon_lag(pool: Pool | None) -> timedelta:
    """How long a placement may take to show in the agent's load figure (the pool's `logon_lag_s`)."""
    return timedelta(seconds=pool.logon_lag_s if pool is not None else Pool("").logon_lag_s)
