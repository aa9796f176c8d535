"""The login-storm driver: many users logging on through the proxies, holding, closing, coming back.

Each user is one task. A logon is: connect to a proxy, send a real Connection Request
(`Cookie: mstshash=userN`), read the Connection Confirm the server sent through the proxy, ask the
server who it is (`WHO?`, see `tests.support.rdp_host`), hold the connection a while, close. A failed
attempt is retried once by the client, through the other proxy (what a client behind DNS round robin or
a load balancer does), and the user keeps the proxy that answered. A held connection that the far side
cuts is recorded as dropped and the user logs on again at once, through the other proxy. Everything
is bounded: users, attempts per user, and the run's duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from rdbroker_rdp import build_connection_request, parse_connection_confirm

WHO = b"WHO?\n"
# A logon whose set-up (connect to the server's answer) takes longer than this is slow: a fault that
# makes the proxy wait and retry inside its Route deadline shows as latency, not as a failure.
SLOW_S = 1.0


@dataclass
class Attempt:
    """One TCP connection of one user through one proxy."""

    user: str
    proxy: str
    started: float  # time.monotonic()
    ended: float = 0.0
    server: str | None = None  # where it really landed (the server said so), None if it failed
    error: str | None = None
    retry: bool = False  # the client's one retry after a failed attempt
    dropped: bool = False  # reached a server, then cut before the client closed
    confirmed: float | None = None  # when the server's Connection Confirm arrived through the proxy
    answered: float | None = None  # when the server said who it is: the logon is set up

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def confirm_s(self) -> float | None:
        return None if self.confirmed is None else self.confirmed - self.started

    @property
    def setup_s(self) -> float | None:
        return None if self.answered is None else self.answered - self.started


@dataclass
class StormSettings:
    users: int = 24
    hold_s: tuple[float, float] = (0.3, 1.0)
    pause_s: tuple[float, float] = (0.2, 0.6)
    retry_delay_s: float = 0.3
    step_timeout_s: float = 5.0  # connect, Confirm, WHO answer: each bounded
    max_attempts_per_user: int = 400
    seed: int = 7
    # Digits of the user number, zero-padded (0: as is). Names of one length are never a prefix of
    # another, which a possible mstsc cut (user1 of user10) otherwise makes every placement check.
    name_digits: int = 0


def user_name(n: int, digits: int = 0) -> str:
    return f"user{n:0{digits}d}" if digits else f"user{n}"


@dataclass
class LoginStorm:
    proxies: Sequence[str]
    settings: StormSettings = field(default_factory=StormSettings)
    attempts: list[Attempt] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def users(self) -> list[str]:
        return [user_name(n, self.settings.name_digits) for n in range(self.settings.users)]

    def stop(self) -> None:
        self._stop.set()

    async def run(self, duration_s: float) -> None:
        """Run every user until `stop()` or `duration_s`, whichever is first."""
        async with asyncio.TaskGroup() as tg:
            for n, user in enumerate(self.users):
                tg.create_task(self._user_loop(user, n, random.Random(self.settings.seed * 1000 + n)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), duration_s)
            self._stop.set()

    async def logon_all_once(self) -> None:
        """Every user logs on once (with the one retry), concurrently; used to seed the directory."""
        async with asyncio.TaskGroup() as tg:
            for n, user in enumerate(self.users):
                tg.create_task(self._logon(user, n % len(self.proxies), hold_s=0.05))

    async def logon_paced(self, every_s: float, hold_s: float) -> None:
        """Every user logs on once (with the one retry), one user every `every_s`, each holding its
        connection `hold_s`: a logon storm at a steady rate."""
        async with asyncio.TaskGroup() as tg:
            for n, user in enumerate(self.users):
                tg.create_task(self._logon(user, n % len(self.proxies), hold_s=hold_s))
                await asyncio.sleep(every_s)

    async def _user_loop(self, user: str, n: int, rnd: random.Random) -> None:
        proxy_index = n % len(self.proxies)
        count = 0
        while not self._stop.is_set() and count < self.settings.max_attempts_per_user:
            count += 1
            final = await self._logon(user, proxy_index, hold_s=rnd.uniform(*self.settings.hold_s))
            # A client keeps using the address that answered last; a cut connection sends it to the other.
            proxy_index = self.proxies.index(final.proxy) + (1 if final.dropped else 0)
            if final.dropped:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), rnd.uniform(*self.settings.pause_s))

    async def _logon(self, user: str, proxy_index: int, hold_s: float) -> Attempt:
        """One logon: an attempt and, if it fails, the client's one retry through the other proxy."""
        first = await self._attempt(user, self.proxies[proxy_index % len(self.proxies)], hold_s, retry=False)
        if first.ok:
            return first
        await asyncio.sleep(self.settings.retry_delay_s)
        return await self._attempt(
            user, self.proxies[(proxy_index + 1) % len(self.proxies)], hold_s, retry=True
        )

    async def _attempt(self, user: str, proxy: str, hold_s: float, *, retry: bool) -> Attempt:
        attempt = Attempt(user=user, proxy=proxy, started=time.monotonic(), retry=retry)
        self.attempts.append(attempt)
        host, _, port = proxy.rpartition(":")
        writer: asyncio.StreamWriter | None = None
        step = "connect"
        try:
            async with asyncio.timeout(self.settings.step_timeout_s):
                reader, writer = await asyncio.open_connection(host, int(port))
            step = "confirm"
            writer.write(build_connection_request(cookie=user))
            async with asyncio.timeout(self.settings.step_timeout_s):
                header = await reader.readexactly(4)
                body = await reader.readexactly(int.from_bytes(header[2:4], "big") - 4)
            if parse_connection_confirm(header + body) is None:
                raise ValueError("incomplete Connection Confirm")
            attempt.confirmed = time.monotonic()
            step = "who"
            writer.write(WHO)
            async with asyncio.timeout(self.settings.step_timeout_s):
                line = await reader.readline()
            if not line.startswith(b"SERVER "):
                raise ValueError(f"unexpected answer {line[:40]!r}")
            attempt.answered = time.monotonic()
            attempt.server = line[len(b"SERVER ") :].strip().decode()
            step = "hold"
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(hold_s):
                    await reader.read(1)  # returns only if the far side closes (or misbehaves)
                attempt.dropped = True
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            if step == "hold":
                attempt.dropped = True
            else:
                attempt.error = f"{step}: {type(exc).__name__} {exc}".strip()
        finally:
            attempt.ended = time.monotonic()
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        return attempt


