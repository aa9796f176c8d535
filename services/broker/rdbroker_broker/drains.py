"""Drain until empty (docs/broker.md, "Draining a server until it is empty").

`start_drain` sets the server draining (no new sessions; its users still reconnect) and stores the
drain in the database: its message, after how long a disconnected session is logged off, and the state
to end in (`maintenance`, or stay `draining`). Then `Drainer`, on every broker replica, advances it a
pass at a time until the server holds no sessions:

1. each active session is sent the message once, through its server's agent (session_actions.py);
   a user who reconnects later in the drain is sent it when their session becomes active;
2. each session disconnected for `logoff_after_s` (counted from its disconnection) is logged off;
3. with no live session left the server goes to its `then_state` and the drain is done.

Everything a drain knows is in `drains` / `drain_sessions`, so any replica carries it on, including
after a broker restart. One replica advances a drain at a time: it takes the drain's lease with a
conditional UPDATE (db/drain_repository.py) and renews it after each agent call. A failed action is
counted, its error kept, and tried again `drain_retry_s` later; the drain goes on meanwhile.

Every step is audited: `server.drain` (started), `session.message` / `session.logoff` (each action, by
`drain:<who started it>`), `server.drain_done`, `server.drain_cancel`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import socket
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from rdbroker_broker import audit, callers, session_actions
from rdbroker_broker import domain as d
from rdbroker_broker.agents import AgentCaller
from rdbroker_broker.db.drain_repository import DrainRepository
from rdbroker_broker.errors import BrokerError, Conflict, DatabaseUnavailable, InvalidInput, NotFound
from rdbroker_broker.service import BrokerService
from rdbroker_broker.service.changes import Change, audited
from rdbroker_broker.store import Repos

log = logging.getLogger(__name__)

THEN_STATES = {"maintenance": d.AdminState.MAINTENANCE, "draining": d.AdminState.DRAINING}
MAX_LOGOFF_AFTER_S = 30 * 86400.0
DUE_PER_PASS = 100  # drains one replica looks at per pass
Marks = dict[str, tuple[datetime | None, datetime | None]]  # session id -> (messaged at, retry at)


@dataclass(frozen=True)
class DrainRequest:
    notify_text: str  # "" = no message
    logoff_after_s: float | None  # None = disconnected sessions are left to expire
    then_state: d.AdminState


def drain_request(notify: str | None, logoff_after_s: float | None, then: str) -> DrainRequest:
    """The operator's request checked; InvalidInput saying what is wrong."""
    text = ""
    if notify is not None:
        text = session_actions.check_text("message", notify)  # the agents' bound on a message
    if logoff_after_s is not None and not 0 <= logoff_after_s <= MAX_LOGOFF_AFTER_S:
        raise InvalidInput(f"logoff_disconnected_after_s must be 0..{MAX_LOGOFF_AFTER_S:g} seconds")
    if then not in THEN_STATES:
        raise InvalidInput(f"then must be one of {', '.join(THEN_STATES)}, not {then!r}")
    return DrainRequest(text, logoff_after_s, THEN_STATES[then])


def _check_address(address: str) -> None:
    if not address or len(address) > d.MAX_ADDRESS_CHARS or not address.isprintable():
        raise InvalidInput(f"address must be 1..{d.MAX_ADDRESS_CHARS} printable characters")


def _asked(drain: d.Drain) -> str:
    """`until empty: message users, log off disconnected sessions after 1800 s, then maintenance`."""
    parts = ["message users" if drain.notify_text else "no message"]
    if drain.logoff_after_s is None:
        parts.append("disconnected sessions left to expire")
    else:
        parts.append(f"log off sessions disconnected for {drain.logoff_after_s:g} s")
    return f"until empty: {', '.join(parts)}, then {drain.then_state.value}"


