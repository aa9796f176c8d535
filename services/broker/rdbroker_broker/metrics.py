"""The broker's metrics (names from docs/contracts.md; the Prometheus exporter adds `_total` to counters).

Instruments are created once at import. Routes are counted in a dict per (reason, outcome) that an
observable counter reports at collection: an SDK counter's `add` costs more than the rest of the
bookkeeping of a Route call. `rdbroker_sessions{state}` is read from a
cache that a background task refreshes (`SessionCounts.refresh_forever`): a scrape never queries the
database, so slow scrapes cannot pile up queries. Every broker replica reports the same directory-wide
counts; aggregate them with max(), not sum().
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from rdbroker_broker.database_state import DatabaseState
from rdbroker_broker.db.tables import sessions

log = logging.getLogger(__name__)
_meter = metrics.get_meter("rdbroker_broker")

# Route latency: sub-millisecond (a cached reconnect) up to the statement timeout.
ROUTE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LIVE_STATES = ("pending", "active", "disconnected")

route_duration = _meter.create_histogram(
    "rdbroker_route_duration_seconds",
    unit="s",
    description="Time the broker spent answering Route, errors included",
    explicit_bucket_boundaries_advisory=list(ROUTE_BUCKETS_S),
)

truncated_cookie_ambiguous = _meter.create_counter(
    "rdbroker_truncated_cookie_ambiguous",
    description="Truncated 9-character cookies matching several users, where=reconcile|route (none linked)",
)

reconcile_ended = _meter.create_counter(
    "rdbroker_reconcile_ended",
    description="Sessions ended by an agent's session list, reason=logged_off|unconfirmed",
)
_RECONCILE_LABELS: Mapping[str, Mapping[str, str]] = {r: {"reason": r} for r in ("logged_off", "unconfirmed")}

failover_probes = _meter.create_counter(
    "rdbroker_failover_probes",
    description="Servers the proxy could not reach, probed by the broker: outcome=down (moved) or up (kept)",
)

claims_abandoned = _meter.create_counter(
    "rdbroker_claims_abandoned",
    description="Claims ended at once because their connection carried fewer than junk_bytes from the server",
)

power_hooks = _meter.create_counter(
    "rdbroker_power_hooks",
    description="Power hook calls, action=start|stop, outcome=ok|failed (docs/power.md)",
)

_route_counts: dict[tuple[str, str], int] = {}
_refused_counts: dict[str, int] = {}
_AMBIGUOUS_LABELS: Mapping[str, Mapping[str, str]] = {w: {"where": w} for w in ("reconcile", "route")}


def record_truncated_ambiguous(where: str, count: int = 1) -> None:
    """Truncated cookies left ambiguous, at session-list reconciliation or at Route."""
    if count:
        truncated_cookie_ambiguous.add(count, _AMBIGUOUS_LABELS[where])


def record_power_hook(action: str, ok: bool) -> None:
    """A power hook call that was taken (`ok`) or not (`failed`, retries spent or refused)."""
    power_hooks.add(1, {"action": action, "outcome": "ok" if ok else "failed"})


def record_reconcile_ended(reason: str, count: int) -> None:
    """Sessions a session list ended: `logged_off` (not listed) or `unconfirmed` (a claim never listed)."""
    if count:
        reconcile_ended.add(count, _RECONCILE_LABELS[reason])


_FAILOVER_LABELS: Mapping[bool, Mapping[str, str]] = {True: {"outcome": "up"}, False: {"outcome": "down"}}


def record_failover_probe(ok: bool) -> None:
    failover_probes.add(1, _FAILOVER_LABELS[ok])


def record_abandoned(count: int = 1) -> None:
    """Junk connections' claims ended `abandoned` (a connection report, either path)."""
    if count:
        claims_abandoned.add(count)


def record_route(reason: str, outcome: str, seconds: float) -> None:
    """One Route call: `outcome` is "ok" or the gRPC status name; `reason` is "none" for errors."""
    key = (reason, outcome)
    _route_counts[key] = _route_counts.get(key, 0) + 1
    route_duration.record(seconds)


