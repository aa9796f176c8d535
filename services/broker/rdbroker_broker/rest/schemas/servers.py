"""Servers: what routing sees of each, and how an operator registers or changes one."""

from __future__ import annotations

import ipaddress
import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from rdbroker_broker import domain as d
from rdbroker_broker.rest.schemas.common import PRINTABLE, AdminStateName
from rdbroker_broker.rest.schemas.drains import DrainOut
from rdbroker_common.settings import join_host_port, split_host_port

HealthName = Literal["unknown", "up", "down"]
PowerName = Literal["on", "starting", "stopping", "off"]
AgentStateName = Literal["none", "up", "drain", "maint", "down"]

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
