"""How rdbroker talks to the servers' agents over HTTP(S): the health replicas' probes and the broker's
session actions send the same token (`RDBROKER_AGENT_TOKEN` or a token file) and use the same TLS
settings (trust `agent_tls_ca`, present `agent_tls_cert`/`agent_tls_key` to an agent that asks).
"""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx

from rdbroker_common.bearer import Tokens
from rdbroker_common.https import TlsContext

TOKEN_ENV = "RDBROKER_AGENT_TOKEN"


def agent_client(
    context: ssl.SSLContext | None = None, timeout: httpx.Timeout | float = 5.0
) -> httpx.AsyncClient:
    """The HTTP client for agents: no proxy from the environment (agents sit next to the servers), no
    redirects (the token must not follow one), and no pool limit, since each held server has at most
    one request in flight. `context`: for HTTPS agents (else the system's CAs)."""
    return httpx.AsyncClient(
        follow_redirects=False,
        trust_env=False,
        verify=context if context is not None else True,
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        timeout=timeout,
    )


def agent_tokens(token: str, token_file: str, file_flag: str) -> Tokens | None:
    """The token sent to agents, from RDBROKER_AGENT_TOKEN or the file `file_flag` names; None without
    either. TokenError (a ValueError) if unusable."""
    return Tokens.configured(token, token_file, names=(TOKEN_ENV, file_flag))


def agent_tls(ca: str, cert: str, key: str, flags: str) -> TlsContext | None:
    """HTTPS to agents: trust `ca` (else the system's CAs), present `cert`/`key` to an agent that asks
    for a client certificate. None when neither `ca` nor `cert` is set; ValueError (naming `flags`) if
    they do not load."""
    ca_path, cert_path, key_path = (Path(v.strip()) if v.strip() else None for v in (ca, cert, key))
    if ca_path is None and cert_path is None:
        return None
    try:
        return TlsContext.client(ca_path, cert_path, key_path)
    except ValueError as exc:
        raise ValueError(f"{flags}: {exc}") from exc
