"""Pools: their settings as routing uses them, and an operator's change within the farm file's bounds."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

from rdbroker_broker import domain as d
from rdbroker_broker import pool_settings as ps
from rdbroker_broker.rest.schemas.common import PlacementName


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
