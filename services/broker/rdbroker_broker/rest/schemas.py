"""The REST API's JSON shapes (docs/api.md): pydantic models, converted from `domain` only here."""

from __future__ import annotations

import ipaddress
import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from rdbroker_broker import domain as d
from rdbroker_common.settings import join_host_port, split_host_port

SessionStateName = Literal["pending", "active", "disconnected", "ended"]
AdminStateName = Literal["enabled", "draining", "maintenance"]
HealthName = Literal["unknown", "up", "down"]
AgentStateName = Literal["none", "up", "drain", "maint", "down"]

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
        )


class UserSessionsOut(BaseModel):
    user: str
    sessions: list[SessionOut]


class SessionPageOut(BaseModel):
    items: list[SessionOut]
    total: int = Field(description="sessions matching the filters, on every page")
    limit: int
    offset: int


class ServerOut(BaseModel):
    address: str
    pool: str
    weight: int
    max_sessions: int = Field(description="0 = no limit")
    admin_state: AdminStateName = Field(description="what operators set")
    effective_admin_state: AdminStateName = Field(description="admin_state tightened by the agent's word")
    health: HealthName
    health_detail: str
    health_changed_at: datetime | None
    agent_state: AgentStateName
    load: int = Field(description="0..100 as last reported by the agent, -1 if never")
    live_sessions: int
    agent_url: str
    sessions_url: str
    routable: bool = Field(description="it would take a new session now")

    @classmethod
    def of(cls, s: d.Server) -> ServerOut:
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
            agent_state=s.agent_state.value,
            load=s.load,
            live_sessions=s.live_sessions,
            agent_url=s.agent_url,
            sessions_url=s.sessions_url,
            routable=d.takes_new_sessions(s),
        )


class ServersOut(BaseModel):
    servers: list[ServerOut]


class PoolOut(BaseModel):
    name: str
    default: bool
    disconnect_timeout_s: float
    servers: int
    live_sessions: int


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
