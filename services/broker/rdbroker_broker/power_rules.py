"""Capacity on demand, the pure rules (docs/power.md): a pool's power hooks, what the probes say of a
server's power, which server to start or stop. Nothing here touches the database or the network.

Free capacity counts sessions: a server that takes new sessions offers `max_sessions - held_sessions`
(`apply` requires a limit on every server of a pool with a start hook). A server being started counts
for what it will offer, so a start under way is not repeated while it could cover the shortfall.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from rdbroker_broker import domain as d

# What a server without a limit offers (a pool with a start hook has none: `apply` refuses them).
UNLIMITED = 1_000_000
DEFAULT_START_WAIT_S = 20.0
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class PoolPower:
    """A pool's `power:` declaration; an empty URL = no such hook."""

    pool: str
    start_url: str = ""
    min_free_sessions: int = 0
    start_timeout_s: float = DEFAULT_TIMEOUT_S  # a start the probes have not seen succeed is given up
    start_wait_s: float = DEFAULT_START_WAIT_S  # how long a new user waits in the proxy for a start
    stop_url: str = ""
    idle_for_s: float = 0.0
    keep_running: int = 0
    stop_timeout_s: float = DEFAULT_TIMEOUT_S


@dataclass(frozen=True)
class PowerServer:
    """A server as the power loop sees it: the directory's view plus the loop's own bookkeeping."""

    server: d.Server
    changed_at: datetime | None = None
    deadline: datetime | None = None  # of the start or stop under way
    drained: bool = False  # the loop drained it (a stop); starting it again undoes that drain
    idle_since: datetime | None = None

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def power(self) -> d.PowerState:
        return self.server.power


def free_sessions(server: d.Server, now: datetime) -> int:
    """The new sessions the server would take now (0 when it takes none)."""
    if not d.takes_new_sessions(d.as_seen_at(server, now)):
        return 0
    if server.max_sessions <= 0:
        return UNLIMITED
    return max(server.max_sessions - server.held_sessions, 0)


def _room(server: d.Server) -> int:
    """What a server being started will offer once up."""
    if server.max_sessions <= 0 or server.weight <= 0:
        return UNLIMITED if server.weight > 0 else 0
    return max(server.max_sessions - server.held_sessions, 0)


def observed(item: PowerServer, now: datetime) -> d.PowerState | None:
    """The power state the latest probe result implies, or None to keep it.

    A server no probe reaches is off; one that answers after a start (or after coming back on its
    own) is on. A start or stop past its deadline is given up: a start that no probe saw succeed
    leaves the server off, a stop it still answers after leaves it on.
    """
    seen = d.as_seen_at(item.server, now)
    answered_since = (
        seen.health is d.Health.UP
        and seen.probed_at is not None
        and (item.changed_at is None or seen.probed_at > item.changed_at)
    )
    down = seen.health is d.Health.DOWN
    late = item.deadline is not None and item.deadline <= now
    state = item.power
    if state is d.PowerState.ON:
        return d.PowerState.OFF if down else None
    if state is d.PowerState.STARTING:
        if answered_since:
            return d.PowerState.ON
        return d.PowerState.OFF if late else None
    if state is d.PowerState.STOPPING:
        if down and (item.changed_at is None or (seen.probed_at or now) > item.changed_at):
            return d.PowerState.OFF
        return d.PowerState.ON if late else None
    return d.PowerState.ON if answered_since else None  # off


def free_capacity(items: list[PowerServer], now: datetime) -> int:
    """New sessions the pool takes now, plus what the servers being started will offer."""
    free = sum(free_sessions(i.server, now) for i in items if i.power is d.PowerState.ON)
    return free + sum(_room(i.server) for i in items if i.power is d.PowerState.STARTING)


def startable(item: PowerServer) -> bool:
    """Off, and would take sessions once up: enabled (or drained by the loop itself), with weight."""
    s = item.server
    if item.power is not d.PowerState.OFF or s.weight <= 0:
        return False
    return s.admin_state is d.AdminState.ENABLED or (item.drained and s.admin_state is d.AdminState.DRAINING)


def to_start(items: list[PowerServer], power: PoolPower, now: datetime) -> PowerServer | None:
    """The server to start when the pool's free capacity is below `min_free_sessions`: the one whose
    power changed longest ago (a server that just failed to start goes last), then by weight."""
    if not power.start_url or free_capacity(items, now) >= power.min_free_sessions:
        return None
    candidates = [i for i in items if startable(i)]
    if not candidates:
        return None
    oldest = datetime.min.replace(tzinfo=now.tzinfo)
    return min(candidates, key=lambda i: (i.changed_at or oldest, -i.server.weight, i.address))


def to_stop(items: list[PowerServer], power: PoolPower, now: datetime) -> PowerServer | None:
    """An enabled server idle (no live session) for `idle_for_s`, when more than `keep_running` run
    and stopping it keeps the pool's free capacity at `min_free_sessions` (no start/stop flapping);
    the one idle longest."""
    if not power.stop_url:
        return None
    running = [i for i in items if i.power in (d.PowerState.ON, d.PowerState.STARTING)]
    if len(running) <= power.keep_running:
        return None
    idle_before = now - timedelta(seconds=power.idle_for_s)
    idle = [
        i
        for i in running
        if i.power is d.PowerState.ON
        and i.server.live_sessions == 0
        and i.server.admin_state is d.AdminState.ENABLED
        and i.idle_since is not None
        and i.idle_since <= idle_before
    ]
    if power.start_url:
        free = free_capacity(items, now)
        idle = [i for i in idle if free - free_sessions(i.server, now) >= power.min_free_sessions]
    if not idle:
        return None
    return min(idle, key=lambda i: (i.idle_since or now, i.address))


def start_wait(items: list[PowerServer], power: PoolPower | None) -> float:
    """How long a new user nobody can take now should wait for a start (0: refuse them now): a
    server is starting, or the power loop will start one (nothing free is below any minimum)."""
    if power is None or not power.start_url:
        return 0.0
    if any(i.power is d.PowerState.STARTING for i in items) or any(startable(i) for i in items):
        return power.start_wait_s
    return 0.0
