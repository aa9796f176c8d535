"""Who may ask the agent, and where it may listen.

A request carries `Authorization: Bearer <token>` with a token from `RDBROKER_AGENT_TOKEN` or from the
config's `token_file` (one token per line, any of them accepted, re-read when the file changes), or it
comes over HTTPS with a client certificate from the config's `tls_ca`. `/healthz` needs neither.
An agent with neither a token nor client certificates configured answers anyone, so it listens on a
loopback address only, unless started with `--allow-unauthenticated`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from rdbroker_common.bearer import TokenError, Tokens

from .config import AgentConfig
from .errors import ConfigError

TOKEN_ENV = "RDBROKER_AGENT_TOKEN"
MIN_TOKEN_LENGTH = 16
ALLOW_FLAG = "--allow-unauthenticated"


class ListenRefused(Exception):
    """An unauthenticated agent asked to listen beyond loopback; the message says why and what to do."""


@dataclass(frozen=True)
class AgentAuth:
    """Holders of one of `tokens`, or (`client_certificates`) of a certificate the TLS handshake verified."""

    tokens: Tokens | None = None
    client_certificates: bool = False

    @classmethod
    def from_config(cls, config: AgentConfig, env_token: str) -> AgentAuth:
        """The agent's auth from its environment token and config; ConfigError if unusable."""
        try:
            tokens = Tokens.configured(
                env_token,
                config.token_file,
                names=(TOKEN_ENV, "token_file"),
                min_length=MIN_TOKEN_LENGTH,
            )
        except TokenError as exc:
            raise ConfigError(str(exc)) from exc
        return cls(tokens=tokens, client_certificates=config.tls_ca is not None)

    @property
    def required(self) -> bool:
        return self.tokens is not None or self.client_certificates

    def describe(self) -> str:
        ways = []
        if self.tokens is not None:
            ways.append("a bearer token")
        if self.client_certificates:
            ways.append("a client certificate from tls_ca")
        return " or ".join(ways) if ways else "nothing (unauthenticated)"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def check_listen(host: str, auth: AgentAuth, allow_unauthenticated: bool) -> None:
    """ListenRefused when an agent that answers anyone would listen beyond loopback."""
    if auth.required or allow_unauthenticated or is_loopback(host):
        return
    raise ListenRefused(
        f"refusing to listen on {host} without authentication: anyone reaching it could read who is "
        f"logged on; set {TOKEN_ENV} (or token_file, or tls_ca in the config), listen on 127.0.0.1, "
        f"or pass {ALLOW_FLAG}"
    )


def default_listen(auth: AgentAuth) -> str:
    """Every address with authentication, loopback without."""
    return "0.0.0.0:8088" if auth.required else "127.0.0.1:8088"
