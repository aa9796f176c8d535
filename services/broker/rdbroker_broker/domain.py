"""The broker's vocabulary as plain dataclasses, and the pure routing rules (DESIGN §4).

Nothing here touches the database or the network, so every rule is unit-tested on its own.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from rdbroker_broker.errors import InvalidInput
from rdbroker_rdp import decode_routing_token

# These equal the database column sizes (tables.py); a unit test keeps them equal, so a value that
# passes here always fits its column instead of failing in PostgreSQL as INTERNAL.
MAX_USER_CHARS = 256  # sessions.user and sessions.user_key (the casefolded name)
MAX_ADDRESS_CHARS = 255  # servers.address, sessions.client_address
MAX_CONNECTION_ID_CHARS = 128  # sessions.connection_id, connections.connection_id, proxies.proxy_id
MAX_POOL_CHARS = 128
MAX_TOKEN_CHARS = 128
MAX_PRECONNECTION_BLOB_BYTES = 4096
# mstsc truncates the mstshash user name to this many characters.
TRUNCATED_COOKIE_CHARS = 9
# Microsoft's shape, `<u32>.<u16>.<reserved>` (as rdbroker_rdp.token reads it, numbers unbounded):
# a value of this shape that does not decode is out of range, hence malformed.
_MS_TOKEN_SHAPE = re.compile(r"[0-9]+\.[0-9]+\.[0-9]* *")


class AdminState(enum.StrEnum):
    ENABLED = "enabled"
    DRAINING = "draining"  # reconnects only
    MAINTENANCE = "maintenance"  # nothing


class Health(enum.StrEnum):
    UNKNOWN = "unknown"  # no probe result yet: routable
    UP = "up"
    DOWN = "down"


class AgentState(enum.StrEnum):
    NONE = "none"  # no agent, or no answer from it
    UP = "up"
    DRAIN = "drain"
    MAINT = "maint"
    DOWN = "down"


class PowerState(enum.StrEnum):
    """Capacity on demand (power.py): a server that no probe reaches counts as `off`."""

    ON = "on"
    STARTING = "starting"  # its pool's start hook was called; `on` once its probe answers
    STOPPING = "stopping"  # drained and its pool's stop hook called; `off` once no probe reaches it
    OFF = "off"


class SessionState(enum.StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    DISCONNECTED = "disconnected"
    ENDED = "ended"


LIVE_STATES = (SessionState.PENDING, SessionState.ACTIVE, SessionState.DISCONNECTED)


class Placement(enum.StrEnum):
    """How a pool places a user who has no session (docs/broker.md, "Placement")."""

    BREADTH = "breadth"  # the least loaded server by weight: spread users out
    DEPTH = "depth"  # the busiest server below its limit: fill it before opening the next


class RouteReason(enum.StrEnum):
    TOKEN = "token"
    RECONNECT = "reconnect"
    NEW = "new"
    NO_IDENTITY = "no_identity"


@dataclass(frozen=True)
class Pool:
    name: str
    is_default: bool = False
    disconnect_timeout_s: float = 8 * 3600.0
    # Probe settings for the pool's servers (farm `probe:`); 0 = the broker's RDBROKER_PROBE_* value.
    probe_interval_ms: int = 0
    probe_timeout_ms: int = 0
    probe_rise: int = 0
    probe_fall: int = 0
    # Account forms: the NetBIOS domain of bare names, and the UPN suffixes that mean it (lower case).
    domain: str = ""
    upn_suffixes: tuple[str, ...] = ()
    # Claims: fewer bytes than this from the server ends a connection's claim at once (`abandoned`);
    # a closed claim the agent has not listed within confirm_timeout_s ends (`unconfirmed`).
    junk_bytes: int = 2048
    confirm_timeout_s: float = 120.0
    sessions_interval_ms: int = 0  # agents' session lists; 0 = the broker's RDBROKER_SESSIONS_INTERVAL_MS
    stale_after_ms: int = 0  # 0 = three probe intervals plus the probe lease
    logon_lag_s: float = 30.0  # how long a placement takes to show in the agent's load figure
    # False: a connection's `Cookie: msts=` routing token is ignored, the connection placed by policy.
    honor_routing_tokens: bool = True
    placement: Placement = Placement.BREADTH


@dataclass(frozen=True)
class Server:
    address: str
    pool: str
    weight: int = 100
    max_sessions: int = 0  # 0 = no limit
    admin_state: AdminState = AdminState.ENABLED
    health: Health = Health.UNKNOWN
    agent_state: AgentState = AgentState.NONE
    load: int = -1  # 0..100 as last reported, -1 if never
    # Placements the last load figure cannot show yet: made after its sample time less the pool's
    # logon lag (recounted at each load report, then one more per placement).
    placements_since_report: int = 0
    live_sessions: int = 0
    # Live sessions holding capacity: pending, active, or disconnected and confirmed by the agent.
    held_sessions: int = 0
    agent_url: str = ""
    sessions_url: str = ""
    health_detail: str = ""
    agent_detail: str = ""  # the last agent probe's outcome: its answer, or why it failed
    health_changed_at: datetime | None = None
    probed_at: datetime | None = None  # the last health result
    fresh_until: datetime | None = None  # when that result stops counting
    power: PowerState = PowerState.ON

    @property
    def effective_admin_state(self) -> AdminState:
        """The operator's state, tightened by what the server's own agent says."""
        if self.admin_state is AdminState.MAINTENANCE or self.agent_state is AgentState.MAINT:
            return AdminState.MAINTENANCE
        if self.admin_state is AdminState.DRAINING or self.agent_state is AgentState.DRAIN:
            return AdminState.DRAINING
        return AdminState.ENABLED

    @property
    def is_down(self) -> bool:
        return self.health is Health.DOWN or self.agent_state is AgentState.DOWN


@dataclass(frozen=True)
class Session:
    session_id: str
    user: str
    pool: str
    server_address: str
    state: SessionState
    created_at: datetime
    updated_at: datetime
    disconnected_at: datetime | None = None
    expires_at: datetime | None = None
    end_reason: str = ""
    confirmed: bool = False  # the server's agent listed the user there; else a claim

    def is_live_at(self, now: datetime) -> bool:
        if self.state not in LIVE_STATES:
            return False
        return self.expires_at is None or self.expires_at > now


@dataclass(frozen=True)
class RouteRequest:
    connection_id: str
    proxy_id: str = ""
    pool: str = ""
    cookie: str = ""
    routing_token: str = ""
    preconnection_blob: bytes = b""
    client_address: str = ""
    preconnection_id: int = 0
    attempt: int = 0
    failed_server_address: str = ""


@dataclass(frozen=True)
class RouteDecision:
    server_address: str
    session_id: str
    reason: RouteReason
    user: str
    pool: str


@dataclass(frozen=True)
class ProbeTarget:
    """A server a health replica probes, with the settings that apply (its pool's, else the broker's)."""

    address: str
    pool: str
    agent_url: str
    sessions_url: str
    health: Health
    interval_ms: int
    timeout_ms: int
    rise: int
    fall: int
    sessions_interval_ms: int = 0


@dataclass(frozen=True)
class ProbeResult:
    address: str
    health: Health
    rdp_ok: bool
    rdp_detail: str
    load: int
    agent_state: AgentState
    agent_detail: str
    probed_at: datetime | None = None


@dataclass(frozen=True)
class ReportedSession:
    user: str
    state: SessionState


@dataclass(frozen=True)
class ReconcileCounts:
    ended: int = 0  # every session ended, the unconfirmed ones included
    recorded: int = 0
    linked: int = 0
    ambiguous: int = 0
    unconfirmed: int = 0  # claims ended `unconfirmed`: closed, and not listed within confirm_timeout_s


@dataclass
class FarmPlan:
    """What `rdbroker apply` will change: lines for the operator, in order."""

    changes: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class AuditEntry:
    """One operator change, or attempt at one (audit.py): who, from where, what, on what, how it ended."""

    action: str  # "server.drain", "pool.update", ...
    target: str  # the server's address, the pool's name, the session's id
    actor: str  # callers.Caller.actor: "token:admin", a certificate's SPIFFE ID, "apply:alice@host", ...
    client: str  # the caller's address, "" when local
    outcome: str  # audit.OK, audit.UNCHANGED, or why it was refused or failed
    detail: str = ""
    at: datetime | None = None
    id: int = 0  # the row's id once stored (0: not stored)


# --- identities --------------------------------------------------------------------------------


def user_key(user: str) -> str:
    """Users compare case-insensitively (Windows account names do)."""
    return user.casefold()


def _check_text(name: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise InvalidInput(f"{name} is too long ({len(value)} characters, at most {limit})")
    if any(ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 for ch in value):
        raise InvalidInput(f"{name} contains control characters")


def identity_from(request: RouteRequest, max_cookie_chars: int) -> str:
    """The user name a connection is keyed on, or "" when the client sent none.

    The cookie wins; the preconnection blob (Hyper-V/VDI console clients) is the fallback.
    mstsc may pad the truncated name with spaces, so surrounding spaces are dropped.
    """
    _check_text("cookie", request.cookie, max_cookie_chars)
    cookie = request.cookie.strip()
    if cookie:
        return _fits_user_key("cookie", cookie)
    if not request.preconnection_blob:
        return ""
    if len(request.preconnection_blob) > MAX_PRECONNECTION_BLOB_BYTES:
        raise InvalidInput(f"preconnection_blob is too long (at most {MAX_PRECONNECTION_BLOB_BYTES} bytes)")
    try:
        blob = request.preconnection_blob.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput("preconnection_blob is not UTF-8") from exc
    blob = blob.rstrip("\x00").strip()
    _check_text("preconnection_blob", blob, max_cookie_chars)
    return _fits_user_key("preconnection_blob", blob)


def _fits_user_key(name: str, user: str) -> str:
    """casefold() may lengthen a name (`ß` -> `ss`): the key must still fit its column."""
    key_chars = len(user_key(user))
    if key_chars > MAX_USER_CHARS:
        raise InvalidInput(
            f"{name} is too long once case-folded ({key_chars} characters, at most {MAX_USER_CHARS})"
        )
    return user


def validate_route_request(request: RouteRequest) -> None:
    """Every field but the identity (see `identity_from`); raises InvalidInput naming the field."""
    if not request.connection_id:
        raise InvalidInput("connection_id is required")
    _check_text("connection_id", request.connection_id, MAX_CONNECTION_ID_CHARS)
    _check_text("proxy_id", request.proxy_id, MAX_CONNECTION_ID_CHARS)
    _check_text("pool", request.pool, MAX_POOL_CHARS)
    _check_text("routing_token", request.routing_token, MAX_TOKEN_CHARS)
    _check_text("client_address", request.client_address, MAX_ADDRESS_CHARS)
    _check_text("failed_server_address", request.failed_server_address, MAX_ADDRESS_CHARS)
    if request.attempt > 100:
        raise InvalidInput("attempt is out of range (at most 100)")


# --- routing tokens ----------------------------------------------------------------------------


def routing_token_address(token: str) -> str | None:
    """The `host:port` a routing token names; None for no token or an opaque one (DESIGN §3).

    Decoding is rdbroker_rdp's, the same the proxy uses. Only a value of Microsoft's shape whose
    numbers are out of range (a zero or over-large address or port) is malformed: InvalidInput.
    Any other value after `msts=` is another product's and is placed by cookie and policy instead.
    """
    text = token.strip()
    if not text:
        return None
    decoded = decode_routing_token(text)
    if decoded is not None:
        return f"{decoded[0]}:{decoded[1]}"
    if _MS_TOKEN_SHAPE.fullmatch(text):
        raise InvalidInput(
            f"malformed routing token {text[:40]!r}: "
            "address must be a u32 in 1..4294967295 and port a u16 in 1..65535"
        )
    return None


# --- health results that age --------------------------------------------------------------------


def result_is_stale(server: Server, now: datetime) -> bool:
    """The last health result is too old to count (no health replica has reported since)."""
    return server.fresh_until is not None and server.fresh_until <= now


def as_seen_at(server: Server, now: datetime) -> Server:
    """The server as routing sees it at `now`: a stale result reads as no result (health unknown,
    no agent state or load), as for a server never probed."""
    if not result_is_stale(server, now):
        return server
    return replace(server, health=Health.UNKNOWN, agent_state=AgentState.NONE, load=-1)


def stale_after(pool: Pool | None, probe_interval_ms: int, lease_ms: int) -> timedelta:
    """How long a health result of the pool's servers counts: the pool's `stale_after_ms`, else three
    probe intervals (the pool's, else the broker's `probe_interval_ms`) plus the probe lease
    (`lease_ms`): long enough for a replica to miss two rounds, or to die and be replaced."""
    if pool is not None and pool.stale_after_ms > 0:
        return timedelta(milliseconds=pool.stale_after_ms)
    interval = (pool.probe_interval_ms if pool is not None else 0) or probe_interval_ms
    return timedelta(milliseconds=3 * interval + lease_ms)


def logon_lag(pool: Pool | None) -> timedelta:
    """How long a placement may take to show in the agent's load figure (the pool's `logon_lag_s`)."""
    return timedelta(seconds=pool.logon_lag_s if pool is not None else Pool("").logon_lag_s)


# --- claims ------------------------------------------------------------------------------------


def is_junk_claim(
    pool: Pool,
    *,
    learnt_from: str,
    confirmed: bool,
    origin_connection_id: str | None,
    connection_id: str,
    bytes_from_server: int,
) -> bool:
    """A closed connection's claim is junk: a Route made it for this very connection, the server's
    agent never confirmed it, and the server sent fewer than the pool's `junk_bytes` (a port scan,
    another balancer's health check, a client that gave up during negotiation). It holds nothing:
    it ends `abandoned` instead of becoming disconnected."""
    return (
        learnt_from == "route"
        and not confirmed
        and origin_connection_id == connection_id
        and bytes_from_server < pool.junk_bytes
    )


# --- placement ---------------------------------------------------------------------------------


def session_unit(server: Server) -> float:
    """How much load one session adds, in the agent's 0..100 scale when a limit gives it one."""
    return 100.0 / server.max_sessions if server.max_sessions > 0 else 1.0


