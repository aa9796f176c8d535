"""Use cases for health replicas: probe leases, probe results and session-list reconciliation.

Reconciliation (ReportServerSessions): a server's agent is the truth for that server. For one list,
taken at `listed_at`, and every live directory session on the server (proxy-made ones included):
- a directory user and a reported user are the same account by the pool's account rules (`accounts`,
  docs/accounts.md): Windows' quser and xrdp report "alice" for the cookie "CORP\\alice";
- a listed user's session is confirmed (it then holds capacity while disconnected) and takes the listed
  state (disconnected: the pool's disconnect timeout; active: no expiry), unless it changed after
  `listed_at` (a proxy event the list could not show, e.g. a reconnect), or the list omits disconnected
  sessions (psutil: its "active" cannot be told from disconnected, so a disconnected session stays so),
  or it calls disconnected a session whose proxy connection is open and opened less than the pool's
  `logon_lag_s` before `listed_at` (the server attaches the desktop only after TLS and the logon);
- a session the list lacks is ended `logged_off`, except: a claim (unconfirmed) whose connection is
  open (a logon in progress); a session that changed after `listed_at`; a disconnected session when
  the list omits disconnected sessions (absence proves nothing); a claim whose connection closed less
  than the pool's `confirm_timeout_s` before `listed_at`. A claim whose connection closed longer ago
  than that ends `unconfirmed` (counted: `unconfirmed`, `rdbroker_reconcile_ended_total{reason}`);
- a server session for a user the directory has no live session for (in the pool) is recorded,
  confirmed (`learnt_from = agent`);
- a session under a cut name (mstsc's 9 characters) compatible with exactly one reported user is linked
  to that full name (`CORP\\alic` matches `CORP\\alice` and a bare `alice`; it is relabelled `CORP\\alice`)
  and treated as listed;
- a truncated cookie matching several reported users is ambiguous: the session is kept as it is, never
  linked, confirmed or ended by this report, and counted (logged as `ambiguous`, summed in
  `ambiguous_total`).
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
# A list older than this is refused: its replica's clock is wrong, or it waited far too long.
MAX_LIST_AGE = timedelta(hours=1)


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
        """The pool's probe settings where it sets them, else the broker's (RDBROKER_PROBE_*,
        RDBROKER_SESSIONS_INTERVAL_MS)."""
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
            sessions_interval_ms=(pool and pool.sessions_interval_ms) or s.sessions_interval_ms,
        )

    async def report_results(self, replica_id: str, results: Sequence[d.ProbeResult]) -> list[str]:
        """Store results for servers this replica holds a lease on; answer the addresses refused."""
        _require_replica(replica_id)

        async def work(r: Repos) -> list[str]:
            now = self.broker.now()
            rejected = []
            pools: dict[str, d.Pool] | None = None
            # In address order, as a proxy's report batch locks them: two transactions that update
            # several server rows never wait for each other's rows in opposite orders (a deadlock).
            for result in sorted(results, key=lambda result: result.address):
                if await r.leases.holder(result.address) != replica_id:
                    rejected.append(result.address)
                    continue
                server = await r.servers.get(result.address)
                if server is None:
                    continue  # removed since the lease was claimed
                if pools is None:
                    pools = {p.name: p for p in await r.pools.list()}
                pool = pools.get(server.pool)
                stale_after = d.stale_after(pool, self.settings.probe_interval_ms, self.settings.lease_ms)
                await r.servers.record_probe(result, now, stale_after, d.logon_lag(pool))
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
        listed_at: datetime | None = None,
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
        if listed_at is not None and listed_at < self.broker.now() - MAX_LIST_AGE:
            raise InvalidInput(
                f"listed_at {listed_at.isoformat()} is more than {MAX_LIST_AGE} old "
                "(is the health replica's clock right?)"
            )

        async def work(r: Repos) -> d.ReconcileCounts:
            holder = await r.leases.holder(address)
            if holder != replica_id:
                raise PermissionDenied(f"replica {replica_id!r} holds no probe lease on {address}")
            server = await r.servers.get(address)
            if server is None:
                raise NotFound(f"unknown server {address!r}")
            pool = await r.pools.resolve(server.pool) or d.Pool(server.pool)
            now = self.broker.now()
            # A replica clock ahead of ours must not date the list after changes it could not see.
            at = min(listed_at, now) if listed_at is not None else now
            return await self._reconcile(r, server, pool, by_key, omits_disconnected, at)

        counts = await self.broker.run_tx(work)
        self.ambiguous_total += counts.ambiguous
        metrics.record_truncated_ambiguous("reconcile", counts.ambiguous)
        metrics.record_reconcile_ended("logged_off", counts.ended - counts.unconfirmed)
        metrics.record_reconcile_ended("unconfirmed", counts.unconfirmed)
        if counts.ended or counts.recorded or counts.linked or counts.ambiguous:
            log.info(
                "reconciled %s: %d ended (%d unconfirmed), %d recorded, %d linked, %d ambiguous",
                address,
                counts.ended,
                counts.unconfirmed,
                counts.recorded,
                counts.linked,
                counts.ambiguous,
                extra={"server": address, "ambiguous": counts.ambiguous, "unconfirmed": counts.unconfirmed},
            )
        return counts

    async def _reconcile(
        self,
        r: Repos,
        server: d.Server,
        pool: d.Pool,
        reported: dict[str, d.ReportedSession],
        omits_disconnected: bool,
        listed_at: datetime,
    ) -> d.ReconcileCounts:
        now = self.broker.now()
        keep_for = timedelta(seconds=pool.disconnect_timeout_s)
        ended = unconfirmed = linked = ambiguous = 0
        matched: set[str] = set()
        rules = accounts.Rules.of(pool.domain, pool.upn_suffixes)
        forms = {k: accounts.resolve(item.user, rules) for k, item in reported.items()}
        for session, _learnt_from in await r.sessions.live_on_server(server.address):
            if not session.user:
                continue  # no identity: nothing to compare; it expires on its own
            key = d.user_key(session.user)
            account = accounts.resolve(session.user, rules)
            listed: d.ReportedSession | None = None
            label = ""
            same = (
                [key]
                if key in reported
                else [k for k in reported if accounts.same_account(account, forms[k], rules)]
            )
            if len(same) == 1:  # the same account, maybe reported without its domain (quser)
                matched.add(same[0])
                listed = reported[same[0]]
            else:
                matches = {k for k in reported if accounts.compatible(account, forms[k], rules)}
                if len(matches) > 1:
                    ambiguous += 1  # keep the session, link nothing: the cut cannot tell who it is
                    continue
                if len(matches) == 1:
                    listed = reported[next(iter(matches))]
                    matched.add(d.user_key(listed.user))
                    label = accounts.fuller(session.user, listed.user, rules)
            if listed is not None:
                if not session.confirmed:
                    await r.sessions.confirm(session.session_id)
                await self._follow_agent(
                    r, session, listed.state, listed_at, now, keep_for, omits_disconnected, pool
                )
                if label and label != session.user:
                    new_key = accounts.key_of(label, rules)
                    taken = (
                        None
                        if new_key == account.key
                        else await r.sessions.live_for_user(session.pool, new_key)
                    )
                    if taken is None:
                        await r.sessions.relabel(session.session_id, label, now, rules)
                        linked += 1
                continue
            reason = _unlisted_end(session, pool, omits_disconnected, listed_at)
            if reason and await r.sessions.end_unchanged_since(session.session_id, reason, listed_at, now):
                ended += 1
                unconfirmed += reason == "unconfirmed"
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
                confirmed=True,
                rules=rules,
            )
            recorded += session_id is not None
        return d.ReconcileCounts(
            ended=ended, recorded=recorded, linked=linked, ambiguous=ambiguous, unconfirmed=unconfirmed
        )

    async def _follow_agent(
        self,
        r: Repos,
        session: d.Session,
        state: d.SessionState,
        listed_at: datetime,
        now: datetime,
        keep_for: timedelta,
        omits_disconnected: bool,
        pool: d.Pool,
    ) -> None:
        """Every session on the server takes the state its agent listed, proxy-made ones included."""
        if session.state is state or session.updated_at > listed_at:
            return  # nothing to do, or a proxy event newer than the list (a reconnect, a close) wins
        if omits_disconnected and session.state is d.SessionState.DISCONNECTED:
            return  # this list's "active" cannot be told from disconnected
        if state is d.SessionState.DISCONNECTED and await r.connections.logging_on(
            session.session_id, listed_at - timedelta(seconds=pool.logon_lag_s)
        ):
            # The proxy opened the user's connection moments before the list: the server attaches
            # the desktop only once TLS and the logon are done (about a second on xrdp), so until
            # then it lists the session disconnected. Past the pool's logon lag the server's word wins.
            return
        expires_at = now + keep_for if state is d.SessionState.DISCONNECTED else None
        await r.sessions.set_state_from_agent(session.session_id, session.state, state, listed_at, expires_at)


def _unlisted_end(session: d.Session, pool: d.Pool, omits_disconnected: bool, listed_at: datetime) -> str:
    """The end reason of a live session the server's list lacks, or "" to keep it."""
    if session.updated_at > listed_at:
        return ""  # its connection opened or closed after the list was taken
    disconnected = session.state is d.SessionState.DISCONNECTED
    if omits_disconnected and disconnected:
        return ""  # this list cannot show disconnected sessions: absence proves nothing
    if session.confirmed:
        return "logged_off"
    if not disconnected:
        return ""  # a claim whose connection is open: a logon in progress
    closed_at = session.disconnected_at or session.updated_at
    if listed_at - closed_at >= timedelta(seconds=pool.confirm_timeout_s):
        return "unconfirmed"
    return ""  # closed lately: the agent may not have seen the logon yet


def _require_replica(replica_id: str) -> None:
    if not replica_id or len(replica_id) > 128 or any(ord(ch) < 0x20 for ch in replica_id):
        raise InvalidInput("replica_id is required (at most 128 printable characters)")
