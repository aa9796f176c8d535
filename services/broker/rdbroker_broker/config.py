"""Broker settings: flags and `RDBROKER_*` environment variables, built once in `__main__`."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator, model_validator

from rdbroker_broker.domain import MAX_USER_CHARS
from rdbroker_common.power import MIN_SECRET_CHARS
from rdbroker_common.rpc_authz import ADMIN, DEFAULT_TRUST_DOMAIN, HEALTH, PROXY, check_trust_domain
from rdbroker_common.settings import ServiceSettings, is_loopback, split_host_port

DEFAULT_DATABASE_URL = "sqlite:///rdbroker.db"


class BrokerSettings(ServiceSettings):
    database_url: SecretStr = SecretStr(DEFAULT_DATABASE_URL)
    grpc_listen: str = "127.0.0.1:50051"
    http_listen: str = "127.0.0.1:8080"
    # REST API bearer tokens (docs/api.md): the read token reads, the admin token also changes.
    # With neither, the API is open, so it may only listen on loopback (checked below).
    api_read_token: SecretStr = SecretStr("")
    api_admin_token: SecretStr = SecretStr("")
    # Upgrade the schema at start. The embedded SQLite default always does; PostgreSQL needs
    # `rdbroker migrate` (a k8s Job) unless this is set.
    migrate: bool = False

    # Proxies heartbeat this often; after `heartbeat_misses` missed intervals their active
    # sessions become disconnected.
    heartbeat_interval_s: float = Field(default=5.0, gt=0, le=3600)
    heartbeat_misses: int = Field(default=3, ge=1, le=100)
    # A routed session the proxy never reports as opened is ended after this long.
    pending_timeout_s: float = Field(default=30.0, gt=0, le=86400)
    # How often each replica expires sessions and silent proxies (safe on every replica at once).
    sweep_interval_s: float = Field(default=5.0, gt=0, le=3600)

    # Ended sessions, closed connections and silent proxies are deleted after this long.
    retention_s: float = Field(default=7 * 86400.0, gt=0)
    # Operators' audit records (`GET /v1/audit`) are deleted after this long, by the same sweep.
    audit_retention_s: float = Field(default=365 * 86400.0, gt=0)

    # Probe leases and the defaults handed to health replicas with each target.
    lease_ms: int = Field(default=10_000, ge=100, le=3_600_000)
    probe_interval_ms: int = Field(default=2_000, ge=100, le=3_600_000)
    probe_timeout_ms: int = Field(default=2_000, ge=100, le=3_600_000)
    probe_rise: int = Field(default=2, ge=1, le=100)
    probe_fall: int = Field(default=3, ge=1, le=100)
    # How often health replicas read each server's session list (a pool's `sessions_interval` wins):
    # a logoff on a server shows in the directory within about this long.
    sessions_interval_ms: int = Field(default=5_000, ge=100, le=3_600_000)

    # When the proxy cannot reach the server of a user's session, the broker probes it (one RDP
    # handshake) within this before it moves the session: short, as the user's client is waiting.
    failover_probe_timeout_ms: int = Field(default=1000, ge=50, le=10_000)

    # How long a broker goes on using the assignment rules (the farm file's `assignments:`) it last
    # read before reading them again: an `apply` reaches every replica's Routes within about this. 0:
    # read them at every Route that names no pool (one more transaction each).
    assignments_refresh_ms: int = Field(default=1000, ge=0, le=3_600_000)

    # Input bounds for Route: a user name longer than its database column could never be stored.
    max_cookie_chars: int = Field(default=MAX_USER_CHARS, ge=9, le=MAX_USER_CHARS)
    db_pool_size: int = Field(default=10, ge=1, le=200)
    # Calls beyond the pool wait for a connection in arrival order, at most this many (more are
    # refused at once with UNAVAILABLE, as is one whose deadline would pass while it waits).
    db_max_waiting: int = Field(default=1000, ge=1, le=100_000)
    # PostgreSQL bounds on one statement and on one lock wait (0 = none).
    db_statement_timeout_ms: int = Field(default=10_000, ge=0, le=3_600_000)
    db_lock_timeout_ms: int = Field(default=5_000, ge=0, le=3_600_000)
    # A broker that made no database call for this long pings it, so that `/v1/status` and the
    # `rdbroker_database_up` gauge notice a database going away (or coming back) while it is idle.
    db_check_interval_s: float = Field(default=5.0, gt=0, le=3600)

    # Every client connection is closed (GOAWAY) after this long, in-flight calls getting the grace,
    # so `dns:///` clients re-resolve the headless Service and spread over new broker pods.
    grpc_max_connection_age_ms: int = Field(default=30_000, ge=100, le=86_400_000)
    grpc_max_connection_age_grace_ms: int = Field(default=10_000, ge=0, le=3_600_000)

    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    # gRPC authorization by role (docs/security.md). A caller's role comes from its client certificate
    # (URI SAN spiffe://<grpc_trust_domain>/rdbroker/<role>) under mutual TLS, or else from its bearer
    # token matching one of these (environment only). With neither TLS nor a token every caller may call
    # every RPC, so gRPC may then only listen on loopback unless `insecure_grpc` is set. Each may be a
    # comma-separated list: during a rotation the old and the new token both work.
    grpc_proxy_token: SecretStr = SecretStr("")
    grpc_health_token: SecretStr = SecretStr("")
    grpc_admin_token: SecretStr = SecretStr("")
    grpc_trust_domain: str = DEFAULT_TRUST_DOMAIN
    insecure_grpc: bool = Field(
        default=False, description="serve gRPC open (no TLS, no tokens) on a non-loopback address"
    )
    grpc_reflection: bool = Field(default=False, description="serve gRPC server reflection (for grpcurl)")

    # Session actions (`POST /v1/sessions/{id}/logoff|disconnect|message`) go to the session's server's
    # agent with the token and TLS settings the health replicas use for it (docs/api.md): its token from
    # the environment only (a command line shows in `ps`) or a file re-read on change; HTTPS agents:
    # trust this CA (empty: the system's), present this certificate and key to an agent that asks.
    agent_token: SecretStr = Field(
        default=SecretStr(""), description="the agents' bearer token (environment only)"
    )
    agent_token_file: str = Field(
        default="", description="a file holding the agents' token, re-read when it changes"
    )
    agent_tls_ca: str = ""
    agent_tls_cert: str = ""
    agent_tls_key: str = ""
    # How long an agent gets to carry out an action (a logoff waits for the session's processes to end).
    agent_action_timeout_s: float = Field(default=20.0, gt=0, le=300)
    # Drains until empty (drains.py): how often a replica looks for drains to advance; how long one
    # replica holds a drain it advances (renewed after each agent call: more than an action's timeout);
    # how long a session waits before a failed message or logoff is tried again.
    drain_interval_s: float = Field(default=5.0, gt=0, le=3600)
    drain_lease_s: float = Field(default=60.0, gt=0, le=3600)
    drain_retry_s: float = Field(default=30.0, gt=0, le=86400)

    # Capacity on demand (docs/power.md): the key that signs every power hook call (environment only;
    # pools with `power:` hooks need it), how often each replica's power loop looks, and the bounds
    # of one hook call: each attempt's timeout, and how long failed attempts are retried.
    power_hook_secret: SecretStr = SecretStr("")
    power_interval_s: float = Field(default=5.0, gt=0, le=3600)
    power_hook_timeout_s: float = Field(default=10.0, gt=0, le=300)
    power_hook_retry_s: float = Field(default=60.0, ge=0, le=3600)

    # Prometheus /metrics (host:port); empty = off. The sessions-by-state gauge is recounted this often.
    metrics_listen: str = ""
    sessions_metric_interval_s: float = Field(default=5.0, gt=0, le=3600)

    @field_validator("grpc_trust_domain")
    @classmethod
    def _trust_domain(cls, value: str) -> str:
        return check_trust_domain(value)

    @field_validator("power_hook_secret")
    @classmethod
    def _power_secret(cls, value: SecretStr) -> SecretStr:
        if value.get_secret_value() and len(value.get_secret_value()) < MIN_SECRET_CHARS:
            raise ValueError(f"the power hook secret must be at least {MIN_SECRET_CHARS} characters")
        return value

    @field_validator("grpc_listen", "http_listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        split_host_port(value)
        return value

    @model_validator(mode="after")
    def _check_agent_tls(self) -> BrokerSettings:
        if bool(self.agent_tls_cert.strip()) != bool(self.agent_tls_key.strip()):
            raise ValueError("agent_tls_cert and agent_tls_key go together")
        return self

    @property
    def database_url_text(self) -> str:
        return self.database_url.get_secret_value()

    @property
    def proxy_silence_s(self) -> float:
        return self.heartbeat_interval_s * self.heartbeat_misses

    @model_validator(mode="after")
    def _open_api_on_loopback_only(self) -> BrokerSettings:
        if not self.api_tokens_configured and not is_loopback(split_host_port(self.http_listen)[0]):
            raise ValueError(
                f"http_listen {self.http_listen} is not a loopback address and no API token is set: "
                "set RDBROKER_API_ADMIN_TOKEN (and RDBROKER_API_READ_TOKEN), or listen on 127.0.0.1"
            )
        return self

    @property
    def api_read_token_text(self) -> str:
        return self.api_read_token.get_secret_value()

    @property
    def api_admin_token_text(self) -> str:
        return self.api_admin_token.get_secret_value()

    @property
    def grpc_tokens(self) -> dict[str, str]:
        """Role -> its bearer token(s), comma-separated; the roles with a token only."""
        tokens = {
            PROXY: self.grpc_proxy_token.get_secret_value(),
            HEALTH: self.grpc_health_token.get_secret_value(),
            ADMIN: self.grpc_admin_token.get_secret_value(),
        }
        return {role: token for role, token in tokens.items() if token}

    @property
    def api_tokens_configured(self) -> bool:
        return bool(self.api_read_token_text or self.api_admin_token_text)
