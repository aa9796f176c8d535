"""Keeping the directory true: proxies' heartbeats, and the sweep that expires sessions, disconnects
the sessions of silent proxies and purges history past its retention."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import datetime, timedelta

from rdbroker_broker.db.history_repository import purge_refusals
from rdbroker_broker.errors import InvalidInput
from rdbroker_broker.service.common import PROXY_ID_CHARS, require
from rdbroker_broker.service.core import Core
from rdbroker_broker.store import Repos

log = logging.getLogger(__name__)

PURGE_EVERY_S = 60.0
PURGE_BATCH = 10_000  # rows of each table per transaction
PURGE_MAX_BATCHES = 100  # per purge: a larger backlog goes on at the next one
# On SQLite a statement holds the event loop (and every proxied connection) for its time, and a
# deleted session costs ~90 µs (its indexes): batches of ~10 ms, the loop free between them.
SQLITE_PURGE_BATCH = 100
SQLITE_EXPIRE_BATCH = 200  # sessions of each state per transaction
SQLITE_PURGE_MAX_BATCHES = 1000
MAX_HEARTBEAT_CONNECTIONS = 30_000  # under SQLite's bound-parameter limit too


class Sweeping:
    def __init__(self, core: Core) -> None:
        self.core = core
        self._purged_at: datetime | None = None

    async def proxy_heartbeat(
        self, proxy_id: str, active_connections: int, connection_ids: Sequence[str] | None = None
    ) -> int:
        """Record the proxy as alive; answers the interval (ms) the broker expects heartbeats at.

        When the heartbeat lists every open connection (the count matches), the proxy's active
        sessions on connections it no longer has become disconnected: their close report was lost.
        """
        require("proxy_id", proxy_id, PROXY_ID_CHARS)
        ids = list(connection_ids or [])
        if len(ids) > MAX_HEARTBEAT_CONNECTIONS:
            raise InvalidInput(f"too many connection_ids (at most {MAX_HEARTBEAT_CONNECTIONS})")
        complete = len(ids) == active_connections

        async def work(r: Repos) -> tuple[int, int]:
            now = self.core.now()
            await r.proxies.heartbeat(proxy_id, active_connections, now)
            # The servers whose counters these updates may change, first and in address order (as
            # report batches take them): several session rows change here, in no particular order.
            await r.sessions.lock_proxy_servers(proxy_id)
            # A listed connection is open: its session, disconnected by a sweep or an earlier list
            # that could not see it, is active again (complete list or not).
            revived = await r.sessions.revive_listed(proxy_id, ids, now) if ids else 0
            lost = 0
            if complete:
                before = now - timedelta(seconds=self.core.settings.heartbeat_interval_s)
                for pool in await r.pools.list():
                    lost += await r.sessions.disconnect_unlisted(pool, proxy_id, ids, before, now)
            return revived, lost

        revived, lost = await self.core.run_tx(work)
        if revived:
            log.info("proxy %s still has %d sessions' connections: active again", proxy_id, revived)
        if lost:
            log.info("proxy %s no longer has %d sessions' connections: disconnected", proxy_id, lost)
        return int(self.core.settings.heartbeat_interval_s * 1000)

    async def _purge_due(self, now: datetime) -> int:
        """History past `retention_s` (audit records past `audit_retention_s`) is deleted at most every
        PURGE_EVERY_S, in transactions of at most PURGE_BATCH rows of each table: finding it reads every
        ended session, and a backlog (a lowered retention) deleted in one transaction would hold its
        locks and WAL for as long."""
        if self._purged_at is not None and (now - self._purged_at).total_seconds() < PURGE_EVERY_S:
            return 0
        self._purged_at = now
        before = now - timedelta(seconds=self.core.settings.retention_s)
        audit_before = now - timedelta(seconds=self.core.settings.audit_retention_s)
        size, batches = (
            (PURGE_BATCH, PURGE_MAX_BATCHES)
            if self.core.store.is_postgres
            else (SQLITE_PURGE_BATCH, SQLITE_PURGE_MAX_BATCHES)
        )
        purged = 0
        for _ in range(batches):

            async def batch(r: Repos) -> int:
                n = await r.sessions.purge_ended(before, size)
                n += await r.audit.purge(audit_before, size)
                return n + await r.connections.purge(before, size)

            done = await self.core.run_tx(batch)
            purged += done
            if done == 0:
                break
            await asyncio.sleep(0)  # the loop's other work between batches

        async def proxies(r: Repos) -> None:
            await r.proxies.purge(before)
            await purge_refusals(r.conn, before)  # a row per minute and reason: few

        await self.core.run_tx(proxies)
        return purged

    async def sweep(self) -> dict[str, int]:
        """Expire sessions, disconnect silent proxies' sessions. Idempotent: every replica may run it.

        A proxy is silent when no heartbeat came for the silence window (`proxy_silence_s`). Only a
        window this broker spent hearing counts: after its start or a database outage it judges
        nobody until its database calls have succeeded for a whole window without interruption, so
        every proxy has had its full number of heartbeats to get through (another replica that heard
        them all along judges meanwhile).
        """

        expired = 0
        if not self.core.store.is_postgres:
            # A statement holds the loop on SQLite: sessions that expire together (a storm's
            # disconnects, one timeout later) end in small batches, the loop free between them.
            while (
                done := await self.core.run_tx(
                    lambda r: r.sessions.expire(self.core.now(), SQLITE_EXPIRE_BATCH)
                )
            ) > 0:
                expired += done
                await asyncio.sleep(0)

        async def work(r: Repos) -> dict[str, int]:
            now = self.core.now()
            ended = expired + (await r.sessions.expire(now) if self.core.store.is_postgres else 0)
            silent_since = now - timedelta(seconds=self.core.settings.proxy_silence_s)
            orphaned = 0
            heard = self.core.heard_since is not None and self.core.heard_since <= silent_since
            if heard:
                alive = r.proxies.alive_since(silent_since)
                for pool in await r.pools.list():
                    orphaned += await r.sessions.disconnect_orphans(pool, alive, silent_since, now)
            return {"expired": ended, "disconnected": orphaned, "judged_silence": int(heard)}

        counts = await self.core.run_tx(work)
        if counts["expired"] or counts["disconnected"]:  # said before a purge that may fail
            log.info(
                "sweep: %(expired)d sessions expired, %(disconnected)d disconnected (silent proxy)", counts
            )
        counts["purged"] = await self._purge_due(self.core.now())
        return counts