async def start_drain(
    service: BrokerService, address: str, notify: str | None, logoff_after_s: float | None, then: str
) -> d.Drain:
    """Set the server draining and start its drain until empty (audited as `server.drain`); 400 for a
    bad request, 404 for an unknown server, 409 while a drain of it is under way."""
    caller = callers.current.get()
    try:
        request = drain_request(notify, logoff_after_s, then)
    except InvalidInput as exc:
        audit.refused("server.drain", address, exc)
        raise

    async def work(r: Repos, change: Change) -> d.Drain:
        _check_address(address)
        server = await r.servers.lock(address)
        if server is None:
            raise NotFound(f"no server is registered at {address}")
        drains = DrainRepository(r.conn)
        old = await drains.get(address)
        if old is not None and old.running:
            raise Conflict(
                f"a drain of {address} is under way (started {old.started_at:%Y-%m-%d %H:%M:%S} UTC by "
                f"{old.started_by}): cancel it first (`rdbroker servers drain {address} --cancel`)"
            )
        now = service.now()
        await r.servers.set_admin_state(address, d.AdminState.DRAINING, now)
        drain = d.Drain(
            server_address=address,
            step=d.DrainStep.STARTING,
            then_state=request.then_state,
            notify_text=request.notify_text,
            logoff_after_s=request.logoff_after_s,
            started_at=now,
            started_by=caller.actor,
            started_from=caller.client,
            updated_at=now,
            next_at=now,
            sessions_left=server.live_sessions,
            detail=f"{_sessions(server.live_sessions)} on the server",
        )
        await drains.start(drain)
        before = f"admin_state {server.admin_state.value} -> draining, "
        text = f"text {request.notify_text!r}" if request.notify_text else ""
        await change.record(r, before + _asked(drain), private=text)
        return drain

    drain = await audited(service, "server.drain", address, work)
    log.info("server %s: drain until empty started (%s)", address, _asked(drain))
    return drain


async def cancel_drain(service: BrokerService, address: str) -> d.Drain:
    """Stop the server's drain (audited as `server.drain_cancel`); the server stays as it is (draining:
    `enable` takes it back). 404 for an unknown server, 409 when no drain of it is under way."""

    async def work(r: Repos, change: Change) -> d.Drain:
        _check_address(address)
        if await r.servers.get(address) is None:
            raise NotFound(f"no server is registered at {address}")
        drains = DrainRepository(r.conn)
        caller = callers.current.get()
        if not await drains.cancel(address, service.now(), f"cancelled by {caller.actor}"):
            raise Conflict(f"no drain of {address} is under way")
        drain = await drains.get(address)
        assert drain is not None
        await change.record(r, f"at {drain.step.value} with {_sessions(drain.sessions_left)} left")
        return drain

    return await audited(service, "server.drain_cancel", address, work)


async def get_drain(service: BrokerService, address: str) -> d.Drain:
    async def work(r: Repos) -> d.Drain:
        if await r.servers.get(address) is None:
            raise NotFound(f"no server is registered at {address}")
        drain = await DrainRepository(r.conn).get(address)
        if drain is None:
            raise NotFound(f"server {address} has not been drained until empty")
        return drain

    return await service.run_tx(work)


async def drain_of(service: BrokerService, address: str) -> d.Drain | None:
    """The server's latest drain, None if it never had one."""

    async def work(r: Repos) -> d.Drain | None:
        return await DrainRepository(r.conn).get(address)

    return await service.run_tx(work)


async def all_drains(service: BrokerService) -> dict[str, d.Drain]:
    """Each server's latest drain, by address."""

    async def work(r: Repos) -> dict[str, d.Drain]:
        return await DrainRepository(r.conn).all()

    return await service.run_tx(work)


def _sessions(n: int) -> str:
    return f"{n} session" if n == 1 else f"{n} sessions"


def _logoff_due(drain: d.Drain, session: d.Session) -> datetime | None:
    if drain.logoff_after_s is None or session.state is not d.SessionState.DISCONNECTED:
        return None
    since = session.disconnected_at or session.updated_at
    return since + timedelta(seconds=drain.logoff_after_s)


