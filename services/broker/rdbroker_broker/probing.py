"""Use cases for health replicas: probe leases, probe results and session-list reconciliation.

Reconciliation rules (ReportServerSessions), for one server's list from its agent:
- a directory user and a reported user are the same account by the pool's account rules (`accounts`,
  docs/accounts.md): Windows' quser and xrdp report "alice" for the cookie "CORP\\alice";
- a live directory session whose user the server no longer reports is ended ("logged_off"), unless it
  is pending or changed within the pending timeout (a logon still in progress), or it is disconnected
  and the list says it omits disconnected sessions (psutil's user list cannot show them);
- a server session for a user the directory has no live session for (in the pool) is recorded;
- a session under a cut name (mstsc's 9 characters) compatible with exactly one reported user is linked
  to that full name (`CORP\\alic` matches `CORP\\alice` and a bare `alice`; it is relabelled `CORP\\alice`);
- a truncated cookie matching several reported users is ambiguous: the session is kept as it is, never
  linked or ended by this report, and counted (logged as `ambiguous`, summed in `ambiguous_total`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta

from rdbroker_broker import accounts, metrics
from rdbroker_broker import domain as d
from rdbroker_broker.errors import InvalidInput, NotFound, PermissionDenied
from rdbroker_broker.service import BrokerService
from rdbroker_broker.store import Repos

log = logging.getLogger(__name__)
MAX_REPORTED_SESSIONS = 10_000


class ProbeService:
    def __init__(self, broker: BrokerService) -> None:
        self.broker = broker
        self.settings = broker.settings
        self.ambiguous_total = 0

    async def claim_targets(self, replica_id: str, lease_ms: int) -> list[d.ProbeTarget]:
        _require_replica(replica_id)
        lease = lease_ms or self.settings.lease_ms
        if not 30 <= lease <= 3_600_000:
            raise InvalidInput("lease_ms is out of range (30..3600000)")

        async def work(r: Repos) -> list[d.ProbeTarget]:
            now = self.broker.now()
            await r.leases.seen(replica_id, lease, now)
            share = await r.leases.fair_share(now)
            held = await r.leases.held(replica_id)
            if len(held) > share:  # a replica joined: give back the excess for it to claim
                await r.leases.release(replica_id, held[share:])
                held = held[:share]
            expires_at = now + timedelta(milliseconds=lease)
            await r.leases.renew(replica_id, expires_at)
            if share > len(held):
                for address in await r.leases.claimable(now, share - len(held)):
                    await r.leases.claim(replica_id, address, now, expires_at)
            mine = set(await r.leases.held(replica_id))
            await r.leases.purge_replicas(now - timedelta(days=1))
            pools = {p.name: p for p in await r.pools.list()}
            return [self._target(s, pools.get(s.pool)) for s in await r.servers.list() if s.address in mine]

        return await self.broker.run_tx(work)

    def _target(self, server: d.Server, pool: d.Pool | None) -> d.ProbeTarget:
        """The pool's probe settings where it sets them, else the broker's (RDBROKER_PROBE_*)."""
        s = self.settings
        return d.ProbeTarget(
            address=server.address,
            pool=server.pool,
            agent_url=server.agent_url,
            sessions_url=server.sessions_url,
            health=server.health,
            interval_ms=(pool and pool.probe_interval_ms) or s.probe_interval_ms,
            timeout_ms=(pool and pool.probe_timeout_ms) or s.probe_timeout_ms,
            rise=(pool and pool.probe_rise) or s.probe_rise,
            fall=(pool and pool.probe_fall) or s.probe_fall,
        )

    async def report_results(self, replica_id: str, results: Sequence[d.ProbeResult]) -> list[str]:
        """Store results for servers this replica holds a lease on; answer the addresses refused."""
        _require_replica(replica_id)

        async def work(r: Repos) -> list[str]:
            now = self.broker.now()
            rejected = []
            for result in results:
                if await r.leases.holder(result.address) != replica_id:
                    rejected.append(result.address)
                    continue
                await r.servers.record_probe(result, now)
            return rejected

        rejected = await self.broker.run_tx(work)
        if rejected:
            log.info("refused %d probe results from %s (no lease)", len(rejected), replica_id)
        return rejected

    async def report_sessions(
        self,
        replica_id: str,
        address: str,
        reported: Sequence[d.ReportedSession],
        omits_disconnected: bool = False,
    ) -> d.ReconcileCounts:
        _require_replica(replica_id)
        if len(reported) > MAX_REPORTED_SESSIONS:
            raise InvalidInput(f"too many sessions reported (at most {MAX_REPORTED_SESSIONS})")
        by_key: dict[str, d.ReportedSession] = {}
        for item in reported:
            name = item.user.strip()
            if not name or len(name) > d.MAX_USER_CHARS or any(ord(ch) < 0x20 for ch in name):
                raise InvalidInput(f"bad reported user name {name[:40]!r}")
            if item.state not in (d.SessionState.ACTIVE, d.SessionState.DISCONNECTED):
                raise InvalidInput(f"reported session state must be active or disconnected, not {item.state}")
            by_key[d.user_key(name)] = d.ReportedSession(name, item.state)

        async def work(r: Repos) -> d.ReconcileCounts:
            holder = await r.leases.holder(address)
            if holder != replica_id:
                raise PermissionDenied(f"replica {replica_id!r} holds no probe lease on {address}")
            server = await r.servers.get(address)
            if server is None:
                raise NotFound(f"unknown server {address!r}")
            pool = await r.pools.resolve(server.pool)
            keep_for = timedelta(
                seconds=pool.disconnect_timeout_s if pool else d.Pool("").disconnect_timeout_s
            )
            return await self._reconcile(r, server, by_key, keep_for, omits_disconnected)

        counts = await self.broker.run_tx(work)
        self.ambiguous_total += counts.ambiguous
        metrics.record_truncated_ambiguous("reconcile", counts.ambiguous)
        if counts.ended or counts.recorded or counts.linked or counts.ambiguous:
            log.info(
                "reconciled %s: %d ended, %d recorded, %d linked, %d ambiguous",
                address,
                counts.ended,
                counts.recorded,
                counts.linked,
                counts.ambiguous,
                extra={"server": address, "ambiguous": counts.ambiguous},
            )
        return counts

    async def _reconcile(
        self,
        r: Repos,
        server: d.Server,
        reported: dict[str, d.ReportedSession],
        keep_for: timedelta,
        omits_disconnected: bool,
    ) -> d.ReconcileCounts:
        now = self.broker.now()
        grace = timedelta(seconds=self.settings.pending_timeout_s)
        ended = linked = ambiguous = 0
        matched: set[str] = set()
        pool = await r.pools.resolve(server.pool) or d.Pool(server.pool)
        rules = accounts.Rules.of(pool.domain, pool.upn_suffixes)
        forms = {k: accounts.resolve(item.user, rules) for k, item in reported.items()}
        for session, learnt_from in await r.sessions.live_on_server(server.address):
            if not session.user:
                continue  # no identity: nothing to compare; it expires on its own
            key = d.user_key(session.user)
            account = accounts.resolve(session.user, rules)
            same = (
                [key]
                if key in reported
                else [k for k in reported if accounts.same_account(account, forms[k], rules)]
            )
            if len(same) == 1:  # the same account, maybe reported without its domain (quser)
                matched.add(same[0])
                if learnt_from == "agent":
                    await self._follow_agent(r, session, reported[same[0]].state, now, keep_for)
                continue
            matches = {k for k in reported if accounts.compatible(account, forms[k], rules)}
            if len(matches) == 1:
                full = reported[next(iter(matches))]
                matched.add(d.user_key(full.user))
                label = accounts.fuller(session.user, full.user, rules)
                new_key = accounts.key_of(label, rules)
                taken = (
                    None if new_key == account.key else await r.sessions.live_for_user(session.pool, new_key)
                )
                if label != session.user and taken is None:
                    await r.sessions.relabel(session.session_id, label, now, rules)
                    linked += 1
                continue
            if len(matches) > 1:
                ambiguous += 1  # keep the session, link nothing: the cookie cannot tell who it is
                continue
            if session.state is d.SessionState.PENDING or now - session.updated_at < grace:
                continue  # a logon in progress may not be on the server's list yet
            if omits_disconnected and session.state is d.SessionState.DISCONNECTED:
                continue  # this list cannot show disconnected sessions: absence proves nothing
            if await r.sessions.end(session.session_id, "logged_off", now):
                ended += 1
        recorded = 0
        for key, item in reported.items():
            if key in matched:
                continue
            expires_at = now + keep_for if item.state is d.SessionState.DISCONNECTED else None
            session_id = await r.sessions.insert(
                pool=server.pool,
                user=item.user,
                server_address=server.address,
                state=item.state,
                now=now,
                expires_at=expires_at,
                learnt_from="agent",
                rules=rules,
            )
            recorded += session_id is not None
        return d.ReconcileCounts(ended=ended, recorded=recorded, linked=linked, ambiguous=ambiguous)

    async def _follow_agent(
        self, r: Repos, session: d.Session, state: d.SessionState, now: datetime, keep_for: timedelta
    ) -> None:
        """Sessions learnt from the agent follow its state (no proxy reports on them)."""
        if session.state is not state:
            expires_at = now + keep_for if state is d.SessionState.DISCONNECTED else None
            await r.sessions.set_state_from_agent(session.session_id, state, now, expires_at)


def _require_replica(replica_id: str) -> None:
    if not replica_id or len(replica_id) > 128 or any(ord(ch) < 0x20 for ch in replica_id):
        raise InvalidInput("replica_id is required (at most 128 printable characters)")
