"""The proxy's settings: flags, `RDBROKER_*` environment variables, defaults (flags win)."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from rdbroker_common import loghash
from rdbroker_common.flags import parse_settings
from rdbroker_common.settings import ServiceSettings, broker_targets, split_host_port
from rdbroker_rdp import MAX_FIRST_PACKET

# A command line shows in `ps` to every user of the host: the token comes from the environment or a file.
ENV_ONLY = ("broker_token",)


def default_proxy_id() -> str:
    # The pod name in Kubernetes; the pid keeps two replicas on one host apart.
    return f"{socket.gethostname()}-{os.getpid()}"


class ProxySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RDBROKER_", frozen=True, extra="ignore")

    listen: str = Field(default="0.0.0.0:3389", description="HOST:PORT for RDP clients")
    broker: str = Field(
        default="127.0.0.1:50051",
        description="comma-separated broker HOST:PORT list, or one dns:///HOST:PORT target (round-robin)",
    )
    pool: str = Field(default="", description="pool for clients that name none (empty = the default pool)")
    grpc_listen: str = Field(
        default="127.0.0.1:50053",
        description="HOST:PORT of the grpc.health.v1 server (plaintext, for probes)",
    )
    metrics_listen: str = Field(default="", description="HOST:PORT of Prometheus /metrics (empty = off)")
    proxy_id: str = Field(default_factory=default_proxy_id, description="this replica's id for the broker")
    tls_ca: str = Field(default="", description="CA bundle for gRPC (mutual TLS when set)")
    tls_cert: str = Field(default="", description="certificate for gRPC mutual TLS")
    tls_key: str = Field(default="", description="private key for gRPC mutual TLS")
    # The proxy role's bearer token for the brokers (docs/security.md): environment only, or a file
    # re-read when it changes (a mounted Secret).
    broker_token: SecretStr = SecretStr("")
    broker_token_file: str = Field(
        default="", description="file holding the bearer token sent to the brokers (re-read on change)"
    )

    first_packet_timeout_s: float = Field(default=5.0, gt=0, le=300, description="first packet deadline")
    max_first_packet: int = Field(
        default=MAX_FIRST_PACKET, ge=11, le=MAX_FIRST_PACKET, description="bytes read before a decision"
    )
    route_timeout_s: float = Field(default=5.0, gt=0, le=120, description="Route deadline, retries included")
    route_attempt_timeout_s: float = Field(default=2.0, gt=0, le=120, description="one Route call")
    route_stream: bool = Field(
        default=True, description="Route calls batched on RouteStream (off: one unary call each)"
    )
    connect_timeout_s: float = Field(default=5.0, gt=0, le=120, description="server connect timeout")
    idle_timeout_s: float = Field(default=0.0, ge=0, description="idle close (0 = off)")
    max_connections: int = Field(default=10000, ge=1, description="clients at once (more: closed)")
    max_routing_per_client: int = Field(
        default=20,
        ge=0,
        le=100000,
        description="one client address's connections not yet spliced (more: closed; 0 = no limit)",
    )
    max_routing: int = Field(
        default=128,
        ge=0,
        le=100000,
        description="connections in the routing step at once; more wait their turn in order (0 = no limit)",
    )
    route_queue_timeout_s: float = Field(
        default=30.0, gt=0, le=300, description="how long a connection waits its turn to be routed"
    )
    backlog: int = Field(default=1024, ge=1, description="listen backlog")
    heartbeat_interval_s: float = Field(default=5.0, gt=0, le=300, description="until the broker names one")
    report_buffer: int = Field(default=10000, ge=1, description="reports held for brokers")
    report_timeout_s: float = Field(default=2.0, gt=0, le=60, description="deadline of one report call")
    report_flush_timeout_s: float = Field(default=5.0, ge=0, le=300, description="report flush at exit")
    log_identity: Literal["hash", "cookie"] = Field(
        default="hash", description="the cookie in logs as a keyed hash, or as is"
    )
    # The HMAC key of `log_identity = "hash"`, one per deployment (docs/security.md). The key itself is
    # read from the environment only: a command line shows in `ps`.
    log_hash_key: SecretStr = Field(default=SecretStr(""), description="HMAC key of the identity hash")
    log_hash_key_file: str = Field(default="", description="file holding the HMAC key of the identity hash")

    @field_validator("listen", "grpc_listen")
    @classmethod
    def _address(cls, value: str) -> str:
        split_host_port(value)
        return value

    @field_validator("metrics_listen")
    @classmethod
    def _optional_address(cls, value: str) -> str:
        if value.strip():
            split_host_port(value)
        return value.strip()

    @field_validator("broker")
    @classmethod
    def _brokers(cls, value: str) -> str:
        return ",".join(broker_targets(value))

    @model_validator(mode="after")
    def _one_log_hash_key(self) -> ProxySettings:
        if self.log_hash_key.get_secret_value() and self.log_hash_key_file:
            raise ValueError(f"set either {loghash.ENV} or log_hash_key_file, not both")
        return self

    @property
    def broker_addresses(self) -> list[str]:
        return self.broker.split(",")

    def log_hasher(self) -> loghash.LogHasher:
        """The identity hasher: the configured key, or this process's random one. Reads the key file;
        raises ValueError (a short or empty key) or OSError (an unreadable file)."""
        return loghash.LogHasher(
            loghash.load_key(self.log_hash_key.get_secret_value(), self.log_hash_key_file)
        )


# Secrets are read from the environment only: a command line is visible to every user of the host.
ENV_ONLY = ("log_hash_key",)


def parse_args(argv: Sequence[str]) -> ProxySettings:
    """Flags for every settings field; what is not given comes from RDBROKER_* or the default."""
    return parse_settings(
        ProxySettings,
        argv,
        prog="rdbroker proxy",
        description="RDP proxy replica: reads the first packet, asks the broker, splices to the server.",
        env_only=ENV_ONLY,
    )
