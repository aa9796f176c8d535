"""Whether the broker's database answers, as its own calls find it: for `/v1/status`, the
`rdbroker_database_up` gauge and one log line per change, never for readiness.

Readiness (`/readyz`) does not follow the database: during a PostgreSQL failover every broker would
leave its Service at once, and each answers again the moment the database is back. The state is fed by
what the broker learns anyway (every transaction's outcome, the sweep's) and, when no call came for a
while, by a ping (`app._watch_database`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from rdbroker_common.redact import redact

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 500


@dataclass(frozen=True)
class Snapshot:
    up: bool
    since: datetime  # when it last changed (or the broker started)
    last_error: str  # the last failure's message (redacted), "" when none yet
    last_error_at: datetime | None


class DatabaseState:
    """Up since start (the broker checked the schema before it listened); down on a call's failure to
    reach the database; up again on the next success. Changes are logged once each."""

    def __init__(self, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._clock = clock
        self.up = True
        self.since = clock()
        self.last_error = ""
        self.last_error_at: datetime | None = None
        self.heard_at = time.monotonic()  # last success, for the idle ping

    def succeeded(self) -> None:
        """A call reached the database. Cheap: it runs after every transaction."""
        self.heard_at = time.monotonic()
        if not self.up:
            now = self._clock()
            log.info(
                "the database answers again (down for %.1f s)",
                (now - self.since).total_seconds(),
                extra={"database": "up"},
            )
            self.up, self.since = True, now

    def failed(self, error: BaseException | str) -> None:
        """A call could not reach the database (after its retry)."""
        now = self._clock()
        self.last_error, self.last_error_at = describe(error), now
        if self.up:
            log.warning("the database does not answer: %s", self.last_error, extra={"database": "down"})
            self.up, self.since = False, now

    def snapshot(self) -> Snapshot:
        return Snapshot(self.up, self.since, self.last_error, self.last_error_at)


def describe(error: BaseException | str) -> str:
    """Our message and, below it, the driver's first line (which names the host and the reason)."""
    if isinstance(error, str):
        return redact(error)[:MAX_ERROR_CHARS]
    parts = [str(error) or type(error).__name__]
    cause = error.__cause__
    while cause is not None:
        inner = getattr(cause, "orig", None) or cause
        line = next((text for text in str(inner).splitlines() if text.strip()), "")
        if line and line not in parts[-1]:
            parts.append(line.strip())
            break
        cause = cause.__cause__
    return redact(": ".join(parts))[:MAX_ERROR_CHARS]