class Drainer:
    """Advances the drains that are due, on every replica (`run_forever`, started by app.py); tests
    call `advance_due` with the service's clock in their hand."""

    def __init__(self, service: BrokerService, agents: AgentCaller, owner: str = "") -> None:
        self.service = service
        self.agents = agents
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"[:128]
        self.stopping = asyncio.Event()  # the broker is stopping: no further agent call this pass

    @property
    def _lease(self) -> timedelta:
        return timedelta(seconds=self.service.settings.drain_lease_s)

    async def run_forever(self, stop: asyncio.Event) -> None:
        interval = self.service.settings.drain_interval_s
        self.stopping = stop
        while not stop.is_set():
            try:
                await self.advance_due()
            except DatabaseUnavailable:
                pass  # the database state logs each change
            except BrokerError as exc:
                log.warning("drains: %s", exc)
            except Exception:
                log.exception("drains: a pass failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval * random.uniform(0.8, 1.2))

    async def advance_due(self) -> list[d.Drain]:
        """One pass over the due drains this replica can claim; the drains as each pass left them."""
        now = self.service.now()
        due = await self.service.run_tx(lambda r: DrainRepository(r.conn).due(now, DUE_PER_PASS))
        advanced = []
        for address in due:
            if await self.service.run_tx(functools.partial(self._claim, address)):
                drain = await self._advance(address)
                if drain is not None:
                    advanced.append(drain)
        return advanced

    async def _claim(self, address: str, r: Repos) -> bool:
        now = self.service.now()
        return await DrainRepository(r.conn).claim(address, self.owner, now, now + self._lease)

    async def _advance(self, address: str) -> d.Drain | None:
        async def snapshot(r: Repos) -> tuple[d.Drain | None, d.Server | None, list[d.Session], Marks]:
            drains = DrainRepository(r.conn)
            return (
                await drains.get(address),
                await r.servers.get(address),
                await drains.live_sessions(address),
                await drains.marks(address),
            )

        drain, server, live, marks = await self.service.run_tx(snapshot)
        if drain is None or server is None or not drain.running:
            return drain
        as_caller = callers.Caller(f"drain:{drain.started_by}"[:255], drain.started_from)
        with callers.use_caller(as_caller):
            if server.admin_state is not d.AdminState.DRAINING:
                return await self._stopped(drain, server.admin_state)
            for session in live:
                if self.stopping.is_set():
                    break  # the progress so far is recorded and the lease given back
                action = self._action_for(drain, session, marks.get(session.session_id, (None, None)))
                if action and not await self._act(drain, session, action):
                    return None  # the lease is no longer ours: another replica carries on
            return await self._conclude(drain)

    def _action_for(
        self, drain: d.Drain, session: d.Session, mark: tuple[datetime | None, datetime | None]
    ) -> session_actions.Action | None:
        messaged_at, retry_at = mark
        now = self.service.now()
        if not session.user or (retry_at is not None and retry_at > now):
            return None  # a session with no user name cannot be found on its server by its agent
        if session.state is d.SessionState.ACTIVE and drain.notify_text and messaged_at is None:
            return "message"
        due = _logoff_due(drain, session)
        if due is not None and due <= now:
            return "logoff"
        return None

    async def _act(self, drain: d.Drain, session: d.Session, action: session_actions.Action) -> bool:
        """Carry out one action through the session's agent and record its outcome; False when the
        lease was lost meanwhile."""
        address, sid = drain.server_address, session.session_id
        error = ""
        try:
            await session_actions.act_on_session(self.service, self.agents, sid, action, drain.notify_text)
        except NotFound:
            pass  # purged meanwhile: nothing left to do to it
        except BrokerError as exc:
            error = str(exc)
        except Exception as exc:
            log.exception("drain of %s: %s of session %s failed", address, action, sid)
            error = type(exc).__name__
        now = self.service.now()

        async def record(r: Repos) -> bool:
            drains = DrainRepository(r.conn)
            if not await drains.renew(address, self.owner, now + self._lease):
                return False
            if error:
                after = await r.sessions.get(sid)
                if after is None or after.state not in d.LIVE_STATES:
                    return True  # it ended meanwhile: no error of the drain's
                retry = now + timedelta(seconds=self.service.settings.drain_retry_s)
                await drains.mark(address, sid, retry_at=retry, failures=1)
                who = f" ({session.user})" if session.user else ""
                return await drains.count(address, self.owner, "errors", f"{action} of {sid}{who}: {error}")
            if action == "message":
                await drains.mark(address, sid, messaged_at=now, retry_at=None)
                return await drains.count(address, self.owner, "messaged")
            return await drains.count(address, self.owner, "logged_off")

        if error:
            log.warning(
                "drain of %s: %s of session %s failed (tried again later): %s", address, action, sid, error
            )
        return await self.service.run_tx(record)

    async def _conclude(self, drain: d.Drain) -> d.Drain | None:
        """After a pass: done when no live session is left, else the progress and the next pass."""
        address = drain.server_address

        async def progress(r: Repos) -> d.Drain | None:
            drains = DrainRepository(r.conn)
            now = self.service.now()
            live = await drains.live_sessions(address)
            if not live:
                return None
            marks = await drains.marks(address)
            active = [s for s in live if s.state is d.SessionState.ACTIVE]
            disconnected = [s for s in live if s.state is d.SessionState.DISCONNECTED]
            untold = [s for s in active if s.user and marks.get(s.session_id, (None, None))[0] is None]
            dues = [due for s in disconnected if s.user and (due := _logoff_due(drain, s)) is not None]
            step = d.DrainStep.MESSAGING if drain.notify_text and untold else d.DrainStep.WAITING
            pending = len(live) - len(active) - len(disconnected)
            detail = f"{_sessions(len(live))} left: {len(active)} active, {len(disconnected)} disconnected"
            if pending:
                detail += f", {pending} pending"
            if nameless := sum(1 for s in live if not s.user):
                detail += f" ({nameless} with no user name: no agent can find them; they end by themselves)"
            held = await drains.update_held(
                address,
                self.owner,
                step=step,
                updated_at=now,
                next_at=now + timedelta(seconds=self.service.settings.drain_interval_s),
                release=True,
                sessions_left=len(live),
                active=len(active),
                disconnected=len(disconnected),
                next_logoff_at=min(dues) if dues else None,
                detail=detail,
            )
            return await drains.get(address) if held else None

        async def finish(r: Repos, change: Change) -> d.Drain | None:
            drains = DrainRepository(r.conn)
            now = self.service.now()
            server = await r.servers.lock(address)
            if server is None or await drains.live_sessions(address):
                return None  # removed, or a session came meanwhile: the next pass sees it
            moved = ""
            if drain.then_state is not server.admin_state:
                await r.servers.set_admin_state(address, drain.then_state, now)
                moved = f"admin_state {server.admin_state.value} -> {drain.then_state.value}; "
            if not await drains.update_held(
                address,
                self.owner,
                step=d.DrainStep.DONE,
                finished_at=now,
                updated_at=now,
                release=True,
                sessions_left=0,
                active=0,
                disconnected=0,
                next_logoff_at=None,
                detail=f"no sessions left: {address} is now {drain.then_state.value}",
            ):
                return None
            after = await drains.get(address)
            assert after is not None
            counts = f"messaged {after.messaged}, logged off {after.logged_off}, errors {after.errors}"
            await change.record(r, moved + counts)
            return after

        going_on = await self.service.run_tx(progress)
        if going_on is not None:
            return going_on
        done = await audited(self.service, "server.drain_done", address, finish)
        if done is not None:
            log.info("server %s: drained (%s)", address, done.detail)
        return done

    async def _stopped(self, drain: d.Drain, state: d.AdminState) -> d.Drain | None:
        """An operator set the server's state meanwhile: the drain ends there, cancelled."""
        address = drain.server_address

        async def work(r: Repos, change: Change) -> d.Drain | None:
            drains = DrainRepository(r.conn)
            why = f"the server was set {state.value} meanwhile"
            if not await drains.cancel(address, self.service.now(), why):
                return None
            await change.record(r, why)
            return await drains.get(address)

        return await audited(self.service, "server.drain_cancel", address, work)
