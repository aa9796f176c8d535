"""The REST API's JSON shapes (docs/api.md): pydantic models, converted from `domain` only here."""

from __future__ import annotations

import ipaddress
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

from rdbroker_broker import domain as d
from rdbroker_broker import pool_settings as ps
from rdbroker_broker.drains import MAX_LOGOFF_AFTER_S
from rdbroker_broker.session_actions import MAX_TEXT as MAX_MESSAGE
from rdbroker_broker.session_actions import ActionResult
from rdbroker_common.settings import join_host_port, split_host_port

SessionStateName = Literal["pending", "active", "disconnected", "ended"]
AdminStateName = Literal["enabled", "draining", "maintenance"]
HealthName = Literal["unknown", "up", "down"]
PowerName = Literal["on", "starting", "stopping", "off"]
AgentStateName = Literal["none", "up", "drain", "maint", "down"]
PlacementName = Literal["breadth", "depth"]

# No control characters in any text we store or look up (PostgreSQL refuses NUL, logs hate the rest).
PRINTABLE = r"^[^\x00-\x1f\x7f]*$"
# `host:port` or `[v6]:port`, for the OpenAPI document; `_address` checks the rest (port range).
ADDRESS = r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?):[0-9]{1,5}$"
HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
URL = r"^(https?://[^\s\x00-\x1f\x7f]+)?$"


def _address(value: str) -> str:
    """`host:port` with an IP literal or a DNS name; answered in the form the farm file stores."""
    try:
        host, port = split_host_port(value)
    except ValueError as exc:
        raise ValueError(f"must be HOST:PORT ({exc})") from None
    if not 1 <= port <= 65535:
        raise ValueError("the port must be 1..65535")
    try:
        host = str(ipaddress.ip_address(host))  # one spelling per address: 2001:DB8:0::1 -> 2001:db8::1
    except ValueError:
        if value.startswith("[") or not HOSTNAME.fullmatch(host):
            raise ValueError("the host must be an IP address or a DNS name") from None
    return join_host_port(host, port)


def _url(value: str) -> str:
    if value and not value.startswith(("http://", "https://")):
        raise ValueError("must be empty or an http:// or https:// URL")
    if any(ch.isspace() for ch in value):
        raise ValueError("must not contain spaces")
    return value


Address = Annotated[
    str,
    StringConstraints(min_length=3, max_length=255, pattern=ADDRESS),
    AfterValidator(_address),
    Field(examples=["10.0.0.13:3389"]),
]
PoolName = Annotated[str, StringConstraints(max_length=128, pattern=PRINTABLE), Field(examples=["default"])]
Url = Annotated[
    str,
    StringConstraints(max_length=1024, pattern=URL),
    AfterValidator(_url),
    Field(examples=["http://10.0.0.13:8088/load"]),
]
Weight = Annotated[int, Field(ge=0, le=10_000)]
MaxSessions = Annotated[int, Field(ge=0, le=100_000, description="0 = no limit")]


class SessionOut(BaseModel):
    id: str
    user: str = Field(description='"" when the client sent no user name')
    pool: str
    server_address: str
    state: SessionStateName
    created_at: datetime
    updated_at: datetime
    disconnected_at: datetime | None
    expires_at: datetime | None
    end_reason: str
    confirmed: bool = Field(description="the server's agent listed the user there; false: a claim so far")

    @classmethod
    def of(cls, s: d.Session) -> SessionOut:
        return cls(
            id=s.session_id,
            user=s.user,
            pool=s.pool,
            server_address=s.server_address,
            state=s.state.value,
            created_at=s.created_at,
            updated_at=s.updated_at,
            disconnected_at=s.disconnected_at if s.state is d.SessionState.DISCONNECTED else None,
            expires_at=s.expires_at,
            end_reason=s.end_reason,
            confirmed=s.confirmed,
        )


class MessageIn(BaseModel):
    """A message for the user's session."""

    model_config = ConfigDict(extra="forbid")
    text: str = Field(
        min_length=1, max_length=MAX_MESSAGE, pattern=PRINTABLE, examples=["The server restarts at 18:00."]
    )


