"""Failover: what a Route does when the proxy could not reach the server of its last answer.

A user placed there afresh goes elsewhere; a session the user has there moves only when the broker's
own RDP probe of the server fails too. Concurrent Routes share one probe of a server.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timedelta

from rdbroker_broker import domain as d
from rdbroker_broker import metrics
from rdbroker_broker.errors import InvalidInput, Unavailable
from rdbroker_broker.service.core import Core
from rdbroker_broker.store import Repos, Retryable
from rdbroker_common.rdp_probe import ProbeResult

log = logging.getLogger(__name__)

# Answers that placed a user afresh: nothing of theirs is on that server yet, so a retry moves them.
PLACED = (d.RouteReason.NEW, d.RouteReason.NO_IDENTITY)
# A server that answered a failover probe this recently is not probed again (the proxy retries a
# Route that was answered Unavailable, up to its deadline).
PROBE_REUSE_S = 1.0


class Failover:
    def __init__(self, core: Core) -> None:
        self.core = core
        self._probing: dict[str, asyncio.Future[ProbeResult | None]] = {}  # address -> the probe under way
        self._answered: dict[str, tuple[float, ProbeResult]] = {}  # address -> when it last answered one

    async def probe_failed_server(self, request: d.RouteRequest) -> ProbeResult | None:
        """Probe the server the proxy could not reach when the answer that named it was where the
        user's session is (a reconnect or a token target) and the directory still sends users there.
        None when no probe is needed; the transaction checks the same again and decides."""
        failed = request.failed_server_address
        try:
            async with self.core.store.autocommit() as r:
                answers = await r.connections.answers(request.connection_id)
                last = _last_answer(answers, request.attempt)
                if request.attempt in answers or last is None or last.server_address != failed:
                    return None  # answered before, or bad input the transaction refuses
                if last.reason in PLACED:
                    return None
                server = await r.servers.get(failed)
        except Retryable:
            return None  # a dead pooled connection: the transaction reads again and says what to do
        if server is None or not d.takes_reconnects(d.as_seen_at(server, self.core.now())):
            return None
        return await self._probe(failed)

    async def _probe(self, address: str) -> ProbeResult:
        """One RDP handshake with `address`; concurrent calls for one address share it (a dead server's
        users all fail over at once, and it needs probing only once)."""
        answered = self._answered.get(address)
        if answered is not None and time.monotonic() - answered[0] < PROBE_REUSE_S:
            return answered[1]  # the proxy retrying its call: the server answered a moment ago
        shared = self._probing.get(address)
        if shared is not None:
            result = await asyncio.shield(shared)
            return result if result is not None else await self._probe(address)
        shared = asyncio.get_running_loop().create_future()
        self._probing[address] = shared
        try:
            result = await self.core.probe_rdp(address, self.core.settings.failover_probe_timeout_ms / 1000)
        except BaseException:
            shared.set_result(None)  # cancelled: whoever waits probes for themselves
            raise
        finally:
            del self._probing[address]
        shared.set_result(result)
        metrics.record_failover_probe(result.ok)
        if result.ok:
            self._answered[address] = (time.monotonic(), result)
        else:
            self._answered.pop(address, None)
        return result

    async def after_failure(
        self,
        r: Repos,
        request: d.RouteRequest,
        answers: dict[int, d.RouteDecision],
        now: datetime,
        probe: ProbeResult | None,
    ) -> list[str]:
        """The proxy could not reach the server of this connection's last answer.

        A user placed there afresh is placed elsewhere. A session the user has there (a reconnect, a
        token target) moves only when the broker's own probe of the server failed too: the server is
        then recorded down, as a health result would, and the session ends `server_down`. A server
        that answers the probe keeps the session (Unavailable: the client tries again).
        """
        failed = request.failed_server_address
        last = _last_answer(answers, request.attempt)
        if last is None or last.server_address != failed:
            if await r.servers.get(failed) is None:
                raise InvalidInput(f"failed_server_address {failed!r} is not a registered server")
            sent_to = f"it was sent to {last.server_address}" if last else "it has no earlier answer"
            raise InvalidInput(
                f"failed_server_address {failed!r} is not where this connection was sent ({sent_to})"
            )
        if last.reason in PLACED:
            # Nothing exists on that server yet: drop the pending session and place elsewhere.
            await r.sessions.end(last.session_id, "connect_failed", now)
            return [failed]
        server = await r.servers.get(failed)
        if server is None:
            await r.sessions.end(last.session_id, "server_removed", now)
            return [failed]
        seen = d.as_seen_at(server, now)
        reason = "server_down" if seen.is_down else "server_maintenance"
        if d.takes_reconnects(seen):
            if probe is None or probe.ok:
                # (No probe: the server was not routable when read before the transaction, and is now.)
                answers_probe = "answers the broker's probe" if probe else "is routable again"
                raise Unavailable(
                    f"server {failed} holds this user's session and {answers_probe}, but the proxy could "
                    "not reach it; not moving the session (the client should retry)"
                )
            await r.servers.record_down(
                failed, f"failover probe: {probe.detail}", now, now + await self._stale_after(r, server.pool)
            )
            log.warning(
                "server %s could not be reached by the proxy nor probed (%s): recorded down",
                failed,
                probe.detail,
                extra={"server": failed, "connection_id": request.connection_id},
            )
            reason = "server_down"
        await r.sessions.end(last.session_id, reason, now)
        return [failed]

    async def _stale_after(self, r: Repos, pool_name: str) -> timedelta:
        """How long a health result of the pool's servers counts (as for the replicas' results)."""
        pool = await r.pools.resolve(pool_name)
        return d.stale_after(pool, self.core.settings.probe_interval_ms, self.core.settings.lease_ms)


def _last_answer(answers: dict[int, d.RouteDecision], attempt: int) -> d.RouteDecision | None:
    """The answer this connection was given last before `attempt`."""
    earlier = [a for a in answers if a < attempt]
    return answers[max(earlier)] if earlier else None
