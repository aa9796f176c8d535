"""Rise/fall hysteresis over raw probe outcomes (HAProxy's `rise`/`fall`, counted consecutively).

A server goes DOWN after `fall` failed probes in a row and UP after `rise` good ones in a row. It starts
from the state the broker hands over, so a replica taking over a server keeps its state. UNKNOWN (never
probed) is routable, as HAProxy's servers start up: it needs `fall` failures to go DOWN, and one good
probe confirms it UP. When the broker records a server DOWN on its own (its failover probe, when a
proxy could not reach the server) the replica resumes from there if its own last probe failed too.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Health(enum.Enum):
    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True)
class Transition:
    before: Health
    after: Health


class Hysteresis:
    def __init__(self, state: Health, rise: int, fall: int) -> None:
        if rise < 1 or fall < 1:
            raise ValueError("rise and fall must be at least 1")
        self.state = state
        self.rise = rise
        self.fall = fall
        self._good = 0  # consecutive good probes
        self._bad = 0  # consecutive failed probes

    def observe(self, ok: bool) -> Transition | None:
        """Count one probe outcome; answers the transition it caused, if any."""
        if ok:
            self._good, self._bad = self._good + 1, 0
        else:
            self._good, self._bad = 0, self._bad + 1
        before = self.state
        good_needed = 1 if self.state is Health.UNKNOWN else self.rise
        if self.state is not Health.UP and self._good >= good_needed:
            self.state = Health.UP
        elif self.state is not Health.DOWN and self._bad >= self.fall:
            self.state = Health.DOWN
        return Transition(before, self.state) if self.state is not before else None

    @property
    def last_failed(self) -> bool:
        return self._bad > 0

    def resume(self, state: Health) -> None:
        """Take `state` as the current one (the broker's), keeping the counts of the probes seen."""
        self.state = state