class SessionActionOut(BaseModel):
    """What the session's server's agent did, and the session as the directory holds it afterwards."""

    action: Literal["logoff", "disconnect", "message"]
    server_address: str
    server_user: str = Field(description="the user as the server knows them")
    server_sessions: list[str] = Field(description="the server's ids of the sessions acted on")
    detail: str = Field(description="the agent's account of what it did")
    session: SessionOut

    @classmethod
    def of(cls, done: ActionResult) -> SessionActionOut:
        return cls(
            action=done.action,
            server_address=done.server,
            server_user=done.agent.user,
            server_sessions=list(done.agent.sessions),
            detail=done.agent.detail,
            session=SessionOut.of(done.session),
        )


class UserSessionsOut(BaseModel):
    user: str
    sessions: list[SessionOut]


class SessionPageOut(BaseModel):
    items: list[SessionOut]
    total: int = Field(description="sessions matching the filters, on every page")
    limit: int
    offset: int


class DrainIn(BaseModel):
    """A drain until empty: message the users, log off sessions disconnected this long, and move the
    server to `then` once it holds no sessions."""

    model_config = ConfigDict(extra="forbid")
    notify: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_MESSAGE,
        pattern=PRINTABLE,
        description="sent once to each user with an active session (null: no message)",
        examples=["This server restarts at 18:00: please save your work and log off."],
    )
    logoff_disconnected_after_s: float | None = Field(
        default=None,
        ge=0,
        le=MAX_LOGOFF_AFTER_S,
        description="log off sessions disconnected for this long (null: leave them to expire)",
        examples=[1800],
    )
    then: Literal["maintenance", "draining"] = Field(
        default="maintenance", description="the server's state once it holds no sessions"
    )


class DrainOut(BaseModel):
    """A server's latest drain until empty and its progress."""

    server_address: str
    step: Literal["starting", "messaging", "waiting", "done", "cancelled"]
    running: bool
    then: AdminStateName
    notify: str
    logoff_disconnected_after_s: float | None
    started_at: datetime
    started_by: str
    updated_at: datetime | None
    finished_at: datetime | None
    sessions_left: int = Field(description="live sessions on the server at the last pass")
    active: int
    disconnected: int
    messaged: int = Field(description="sessions sent the message")
    logged_off: int = Field(description="disconnected sessions logged off")
    errors: int = Field(description="failed agent actions (each is tried again later)")
    last_error: str
    next_logoff_at: datetime | None = Field(description="when the next disconnected session is due")
    detail: str

    @classmethod
    def of(cls, drain: d.Drain) -> DrainOut:
        return cls(
            server_address=drain.server_address,
            step=drain.step.value,
            running=drain.running,
            then=drain.then_state.value,
            notify=drain.notify_text,
            logoff_disconnected_after_s=drain.logoff_after_s,
            started_at=drain.started_at,
            started_by=drain.started_by,
            updated_at=drain.updated_at,
            finished_at=drain.finished_at,
            sessions_left=drain.sessions_left,
            active=drain.active,
            disconnected=drain.disconnected,
            messaged=drain.messaged,
            logged_off=drain.logged_off,
            errors=drain.errors,
            last_error=drain.last_error,
            next_logoff_at=drain.next_logoff_at,
            detail=drain.detail,
        )


class SessionStatesOut(BaseModel):
    """A server's live sessions by state."""

    pending: int = 0
    active: int = 0
    disconnected: int = 0

    @classmethod
    def of(cls, counts: dict[str, int] | None) -> SessionStatesOut:
        counts = counts or {}
        return cls(**{state.value: counts.get(state.value, 0) for state in d.LIVE_STATES})