def effective_load(server: Server) -> float:
    """Last reported load plus the placements that figure cannot show yet, divided by weight.

    Without an agent load (or with a stale one: `as_seen_at`), the sessions holding capacity on the
    server stand in for its load (DESIGN §5): a closed claim the server's agent never confirmed counts
    for nothing. Counting recent placements is what spreads a logon storm: the idle-looking server
    stops looking idle after the first placement, and a load report does not make it look idle again,
    because the placements made since its sample time less the pool's logon lag (users still logging
    on) stay counted (`placements_since_report`).
    """
    unit = session_unit(server)
    if server.load >= 0:
        raw = server.load + server.placements_since_report * unit
    else:
        raw = server.held_sessions * unit
    return raw / max(server.weight, 1)


def takes_new_sessions(server: Server) -> bool:
    """Up and enabled, with weight, below full load and below its limit of sessions holding capacity."""
    if server.is_down or server.effective_admin_state is not AdminState.ENABLED:
        return False
    if server.weight <= 0 or server.load >= 100:
        return False
    return not (server.max_sessions > 0 and server.held_sessions >= server.max_sessions)


def why_no_new_sessions(server: Server) -> str:
    """Why `takes_new_sessions` refuses the server ("" when it takes them)."""
    if takes_new_sessions(server):
        return ""
    if server.is_down:
        return "down"
    if server.effective_admin_state is not AdminState.ENABLED:
        return server.effective_admin_state.value
    if server.weight <= 0:
        return "weight 0"
    if server.load >= 100:
        return "load 100"
    return f"full: {server.held_sessions} of {server.max_sessions} sessions"


