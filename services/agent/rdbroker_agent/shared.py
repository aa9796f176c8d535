"""One load computation shared by every request that asks for it at about the same time.

`GET /load` runs the counters (command counters start programs). Many pollers, or anyone who can reach
the port, must not multiply that work: at most one computation runs at a time, requests that arrived
while it ran take its answer, and an answer younger than `ttl_s` is reused.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class SharedResult:
    def __init__(
        self,
        compute: Callable[[], Awaitable[str]],
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_s < 0:
            raise ValueError(f"ttl_s must be >= 0, not {ttl_s}")
        self._compute = compute
        self._ttl_s = ttl_s
        self._clock = clock
        self._lock = asyncio.Lock()
        self._value: str | None = None
        self._at = float("-inf")
        self.computations = 0  # how many times compute ran (for tests and debugging)

    async def get(self) -> str:
        arrived = self._clock()
        # A lock rather than a shared task: a caller that leaves (its client went away) cancels only
        # its own wait, or its own computation, and the next waiter then computes.
        async with self._lock:
            now = self._clock()
            if self._value is not None and (now - self._at < self._ttl_s or self._at >= arrived):
                return self._value
            self.computations += 1
            value = await self._compute()
            self._value, self._at = value, self._clock()
            return value
