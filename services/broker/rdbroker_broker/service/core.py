"""What every use case stands on: the store, the settings, the clock, and the transaction runner.

Each use case owns one transaction (`Core.run_tx`) and runs it again when a concurrent replica wins
a race on a unique index: the retry then sees the winner's rows and answers the same.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

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
        for attempt in range(MAX_TX_ATTEMPTS):
            try:
                async with self.store.transaction() as r:
                    result = await work(r)
                self.heard()
                return result
            except Retryable as exc:
                if exc.connectivity and attempt >= 1:
                    self.heard_since = None
                    unavailable = DatabaseUnavailable("the database is unreachable")
                    unavailable.__cause__ = exc
                    self.store.database.failed(unavailable)
                    raise unavailable from exc
                log.debug("transaction lost a race, retrying (%s): %s", attempt + 1, exc)
            except DatabaseUnavailable:
                self.heard_since = None
                raise
        raise Conflict("too many concurrent changes to the same rows; retry the call")