class ServerOut(BaseModel):
    address: str
    pool: str
    weight: int
    max_sessions: int = Field(description="0 = no limit")
    admin_state: AdminStateName = Field(description="what operators set")
    effective_admin_state: AdminStateName = Field(description="admin_state tightened by the agent's word")
    health: HealthName = Field(description="`unknown` when never probed or the last result is stale")
    health_detail: str
    health_changed_at: datetime | None
    probed_at: datetime | None = Field(description="the time of the last health result; null if never")
    stale: bool = Field(
        description="the last result is too old to count: health, agent and load read unknown"
    )
    agent_state: AgentStateName
    agent_detail: str = Field(
        description="the last agent probe's outcome: its answer, or why it failed (no answer, "
        "or the agent refused the health replicas' token)"
    )
    load: int = Field(description="0..100 as last reported by the agent, -1 if never (or stale)")
    live_sessions: int
    held_sessions: int = Field(
        description="live sessions holding capacity: pending, active, or disconnected and confirmed"
    )
    agent_url: str
    sessions_url: str
    routable: bool = Field(description="it would take a new session now")
    power: PowerName = Field(
        "on",
        description="capacity on demand (docs/power.md): `off` when no probe reaches it, `starting` "
        "while its pool's start hook works, `stopping` once drained and its stop hook called",
    )
    drain: DrainOut | None = Field(default=None, description="its latest drain until empty, if any")
    session_states: SessionStatesOut = Field(
        default_factory=SessionStatesOut,
        description="its live sessions by state (counted now; `live_sessions` is the directory's counter)",
    )

    @classmethod
    def of(
        cls,
        server: d.Server,
        now: datetime,
        drain: d.Drain | None = None,
        states: dict[str, int] | None = None,
    ) -> ServerOut:
        """The server as routing sees it at `now`: a stale result reads as no result."""
        s = d.as_seen_at(server, now)
        return cls(
            address=s.address,
            pool=s.pool,
            weight=s.weight,
            max_sessions=s.max_sessions,
            admin_state=s.admin_state.value,
            effective_admin_state=s.effective_admin_state.value,
            health=s.health.value,
            health_detail=s.health_detail,
            health_changed_at=s.health_changed_at,
            probed_at=s.probed_at,
            stale=d.result_is_stale(server, now),
            agent_state=s.agent_state.value,
            agent_detail=s.agent_detail,
            load=s.load,
            live_sessions=s.live_sessions,
            held_sessions=s.held_sessions,
            agent_url=s.agent_url,
            sessions_url=s.sessions_url,
            routable=d.takes_new_sessions(s),
            power=s.power.value,
            drain=DrainOut.of(drain) if drain is not None else None,
            session_states=SessionStatesOut.of(states),
        )


class ServersOut(BaseModel):
    servers: list[ServerOut]


class HistoryMinuteOut(BaseModel):
    at: datetime = Field(description="the minute's start (UTC)")
    logons: int = Field(description="first Route answers in the minute: the sum of the four below")
    new: int = Field(description="placed anew by policy")
    reconnect: int = Field(description="sent back to the user's live session")
    token: int = Field(description="sent where a routing token said")
    no_identity: int = Field(description="placed with no user name (no cookie, no token)")
    refused: int = Field(description="Route calls refused (written by each broker at its sweep)")
    refusals: dict[str, int] = Field(
        description="the refused calls by gRPC status, lower case: resource_exhausted (no server can "
        "take the user), not_found, invalid_argument, unavailable, ..."
    )


class HistoryOut(BaseModel):
    hours: int
    since: datetime = Field(description="the first minute's start")
    until: datetime = Field(description="the end of the current minute")
    minutes: list[HistoryMinuteOut] = Field(
        description="oldest first; a minute without any answer or refusal is left out"
    )


def _check(field: str) -> Any:
    """The farm file's bounds for this domain.Pool field (pool_settings.py): a 422 when broken."""
    return AfterValidator(ps.BOUNDS[field].check)


def _about(field: str) -> Any:
    return Field(description=ps.BOUNDS[field].expected().replace("expected ", ""))


DisconnectTimeout = Annotated[float, _check("disconnect_timeout_s"), _about("disconnect_timeout_s")]
ProbeMs = Annotated[int, _check("probe_interval_ms"), _about("probe_interval_ms")]
ProbeTimeoutMs = Annotated[int, _check("probe_timeout_ms"), _about("probe_timeout_ms")]
ProbeCount = Annotated[
    int,
    AfterValidator(ps.check_count),
    Field(description="1 to 100, or 0 for the broker's RDBROKER_PROBE_RISE / RDBROKER_PROBE_FALL"),
]
SessionsIntervalMs = Annotated[int, _check("sessions_interval_ms"), _about("sessions_interval_ms")]
JunkBytes = Annotated[int, _check("junk_bytes"), _about("junk_bytes")]
ConfirmTimeout = Annotated[float, _check("confirm_timeout_s"), _about("confirm_timeout_s")]
StaleAfterMs = Annotated[int, _check("stale_after_ms"), _about("stale_after_ms")]
LogonLag = Annotated[float, _check("logon_lag_s"), _about("logon_lag_s")]
Domain = Annotated[
    str,
    StringConstraints(max_length=64),
    AfterValidator(ps.check_domain),
    Field(description='NetBIOS domain of bare user names, "" for none', examples=["CORP"]),
]
HonorRoutingTokens = Annotated[
    bool,
    BeforeValidator(ps.check_flag),
    Field(description="false: connections' routing tokens are ignored, each placed by policy"),
]
UpnSuffix = Annotated[str, StringConstraints(max_length=253), AfterValidator(ps.check_upn_suffix)]
UpnSuffixes = Annotated[
    list[UpnSuffix],
    Field(max_length=ps.MAX_UPN_SUFFIXES, description="UPN suffixes that mean the pool's domain"),
    AfterValidator(lambda values: list(ps.check_upn_suffixes(values))),
]