def takes_reconnects(server: Server) -> bool:
    """Draining servers still take their own users back; down and maintenance servers do not."""
    return not server.is_down and server.effective_admin_state is not AdminState.MAINTENANCE


def rank_key(server: Server, placement: Placement = Placement.BREADTH) -> tuple[float, int, str]:
    """The order `rank_for_new_session` sorts by, lowest first: effective load, then sessions holding
    capacity, each lowest first for breadth (spread users out) and highest first for depth (fill the
    busiest server up to its limit before the next: idle servers stay idle). Effective load counts
    placements no load report shows yet in both, so a logon storm neither piles onto the server that
    looked idle nor overshoots a full one. The address last, so every replica and the SQL copy agree."""
    if placement is Placement.DEPTH:
        return (-effective_load(server), -server.held_sessions, server.address)
    return (effective_load(server), server.held_sessions, server.address)


def rank_for_new_session(
    servers: Iterable[Server], exclude: Sequence[str] = (), placement: Placement = Placement.BREADTH
) -> list[Server]:
    """Servers that can take a new session, best first by the pool's placement (`rank_key`)."""
    eligible = [s for s in servers if takes_new_sessions(s) and s.address not in exclude]
    return sorted(eligible, key=lambda s: rank_key(s, placement))


def choose_server(
    servers: Iterable[Server], exclude: Sequence[str] = (), placement: Placement = Placement.BREADTH
) -> Server | None:
    ranked = rank_for_new_session(servers, exclude, placement)
    return ranked[0] if ranked else None


