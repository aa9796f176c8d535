"""Refused Route calls in the directory's history (`route_refusals`, `GET /v1/history`).

A refusal writes nothing when it happens: a farm out of capacity refuses every logon, and a write per
refusal would add to the load that refuses them. Each replica counts them per minute in memory and adds
the counts to the table at its sweep (an upsert per minute and reason); counts whose write fails are
kept for the next sweep. A replica killed loses at most one sweep interval of its counts.

A Route answered `UNAVAILABLE` because a server of the pool is starting (`CapacityStarting`) is no
refusal: the proxy holds the user and asks again.
"""

from __future__ import annotations

import weakref
from datetime import UTC, datetime, timedelta

from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from rdbroker_broker.db.tables import route_refusals
from rdbroker_broker.errors import BrokerError, CapacityStarting
from rdbroker_broker.service import BrokerService
from rdbroker_broker.store import Repos

KEEP_S = 24 * 3600.0  # counts older than the history shows are dropped if they cannot be written
Counts = dict[tuple[datetime, str], int]
_pending: weakref.WeakKeyDictionary[BrokerService, Counts] = weakref.WeakKeyDictionary()


def _minute(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(second=0, microsecond=0)


def count(service: BrokerService, exc: BrokerError, status: str) -> None:
    """One refused Route (`status`: its gRPC status name), counted in this minute."""
    if isinstance(exc, CapacityStarting):
        return
    counts = _pending.setdefault(service, {})
    key = (_minute(service.now()), status.lower()[:32])
    counts[key] = counts.get(key, 0) + 1


def pending(service: BrokerService) -> Counts:
    """The counts not yet written (a copy)."""
    return dict(_pending.get(service, {}))


async def flush(service: BrokerService) -> int:
    """Add the counts to the table in one transaction; on failure keep them (the last KEEP_S) and raise."""
    counts = _pending.pop(service, None)
    if not counts:
        return 0

    async def work(r: Repos) -> None:
        factory = pg_insert if r.conn.dialect.name == "postgresql" else sqlite_insert
        statement = factory(route_refusals)
        statement = statement.on_conflict_do_update(
            index_elements=[route_refusals.c.minute, route_refusals.c.reason],
            set_={"count": route_refusals.c.count + statement.excluded.count},
        )
        rows = [{"minute": m, "reason": reason, "count": n} for (m, reason), n in sorted(counts.items())]
        await r.conn.execute(statement, rows)

    try:
        await service.run_tx(work)
    except BaseException:
        oldest = _minute(service.now()) - timedelta(seconds=KEEP_S)
        kept = _pending.setdefault(service, {})
        for key, n in counts.items():
            if key[0] >= oldest:
                kept[key] = kept.get(key, 0) + n
        raise
    return sum(counts.values())