class PoolOut(BaseModel):
    name: str
    default: bool
    disconnect_timeout_s: float
    servers: int
    live_sessions: int
    domain: str = Field(description='NetBIOS domain of bare user names; "" for none')
    upn_suffixes: list[str] = Field(description="UPN suffixes that mean that domain (lower case)")
    junk_bytes: int = Field(description="a connection that carried fewer bytes from the server is junk")
    confirm_timeout_s: float = Field(description="how long a closed claim waits for the agent to list it")
    stale_after_ms: int = Field(description="a health result older than this stops counting; 0 = default")
    logon_lag_s: float = Field(description="how long a placement takes to show in an agent's load")
    honor_routing_tokens: bool = Field(
        description="routing tokens are followed where policy allows (false: ignored, placed by policy)"
    )
    probe_interval_ms: int = Field(description="0 = the broker's RDBROKER_PROBE_INTERVAL_MS")
    probe_timeout_ms: int = Field(description="0 = the broker's RDBROKER_PROBE_TIMEOUT_MS")
    probe_rise: int = Field(description="0 = the broker's RDBROKER_PROBE_RISE")
    probe_fall: int = Field(description="0 = the broker's RDBROKER_PROBE_FALL")
    sessions_interval_ms: int = Field(description="how often agents' session lists are read; 0 = default")
    placement: PlacementName = Field(
        description="breadth: the least loaded server by weight; depth: the busiest below its max_sessions"
    )

    @classmethod
    def of(cls, pool: d.Pool, servers: int, live_sessions: int) -> PoolOut:
        return cls(
            name=pool.name,
            default=pool.is_default,
            disconnect_timeout_s=pool.disconnect_timeout_s,
            servers=servers,
            live_sessions=live_sessions,
            domain=pool.domain,
            upn_suffixes=list(pool.upn_suffixes),
            junk_bytes=pool.junk_bytes,
            confirm_timeout_s=pool.confirm_timeout_s,
            stale_after_ms=pool.stale_after_ms,
            logon_lag_s=pool.logon_lag_s,
            honor_routing_tokens=pool.honor_routing_tokens,
            probe_interval_ms=pool.probe_interval_ms,
            probe_timeout_ms=pool.probe_timeout_ms,
            probe_rise=pool.probe_rise,
            probe_fall=pool.probe_fall,
            sessions_interval_ms=pool.sessions_interval_ms,
            placement=pool.placement.value,
        )


class PoolPatch(BaseModel):
    """Change a pool's settings: any subset of these fields, with the farm file's bounds. The next
    `rdbroker apply` of a farm file sets every setting from the file again."""

    model_config = ConfigDict(extra="forbid")

    disconnect_timeout_s: DisconnectTimeout | None = None
    domain: Domain | None = None
    upn_suffixes: UpnSuffixes | None = None
    junk_bytes: JunkBytes | None = None
    confirm_timeout_s: ConfirmTimeout | None = None
    stale_after_ms: StaleAfterMs | None = None
    logon_lag_s: LogonLag | None = None
    honor_routing_tokens: HonorRoutingTokens | None = None
    probe_interval_ms: ProbeMs | None = None
    probe_timeout_ms: ProbeTimeoutMs | None = None
    probe_rise: ProbeCount | None = None
    probe_fall: ProbeCount | None = None
    sessions_interval_ms: SessionsIntervalMs | None = None
    placement: PlacementName | None = Field(
        default=None,
        description="depth needs a max_sessions on every server of the pool (400 otherwise)",
    )

    def changes(self) -> dict[str, object]:
        """The fields given, as domain.Pool values (a null leaves a setting as it is)."""
        fields: dict[str, object] = self.model_dump(exclude_none=True)
        if "upn_suffixes" in fields:
            fields["upn_suffixes"] = tuple(self.upn_suffixes or ())
        if self.placement is not None:
            fields["placement"] = d.Placement(self.placement)
        return fields


class PoolsOut(BaseModel):
    pools: list[PoolOut]


