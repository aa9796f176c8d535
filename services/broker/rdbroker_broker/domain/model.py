"""The broker's vocabulary as plain dataclasses (pools, servers, sessions, Routes, probe results,
drains), and the size limits of its fields."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

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