# Reading the record ------------------------------------------------------------------------------


def failed(attempts: Sequence[Attempt]) -> list[Attempt]:
    return [a for a in attempts if not a.ok]


def failed_after_retry(attempts: Sequence[Attempt]) -> list[Attempt]:
    """Retries that failed too: logons the user could not complete."""
    return [a for a in attempts if a.retry and not a.ok]


def slow(attempts: Sequence[Attempt], fault_at: float, slow_s: float = SLOW_S) -> list[Attempt]:
    """Logons still being set up at the fault or started after it that took longer than `slow_s`."""
    return [
        a
        for a in attempts
        if a.answered is not None and a.answered >= fault_at and a.answered - a.started > slow_s
    ]


def recovery_s(attempts: Sequence[Attempt], fault_at: float, slow_s: float = SLOW_S) -> float:
    """Time from the fault to full service: the end of the last failed or dropped attempt, or the
    set-up of the last slow one (see `slow`), whichever is later; 0 if the fault went unnoticed."""
    bad = [a.ended for a in attempts if (not a.ok or a.dropped) and a.ended >= fault_at]
    bad += [a.answered for a in slow(attempts, fault_at, slow_s) if a.answered is not None]
    return max(bad) - fault_at if bad else 0.0


def setup_figures(attempts: Sequence[Attempt], start: float, end: float = math.inf) -> dict[str, float]:
    """Set-up time (start to the server's answer) of the logons started in [start, end), in seconds:
    count, median, p99 (nearest rank) and max; failed attempts have none and are counted elsewhere."""
    times = sorted(a.setup_s for a in attempts if a.setup_s is not None and start <= a.started < end)
    if not times:
        return {"n": 0}
    p99 = times[max(0, math.ceil(0.99 * len(times)) - 1)]
    return {
        "n": len(times),
        "p50": round(statistics.median(times), 3),
        "p99": round(p99, 3),
        "max": round(times[-1], 3),
    }


def wrong_server(
    attempts: Sequence[Attempt], homes: dict[str, str], dead: frozenset[str] = frozenset()
) -> list[Attempt]:
    """Attempts that landed somewhere other than the user's session server, while that server lived.

    `homes` is where each user's session was before (it is updated as users whose server died are
    placed elsewhere: their new server is their home from then on).
    """
    home = dict(homes)
    wrong: list[Attempt] = []
    for a in sorted((a for a in attempts if a.server is not None), key=lambda a: a.started):
        assert a.server is not None
        expected = home.get(a.user)
        if expected is None or expected in dead:
            home[a.user] = a.server
        elif a.server != expected:
            wrong.append(a)
    return wrong


def first_servers(attempts: Sequence[Attempt]) -> dict[str, str]:
    """Where each user first landed."""
    out: dict[str, str] = {}
    for a in sorted(attempts, key=lambda a: a.started):
        if a.server is not None:
            out.setdefault(a.user, a.server)
    return out


def summary(attempts: Sequence[Attempt], fault_at: float | None = None) -> str:
    landed = sum(1 for a in attempts if a.server is not None)
    text = (
        f"attempts={len(attempts)} landed={landed} failed={len(failed(attempts))} "
        f"failed_after_retry={len(failed_after_retry(attempts))} dropped={sum(a.dropped for a in attempts)}"
    )
    if fault_at is not None:
        text += f" slow={len(slow(attempts, fault_at))} recovery_s={recovery_s(attempts, fault_at):.2f}"
    return text