def placement_problems(placement: Placement, servers: Iterable[Server]) -> list[str]:
    """Why a pool with this placement cannot hold these servers ([] when it can): depth fills each
    server up to its limit, so every server needs one (`max_sessions`)."""
    if placement is not Placement.DEPTH:
        return []
    unlimited = sorted(s.address for s in servers if s.max_sessions <= 0)
    if not unlimited:
        return []
    shown = ", ".join(unlimited[:5]) + (f" and {len(unlimited) - 5} more" if len(unlimited) > 5 else "")
    return [
        f"depth placement fills each server up to its max_sessions, and {shown} "
        f"{'has' if len(unlimited) == 1 else 'have'} none: set max_sessions on every server of the pool"
    ]


class DrainStep(enum.StrEnum):
    """Where a drain until empty is (drains.py)."""

    STARTING = "starting"  # asked for; no pass yet
    MESSAGING = "messaging"  # active sessions wait for their message (a failed one is tried again)
    WAITING = "waiting"  # every user told; waiting for the sessions to end
    DONE = "done"  # no sessions left: the server is in its `then_state`
    CANCELLED = "cancelled"  # an operator cancelled it, or changed the server's state


DRAIN_RUNNING = (DrainStep.STARTING, DrainStep.MESSAGING, DrainStep.WAITING)


@dataclass(frozen=True)
class Drain:
    """A server's drain until empty and its progress so far."""

    server_address: str
    step: DrainStep
    then_state: AdminState  # MAINTENANCE or DRAINING, once the server holds no sessions
    notify_text: str  # "" = no message
    logoff_after_s: float | None  # None = disconnected sessions are left to expire
    started_at: datetime
    started_by: str
    started_from: str = ""
    updated_at: datetime | None = None
    finished_at: datetime | None = None
    next_at: datetime | None = None
    sessions_left: int = 0
    active: int = 0
    disconnected: int = 0
    messaged: int = 0
    logged_off: int = 0
    errors: int = 0
    last_error: str = ""
    next_logoff_at: datetime | None = None
    detail: str = ""

    @property
    def running(self) -> bool:
        return self.step in DRAIN_RUNNING
