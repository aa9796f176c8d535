"""HealthSettings: flags and `RDBROKER_*` variables of a health replica, built once in `__main__`."""

from __future__ import annotations

import os
import socket
import uuid

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from rdbroker_common.rpc_authz import DEFAULT_TRUST_DOMAIN, check_trust_domain
from rdbroker_common.settings import ServiceSettings, broker_targets, split_host_port

# A command line shows in `ps` to every user of the host: tokens come from the environment (or a file).
ENV_ONLY = ("broker_token", "grpc_admin_token", "agent_token")

# The broker (pool `probe:` in the farm file, else RDBROKER_PROBE_*) decides probe settings.
_DECIDES = "(the broker's farm pool `probe:` settings, else its RDBROKER_PROBE_*, decide)"


class HealthSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RDBROKER_", frozen=True, extra="ignore")

    # Comma-separated `host:port` list of broker replicas, tried in order with failover, or one
    # `dns:///host:port` target balanced round-robin over every address it resolves to.
    broker: str = "127.0.0.1:50051"
    # ProbeServer and grpc.health.v1, under mutual TLS when it is set.
    grpc_listen: str = "127.0.0.1:50052"
    # Plaintext grpc.health.v1 only, for kubelet probes (they send no client certificate); empty = off.
    probe_listen: str = ""
    # Empty: hostname-pid-random, unique per process (replicas are stateless).
    replica_id: str = ""

    # The broker decides probe settings: the farm pool's `probe:` values, else its RDBROKER_PROBE_*,
    # sent with every claimed target. These four are only the fallback for a target carrying 0
    # (a broker that sends none). HAProxy-like: inter 2 s, rise 2, fall 3.
    probe_interval_s: float = Field(
        default=2.0,
        gt=0,
        le=3600,
        description=f"fallback: used only when a claimed target carries 0 {_DECIDES}",
    )
    probe_timeout_s: float = Field(
        default=1.5,
        gt=0,
        le=600,
        description=f"fallback: used only when a claimed target carries 0 {_DECIDES}",
    )
    # Each wait is interval * (1 +- jitter), so replicas started together do not probe in step.
    probe_jitter: float = Field(default=0.1, ge=0, le=0.5)
    rise: int = Field(
        default=2, ge=1, le=100, description=f"fallback: used only when a claimed target carries 0 {_DECIDES}"
    )
    fall: int = Field(
        default=3, ge=1, le=100, description=f"fallback: used only when a claimed target carries 0 {_DECIDES}"
    )

    # Leases are renewed every lease/3. A dead replica's servers are claimed by another once its
    # leases expire, so keep the lease at or under ~1.5 probe intervals to re-probe within 3.
    lease_ms: int = Field(default=3000, ge=30, le=600_000)
    # Results are sent to the broker in batches gathered over this window.
    report_batch_s: float = Field(default=0.25, gt=0, le=60)
    # How often a server's session list (its `sessions_url`) is fetched and reported: the broker
    # decides (the pool's `sessions_interval`, else its RDBROKER_SESSIONS_INTERVAL_MS); this is only
    # the fallback for a target carrying 0.
    sessions_interval_s: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="fallback: used only when a claimed target carries 0 "
        "(the broker's pool `sessions_interval`, else its RDBROKER_SESSIONS_INTERVAL_MS, decides)",
    )
    # Deadline of each broker RPC (one address); failover tries the next address after it.
    rpc_timeout_s: float = Field(default=2.0, gt=0, le=120)
    # Upper bound on the timeout an operator may ask of ProbeServer.
    max_on_demand_timeout_s: float = Field(default=30.0, gt=0, le=600)

    # Prometheus /metrics (host:port); empty = off.
    metrics_listen: str = ""
    # Mutual TLS for the gRPC server and the broker client: all three or none.
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    # The health role's bearer token for the brokers (docs/security.md): environment only, or a file
    # re-read when it changes (a mounted Secret).
    broker_token: SecretStr = SecretStr("")
    broker_token_file: str = Field(
        default="", description="file holding the bearer token sent to the brokers (re-read on change)"
    )
    # ProbeServer is an admin call: a client certificate naming spiffe://<grpc_trust_domain>/rdbroker/admin,
    # or this token (environment only, the broker's RDBROKER_GRPC_ADMIN_TOKEN). With neither TLS nor
    # the token the port is open to every caller, so it may only listen on loopback unless `insecure_grpc`.
    grpc_admin_token: SecretStr = SecretStr("")
    grpc_trust_domain: str = DEFAULT_TRUST_DOMAIN
    insecure_grpc: bool = Field(
        default=False, description="serve gRPC open (no TLS, no admin token) on a non-loopback address"
    )
    grpc_reflection: bool = Field(default=False, description="serve gRPC server reflection (for grpcurl)")

    # Sent as `Authorization: Bearer` to the servers' agents (their RDBROKER_AGENT_TOKEN): from the
    # environment only (a command line shows in `ps`), or the first line of a file, re-read on change.
    agent_token: SecretStr = Field(
        default=SecretStr(""), description="the agents' bearer token (environment only)"
    )
    agent_token_file: str = Field(
        default="", description="a file holding the agents' token, re-read when it changes"
    )
    # HTTPS agents: trust this CA (empty: the system's), and present this certificate and key to an
    # agent that asks for one (its tls_ca).
    agent_tls_ca: str = ""
    agent_tls_cert: str = ""
    agent_tls_key: str = ""

    @field_validator("broker")
    @classmethod
    def _check_broker(cls, value: str) -> str:
        return ",".join(broker_targets(value))

    @field_validator("grpc_trust_domain")
    @classmethod
    def _trust_domain(cls, value: str) -> str:
        return check_trust_domain(value)

    @field_validator("grpc_listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        split_host_port(value)
        return value

    @field_validator("probe_listen", "metrics_listen")
    @classmethod
    def _check_optional_listen(cls, value: str) -> str:
        if value.strip():
            split_host_port(value)
        return value.strip()

    @model_validator(mode="after")
    def _check_agent_tls(self) -> HealthSettings:
        if bool(self.agent_tls_cert.strip()) != bool(self.agent_tls_key.strip()):
            raise ValueError("agent_tls_cert and agent_tls_key go together")
        return self

    @property
    def broker_addresses(self) -> list[str]:
        return self.broker.split(",")

    def effective_replica_id(self) -> str:
        if self.replica_id:
            return self.replica_id
        return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
