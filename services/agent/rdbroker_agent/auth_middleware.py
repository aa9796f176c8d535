"""The check of auth.py on each request: RequireAuth answers 401 to a request without credentials, and
Refusals counts those answers and logs them without flooding the log."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from rdbroker_common.bearer import Tokens

from .auth import AgentAuth
from .replies import plain_text

log = logging.getLogger(__name__)

REFUSALS_LOG_INTERVAL_S = 60.0  # refused requests are logged at most this often, with their count
REALM = 'Bearer realm="rdbroker-agent"'


class RequireAuth:
    """Every path but /healthz needs a valid bearer token, or HTTPS with a verified client certificate
    (the listener requires one when `tls_ca` is set, so any HTTPS request has one). 401 otherwise."""

    def __init__(self, app: ASGIApp, auth: AgentAuth, refusals: Refusals) -> None:
        self.app = app
        self.auth = auth
        self.refusals = refusals

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/healthz" or not self.auth.required:
            await self.app(scope, receive, send)
            return
        if self.auth.client_certificates and scope["scheme"] == "https":
            await self.app(scope, receive, send)
            return
        tokens = self.auth.tokens
        authorization = _header(scope, b"authorization")
        if tokens is not None and tokens.accepts(authorization):
            await self.app(scope, receive, send)
            return
        await self._refuse(scope, receive, send, authorization, tokens)

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, authorization: str | None, tokens: Tokens | None
    ) -> None:
        client = scope.get("client")
        self.refusals.add(client[0] if client else "?")
        if tokens is None:  # client certificates only, and this request came without TLS
            detail, challenge = "this agent takes HTTPS with a client certificate only", REALM
        elif authorization is None:
            detail = "missing bearer token: send Authorization: Bearer <the agent's token>"
            challenge = REALM
        else:
            detail, challenge = "wrong bearer token", f'{REALM}, error="invalid_token"'
        response = plain_text(401, detail)
        response.headers["WWW-Authenticate"] = challenge
        await response(scope, receive, send)


class Refusals:
    """Refused requests: counted, logged at most once per REFUSALS_LOG_INTERVAL_S (a scan must not
    flood the log), never with what the client sent."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.total = 0
        self._clock = clock
        self._unlogged = 0
        self._logged_at = float("-inf")

    def add(self, client: str) -> None:
        self.total += 1
        self._unlogged += 1
        now = self._clock()
        if now - self._logged_at >= REFUSALS_LOG_INTERVAL_S:
            log.warning(
                "refused %d request(s) without valid credentials (the last from %s)",
                self._unlogged,
                client,
                extra={"client": client},
            )
            self._unlogged, self._logged_at = 0, now


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None