class ServerIn(BaseModel):
    """Register a server. Only `address` is required; `pool` "" means the default pool."""

    model_config = ConfigDict(extra="forbid")

    address: Address
    pool: PoolName = ""
    weight: Weight = 100
    max_sessions: MaxSessions = 0
    agent_url: Url = ""
    sessions_url: Url = ""
    admin_state: AdminStateName = "enabled"


class ServerPatch(BaseModel):
    """Change a server: any subset of these fields."""

    model_config = ConfigDict(extra="forbid")

    weight: Weight | None = None
    max_sessions: MaxSessions | None = None
    agent_url: Url | None = None
    sessions_url: Url | None = None
    admin_state: AdminStateName | None = None


class AuditEntryOut(BaseModel):
    id: int
    at: datetime
    actor: str = Field(
        description="`token:admin`, `open-api`, a certificate's SPIFFE ID, `apply:<user>@<host>`"
    )
    client: str = Field(description='the caller\'s address; "" when local (`rdbroker apply`)')
    action: str = Field(examples=["server.drain"])
    target: str = Field(description="the server's address, the pool's name or the session's id")
    outcome: str = Field(description="`ok`: the change was made (only changes made are stored)")
    detail: str = Field(description="what changed, `weight 100 -> 50`")

    @classmethod
    def of(cls, entry: d.AuditEntry) -> AuditEntryOut:
        assert entry.at is not None  # a stored entry has its time
        return cls(
            id=entry.id,
            at=entry.at,
            actor=entry.actor,
            client=entry.client,
            action=entry.action,
            target=entry.target,
            outcome=entry.outcome,
            detail=entry.detail,
        )


class AuditPageOut(BaseModel):
    items: list[AuditEntryOut] = Field(description="newest first")
    next_before: int | None = Field(
        description="pass as `before` for the next (older) page; null on the last page"
    )


class Problem(BaseModel):
    """An error (RFC 9457, `application/problem+json`)."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str = ""
    instance: str = ""
    errors: list[FieldError] | None = None


class FieldError(BaseModel):
    location: str
    message: str


Problem.model_rebuild()


class DatabaseStatusOut(BaseModel):
    state: Literal["up", "down"] = Field(description="as this broker's calls find it")
    since: datetime = Field(description="when the state last changed (or the broker started)")
    last_error: str | None = Field(description="the last failure to reach the database (no password)")
    last_error_at: datetime | None


class StatusOut(BaseModel):
    """This broker process: what it runs, and whether it reaches its database."""

    version: str = Field(examples=["0.1.0"])
    schema_revision: str | None = Field(description="the schema revision found at start (at head)")
    ready: bool = Field(description="what /readyz answers: false only while shutting down")
    database: DatabaseStatusOut


class AssignmentOut(BaseModel):
    rule: int = Field(description="the matching rule's position in `assignments:` (1 = first); 0 for none")
    match: str = Field(description='what the rule matches, like "user CORP\\\\fin-* and network 10.0.0.0/8"')
    rules: int = Field(description="how many assignment rules there are")
    consulted: bool = Field(
        description="false: the client named a pool (its load-balance info, a collection)"
    )


class CandidateOut(BaseModel):
    address: str
    effective_load: float = Field(description="load (or sessions against the limit) by weight, as ranked")
    load: int = Field(description="0..100 as last reported, -1 if never (or stale)")
    held_sessions: int
    max_sessions: int = Field(description="0 = no limit")
    weight: int


class UnavailableOut(BaseModel):
    address: str
    why: str = Field(description="down, draining, maintenance, weight 0, load 100 or full")


class ExplainOut(BaseModel):
    """What a Route of this user would meet now; nothing was placed or written."""

    user: str
    client: str = Field(description='the client IP address as read; "" for none')
    pool_asked: str = Field(description='the pool the client named (its load-balance info); "" for none')
    assignment: AssignmentOut
    pool: str
    placement: PlacementName
    account_key: str = Field(description="the user's account key in the pool (docs/accounts.md)")
    decision: Literal["reconnect", "new", "none"] = Field(
        description="reconnect to a live session, a new session, or none (no server can take one)"
    )
    server: str = Field(description='where a Route would send the user now; "" for nowhere')
    why: str
    notes: list[str] = Field(description="what else a Route would do or meet on the way")
    session: SessionOut | None = Field(description="the user's live session in the pool")
    candidates: list[CandidateOut] = Field(description="servers taking new sessions, best first (top 5)")
    eligible: int = Field(description="how many servers of the pool take new sessions")
    unavailable: list[UnavailableOut]