def _observe_routes(_options: CallbackOptions) -> Iterable[Observation]:
    # copy() is atomic under the GIL: the exporter's thread never sees the dict change size.
    return [
        Observation(count, {"reason": reason, "outcome": outcome})
        for (reason, outcome), count in _route_counts.copy().items()
    ]


_meter.create_observable_counter(
    "rdbroker_routes",
    callbacks=[_observe_routes],
    description="Route calls by reason (token/reconnect/new/no_identity) and outcome",
)


# What became of a Route's routing token (docs/broker.md, Routing): followed as a placement, as the
# user's reconnect, or for a connection without identity; else why it was not followed.
TOKEN_OUTCOMES = (
    "honoured",
    "reconnect",
    "no_identity",
    "ignored_policy",
    "ignored_disabled",
    "refused_down",
    "refused_maintenance",
    "unknown_server",
)
_token_counts: dict[str, int] = {}


def record_routing_token(outcome: str) -> None:
    """One Route's routing token, by outcome (`TOKEN_OUTCOMES`)."""
    _token_counts[outcome] = _token_counts.get(outcome, 0) + 1


def _observe_tokens(_options: CallbackOptions) -> Iterable[Observation]:
    return [Observation(count, {"outcome": outcome}) for outcome, count in _token_counts.copy().items()]


_meter.create_observable_counter(
    "rdbroker_routing_tokens",
    callbacks=[_observe_tokens],
    description="Routes that carried a routing token, by outcome (" + "/".join(TOKEN_OUTCOMES) + ")",
)


def record_refused(reason: str) -> None:
    """A call refused for overload (admission.py): queue_full, no_time or timed_out."""
    _refused_counts[reason] = _refused_counts.get(reason, 0) + 1


def _observe_refused(_options: CallbackOptions) -> Iterable[Observation]:
    return [Observation(count, {"reason": reason}) for reason, count in _refused_counts.copy().items()]


_meter.create_observable_counter(
    "rdbroker_calls_refused",
    callbacks=[_observe_refused],
    description="Calls refused UNAVAILABLE for overload, by reason (queue_full/no_time/timed_out)",
)


class SessionCounts:
    """Live sessions per state, counted every `interval_s` and served to the gauge from memory."""

    def __init__(self, engine: AsyncEngine, interval_s: float) -> None:
        self.engine = engine
        self.interval_s = interval_s
        self.counts: dict[str, int] | None = None  # None until the first count succeeds

    async def refresh(self) -> None:
        query = (
            select(sessions.c.state, func.count())
            .where(sessions.c.state.in_(LIVE_STATES))
            .group_by(sessions.c.state)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        found = {str(state): int(count) for state, count in rows}
        self.counts = {state: found.get(state, 0) for state in LIVE_STATES}

    async def refresh_forever(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.refresh()
            except Exception as exc:  # the database being away is the readiness probe's business
                log.debug("counting sessions for the metrics failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)

    def observe(self, _options: CallbackOptions) -> Iterable[Observation]:
        counts = self.counts
        if counts is None:
            return []
        return [Observation(count, {"state": state}) for state, count in counts.items()]


_sources: list[SessionCounts] = []


def _observe_sessions(options: CallbackOptions) -> Iterable[Observation]:
    # The newest broker in this process (tests and `rdbroker up` start several one after another).
    return _sources[-1].observe(options) if _sources else []


_meter.create_observable_gauge(
    "rdbroker_sessions", callbacks=[_observe_sessions], description="Live sessions in the directory by state"
)


def publish_sessions(source: SessionCounts) -> None:
    _sources.append(source)


def withdraw_sessions(source: SessionCounts) -> None:
    with contextlib.suppress(ValueError):
        _sources.remove(source)


_databases: list[DatabaseState] = []


def _observe_database(_options: CallbackOptions) -> Iterable[Observation]:
    # The newest broker in this process, as for the sessions gauge.
    return [Observation(int(_databases[-1].up))] if _databases else []


_meter.create_observable_gauge(
    "rdbroker_database_up",
    callbacks=[_observe_database],
    description="1 while this broker reaches its database, 0 from a call that could not until one can",
)


def publish_database(state: DatabaseState) -> None:
    _databases.append(state)


def withdraw_database(state: DatabaseState) -> None:
    with contextlib.suppress(ValueError):
        _databases.remove(state)
