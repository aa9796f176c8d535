"""The answer to `GET /load`: `drain`, or a whole number 0..100 (100 = full), or 101 (down).

In order:
1. drain (the `drain` flag, or the drain file exists) -> `drain`: no new users, reconnects still go here.
2. a counter failed and `on_counter_error = "down"` -> `101`.
3. `max_sessions` set and reached -> `100`.
4. the weighted average of the counters, each `min(100, max(0, reading / full_scale * 100))`,
   rounded half up. With `on_counter_error = "skip"` a failed counter is left out of the average
   (and logged); when every counter failed the answer is `101`.
The session list is read once per answer and feeds both `sessions` counters and `max_sessions`; when
it fails, `max_sessions` is judged by the same on_counter_error rule. Command counters run side by
side, each under `command_timeout_s`.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import AgentConfig, Counter
from .errors import SourceError
from .sources import Session, Sources, parse_number, parse_sessions

log = logging.getLogger(__name__)

DOWN = "101"
DRAIN = "drain"


@dataclass(frozen=True, slots=True)
class Reading:
    counter: Counter
    value: float | None  # None: the counter failed
    error: str = ""


def compute_load(
    config: AgentConfig, readings: Sequence[Reading], session_count: int | None, drained: bool
) -> str:
    """The pure rule above, from readings already taken."""
    if drained:
        return DRAIN
    failed = [r for r in readings if r.value is None]
    sessions_failed = config.max_sessions is not None and session_count is None
    if (failed or sessions_failed) and config.on_counter_error == "down":
        return DOWN
    if config.max_sessions is not None and session_count is not None and session_count >= config.max_sessions:
        return "100"
    good = [(r.counter, r.value) for r in readings if r.value is not None]
    if not good:
        return DOWN
    total = sum(c.weight * min(100.0, max(0.0, v / c.full_scale * 100.0)) for c, v in good)
    average = total / sum(c.weight for c, _ in good)
    return str(min(100, max(0, math.floor(average + 0.5))))


def is_drained(config: AgentConfig) -> bool:
    return config.drain or (config.drain_file is not None and _exists(config.drain_file))


def _exists(path: Path) -> bool:
    return path.exists()


def omits_disconnected(config: AgentConfig) -> bool:
    """psutil's user list cannot show disconnected sessions; xrdp's desktops and a command (quser) can."""
    return config.sessions.kind == "psutil"


async def read_sessions(config: AgentConfig, sources: Sources) -> list[Session]:
    """The server's sessions from the configured source; SourceError when it fails."""
    if config.sessions.kind == "command":
        return parse_sessions(await sources.run(config.sessions.command, config.command_timeout_s))
    if config.sessions.kind == "xrdp":
        return await sources.xrdp_sessions()
    return await sources.logged_in_sessions()


async def measure_load(config: AgentConfig, sources: Sources) -> str:
    if is_drained(config):
        return DRAIN
    session_count: int | None = None
    session_error = ""
    needs_sessions = config.max_sessions is not None or any(c.kind == "sessions" for c in config.counters)
    if needs_sessions:
        try:
            session_count = len(await read_sessions(config, sources))
        except SourceError as exc:
            session_error = str(exc)
            log.warning("session source failed: %s", exc)
    async with asyncio.TaskGroup() as tg:  # commands run side by side: the answer waits for the slowest
        tasks = [
            tg.create_task(_read(c, config, sources, session_count, session_error)) for c in config.counters
        ]
    readings = [task.result() for task in tasks]
    for r in readings:
        if r.value is None:
            log.warning("counter %s failed (%s): %s", r.counter.name, config.on_counter_error, r.error)
    return compute_load(config, readings, session_count, drained=False)


async def _read(
    counter: Counter, config: AgentConfig, sources: Sources, session_count: int | None, session_error: str
) -> Reading:
    try:
        if counter.kind == "cpu":
            return Reading(counter, await sources.cpu_percent())
        if counter.kind == "memory":
            return Reading(counter, await sources.memory_percent())
        if counter.kind == "sessions":
            if session_count is None:
                return Reading(counter, None, session_error)
            return Reading(counter, float(session_count))
        text = await sources.run(counter.command, config.command_timeout_s)
        return Reading(counter, parse_number(text, counter.name))
    except (SourceError, OSError) as exc:
        return Reading(counter, None, str(exc))
