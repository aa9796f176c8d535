"""The dashboard's history and counts (`GET /v1/history`, the servers' `session_states`): read only.

Logons per minute come from the directory's own record of Route answers (`connections`), so every
replica answers the same and the history survives restarts; it reaches back `retention_s` at most.
Refusals come from `route_refusals`, which each replica adds its counts to at its sweep (refusals.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from rdbroker_broker import domain as d
from rdbroker_broker.db.history_repository import HistoryRepository
from rdbroker_broker.errors import InvalidInput
from rdbroker_broker.service import BrokerService
from rdbroker_broker.store import Repos

MAX_HOURS = 24
REASONS = tuple(r.value for r in d.RouteReason)


@dataclass(frozen=True)
class Minute:
    at: datetime  # the minute's start (UTC)
    answers: dict[str, int] = field(default_factory=dict)  # by RouteReason value
    refusals: dict[str, int] = field(default_factory=dict)  # by gRPC status name, lower case

    @property
    def logons(self) -> int:
        return sum(self.answers.values())

    @property
    def refused(self) -> int:
        return sum(self.refusals.values())


@dataclass(frozen=True)
class History:
    since: datetime  # the first minute's start
    until: datetime  # the end of the current minute
    minutes: list[Minute]  # only minutes with something in them, oldest first


def _epoch_minute(moment: datetime) -> int:
    return int(moment.timestamp() // 60)


async def logon_history(service: BrokerService, hours: int) -> History:
    """The last `hours` (1..MAX_HOURS) by minute, the current minute included."""
    if not 1 <= hours <= MAX_HOURS:
        raise InvalidInput(f"hours must be 1..{MAX_HOURS}")
    now = service.now()
    until = datetime.fromtimestamp((_epoch_minute(now) + 1) * 60, UTC)
    since = until - timedelta(hours=hours)

    async def work(r: Repos) -> tuple[list[tuple[int, str, int]], list[tuple[datetime, str, int]]]:
        repository = HistoryRepository(r.conn)
        return await repository.answers_per_minute(since, until), await repository.refusals(since, until)

    answers, refused = await service.run_tx(work)
    by_minute: dict[int, Minute] = {}

    def minute_of(number: int) -> Minute:
        if number not in by_minute:
            by_minute[number] = Minute(datetime.fromtimestamp(number * 60, UTC))
        return by_minute[number]

    for number, reason, count in answers:
        counts = minute_of(number).answers
        counts[reason] = counts.get(reason, 0) + count
    for moment, reason, count in refused:
        minute_of(_epoch_minute(moment)).refusals[reason] = count
    return History(since, until, [by_minute[n] for n in sorted(by_minute)])


async def session_states(service: BrokerService, addresses: Sequence[str] = ()) -> dict[str, dict[str, int]]:
    """Live sessions per server and state, for all servers (one query) or these."""

    async def work(r: Repos) -> dict[str, dict[str, int]]:
        return await HistoryRepository(r.conn).live_states(addresses)

    return await service.run_tx(work)
