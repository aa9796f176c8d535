"""The agent's paths (server.py serves them): `GET /load`, `GET /sessions`, `POST
/sessions/logoff|disconnect|message` and `GET /healthz`, with their answers for a bug, an unknown path
and a wrong method."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .actions import ACTIONS, Action, ActionError, SessionActions, check_request
from .auth import AgentAuth
from .auth_middleware import Refusals, RequireAuth
from .config import AgentConfig
from .errors import SourceError
from .load import DRAIN, is_drained, omits_disconnected, read_sessions
from .replies import NO_STORE, plain_text
from .shared import SharedResult
from .sources import Sources

log = logging.getLogger(__name__)

MAX_BODY = 4096  # bytes of an action's JSON body


class Endpoints:
    """The paths' handlers over one host's config, session sources, shared load and session actions."""

    def __init__(
        self, config: AgentConfig, sources: Sources, load: SharedResult, actions: SessionActions
    ) -> None:
        self.config = config
        self.sources = sources
        self.load = load
        self.actions = actions

    def app(self, auth: AgentAuth, refusals: Refusals) -> Starlette:
        routes = [
            Route("/load", _guarded(self._load), methods=["GET"]),
            Route("/sessions", _guarded(self._sessions), methods=["GET"]),
            *(
                Route(f"/sessions/{action}", _guarded(self._action(action)), methods=["POST"])
                for action in ACTIONS
            ),
            Route("/healthz", _healthz, methods=["GET"]),
        ]
        return Starlette(
            routes=routes,
            middleware=[Middleware(RequireAuth, auth=auth, refusals=refusals)],
            exception_handlers={404: _not_found, 405: _not_allowed},
        )

    async def _load(self, request: Request) -> Response:
        # Draining takes effect at once: the flag is one stat, never served from the cache.
        if is_drained(self.config):
            return plain_text(200, DRAIN)
        return plain_text(200, await self.load.get())

    async def _sessions(self, request: Request) -> Response:
        try:
            sessions = await read_sessions(self.config, self.sources)
        except SourceError as exc:
            log.warning("session source failed: %s", exc)
            return plain_text(503, f"session source failed: {exc}")
        # The object form says whether the list can show disconnected sessions: the broker must not
        # end a disconnected session for its absence from a list that never shows them.
        answer = {
            "omits_disconnected": omits_disconnected(self.config),
            "sessions": [{"user": s.user, "state": s.state} for s in sessions],
        }
        body = json.dumps(answer, ensure_ascii=False)
        return Response(body, 200, headers=NO_STORE, media_type="application/json")

    def _action(self, action: Action) -> Callable[[Request], Awaitable[Response]]:
        async def act(request: Request) -> Response:
            try:
                body = await _json_body(request)
                user, text = check_request(action, body.get("user"), body.get("text"))
                done = await self.actions.act(action, user, text)
            except ActionError as exc:
                log.warning("%s", exc, extra={"action": action})
                return plain_text(exc.status, str(exc))
            log.info("%s: %s (%s)", action, done.detail, done.user, extra={"action": action})
            answer = {
                "action": action,
                "user": done.user,
                "sessions": list(done.sessions),
                "detail": done.detail,
            }
            return Response(
                json.dumps(answer, ensure_ascii=False), 200, headers=NO_STORE, media_type="application/json"
            )

        return act


async def _json_body(request: Request) -> dict[str, object]:
    """The request's JSON object (at most MAX_BODY bytes), or ActionError(400 or 413)."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise ActionError(413, f"the body is longer than {MAX_BODY} bytes")
    try:
        data = json.loads(body)
    except ValueError:
        raise ActionError(400, 'the body must be JSON: {"user": ..., "text": ...}') from None
    if not isinstance(data, dict):
        raise ActionError(400, 'the body must be a JSON object: {"user": ..., "text": ...}')
    return data


def _guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """A bug must not leave the poller without an answer: 500 `internal error`, logged."""

    async def guarded(request: Request) -> Response:
        try:
            return await handler(request)
        except Exception:
            log.exception("agent request failed")
            return plain_text(500, "internal error")

    return guarded


async def _healthz(request: Request) -> Response:
    return plain_text(200, "ok")


async def _not_found(request: Request, exc: Exception) -> Response:
    return plain_text(404, "not found: try /load, /sessions, /sessions/logoff|disconnect|message or /healthz")


async def _not_allowed(request: Request, exc: Exception) -> Response:
    # Reads are GET (Starlette adds HEAD; its own Allow lists them in set order), actions POST.
    if request.url.path.startswith("/sessions/"):
        return plain_text(405, "only POST", {"Allow": "POST"})
    return plain_text(405, "only GET (or HEAD)", {"Allow": "GET, HEAD"})
