"""What every use case stands on: the store, the settings, the clock, and the transaction runner.

Each use case owns one transaction (`Core.run_tx`) and runs it again when a concurrent replica wins
a race on a unique index: the retry then sees the winner's rows and answers the same.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    RetryError,
    retry_if_exception_type,
    stop_after_attempt,
    wait_none,
)

from rdbroker_broker.config import BrokerSettings
from rdbroker_broker.errors import Conflict, DatabaseUnavailable
from rdbroker_broker.store import Repos, Retryable, Store
from rdbroker_common.rdp_probe import ProbeResult, probe_rdp

RdpProbe = Callable[[str, float], Awaitable[ProbeResult]]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Runs of one transaction that lost races before the call gives up (Conflict). A dead pooled
# connection is tried once more: found again, the database is unavailable.
MAX_TX_ATTEMPTS = 5


def utcnow() -> datetime:
    return datetime.now(UTC)


async def _at_once(_seconds: float) -> None:
    """No pause between runs, not even a yield to the loop: the race's winner has committed."""


def _log_race(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.debug("transaction lost a race, retrying (%s): %s", state.attempt_number, exc)


class Core:
    def __init__(
        self,
        store: Store,
        settings: BrokerSettings,
        clock: Callable[[], datetime] = utcnow,
        probe: RdpProbe = probe_rdp,
    ) -> None:
        self.store = store
        self.settings = settings
        self.now = clock
        self.probe_rdp = probe
        # Since when this broker's database calls have succeeded without interruption (None: not
        # since it started, or since the last failure). The sweep judges a proxy silent only over
        # time inside this span: a proxy cannot be heard while the broker cannot write.
        self.heard_since: datetime | None = None

    def heard(self) -> None:
        """A transaction committed (any path): the span of uninterrupted database calls goes on."""
        if self.heard_since is None:
            self.heard_since = self.now()

    async def run_tx(self, work: Callable[[Repos], Awaitable[T]]) -> T:
        """Run `work` in a transaction, again when it loses a race (it then sees the winner's rows)."""
        retrying = AsyncRetrying(
            stop=stop_after_attempt(MAX_TX_ATTEMPTS),
            wait=wait_none(),
            sleep=_at_once,
            retry=retry_if_exception_type(Retryable),
            before_sleep=_log_race,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    result = await self._tx_once(work, attempt.retry_state.attempt_number)
        except RetryError:
            raise Conflict("too many concurrent changes to the same rows; retry the call") from None
        return result

    async def _tx_once(self, work: Callable[[Repos], Awaitable[T]], attempt: int) -> T:
        try:
            async with self.store.transaction() as r:
                result = await work(r)
        except Retryable as exc:
            if exc.connectivity and attempt > 1:
                self.heard_since = None
                unavailable = DatabaseUnavailable("the database is unreachable")
                unavailable.__cause__ = exc
                self.store.database.failed(unavailable)
                raise unavailable from exc
            raise
        except DatabaseUnavailable:
            self.heard_since = None
            raise
        self.heard()
        return result
