"""The agent's HTTP endpoint, Starlette on uvicorn: `GET /load` (text), `GET /sessions` (JSON),
`POST /sessions/logoff|disconnect|message` (JSON in and out, actions.py) and `GET /healthz` (`ok`, the
only path that needs no authentication; auth.py says who may ask).

Bounds, for a port anyone on the network may reach:
- a request head of at most MAX_HEAD bytes: a longer one gets 431 and a close; one that is not
  HTTP/1.1 (h11's parse) gets 400 and a close;
- a request head must arrive within `request_timeout_s` of the connection's start (or of the previous
  answer): a client sending it slowly, or never, is closed unanswered. uvicorn itself only times out a
  connection idle after an answer (KEEP_ALIVE_S), so `_Protocol` adds this deadline;
- at most `max_connections` connections are served: a request on one more gets `503 Service
  Unavailable` and a close (uvicorn's `limit_concurrency`). Connections are accepted before they are
  counted, so one over the cap stays open until it sends its request or its head deadline passes;
- an action's body is at most MAX_BODY bytes of JSON (413 beyond);
- `GET /load` is computed once for requests that arrive together and reused for `load_cache_s`
  (SharedResult); the drain flag is read on every request, never cached.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from types import TracebackType

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from rdbroker_common.bearer import Tokens
from rdbroker_common.https import TlsContext

from .actions import ACTIONS, Action, ActionError, SessionActions, check_request
from .auth import AgentAuth, check_listen
from .config import AgentConfig
from .errors import ConfigError, SourceError
from .host_actions import actions_for
from .load import DRAIN, is_drained, measure_load, omits_disconnected, read_sessions
from .shared import SharedResult
from .sources import Sources

log = logging.getLogger(__name__)

MAX_HEAD = 8192  # bytes of request line + headers
MAX_BODY = 4096  # bytes of an action's JSON body
KEEP_ALIVE_S = 5  # an idle connection is closed this long after its last answer (pollers come every few s)
SHUTDOWN_GRACE_S = 2  # requests in flight at stop get this long
REFUSALS_LOG_INTERVAL_S = 60.0  # refused requests are logged at most this often, with their count
NO_STORE = {"Cache-Control": "no-store"}
REALM = 'Bearer realm="rdbroker-agent"'


class AgentServer:
    def __init__(
        self,
        config: AgentConfig,
        sources: Sources,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        request_timeout_s: float = 10.0,
        load_cache_s: float = 1.0,
        max_connections: int = 64,
        auth: AgentAuth | None = None,
        allow_unauthenticated: bool = False,
        actions: SessionActions | None = None,
    ):
        """`auth` defaults to the config's (its token_file, tls_ca; no environment token); `actions` to
        what this host offers (host_actions.actions_for).
        ListenRefused when nothing authenticates requests and `host` is not loopback (unless
        `allow_unauthenticated`); ConfigError when the token or TLS files cannot be used."""
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, not {max_connections}")
        self.config = config
        self.sources = sources
        self.host = host
        self.port = port
        self.request_timeout_s = request_timeout_s
        self.max_connections = max_connections
        self.auth = auth if auth is not None else AgentAuth.from_config(config, env_token="")
        check_listen(host, self.auth, allow_unauthenticated)
        self.tls = _server_tls(config)
        self.load = SharedResult(lambda: measure_load(self.config, self.sources), load_cache_s)
        self.actions = actions if actions is not None else actions_for(config, sources.run)
        self.refusals = _Refusals()
        self.app = self._app()
        self._uvicorn: _Uvicorn | None = None
        self._serving: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    @property
    def open_connections(self) -> int:
        return len(self._uvicorn.server_state.connections) if self._uvicorn is not None else 0

    async def start(self) -> None:
        sock = _listen(self.host, self.port)
        tls = self.tls

        class Protocol(_Protocol):
            head_timeout_s = self.request_timeout_s
            server_tls = tls

        config = uvicorn.Config(
            self.app,
            http=Protocol,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            # uvicorn counts the connection asking among those open: N + 1 serves N at once.
            limit_concurrency=self.max_connections + 1,
            timeout_keep_alive=KEEP_ALIVE_S,
            timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
            h11_max_incomplete_event_size=MAX_HEAD,
            ssl_context_factory=(lambda _config, _default: tls.context) if tls is not None else None,
        )
        config.load()
        server = _Uvicorn(config)
        # Supervised here: stop() ends it and awaits it.
        serving = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]), name="agent-http")
        ready = asyncio.get_running_loop().create_task(server.ready.wait())
        await asyncio.wait({serving, ready}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            sock.close()
            await serving  # raises what stopped it
            raise RuntimeError("the agent's HTTP server ended before it started")
        self._uvicorn, self._serving, self._socket = server, serving, sock
        self.port = sock.getsockname()[1]

    async def stop(self) -> None:
        if self._uvicorn is not None and self._serving is not None:
            self._uvicorn.should_exit = True
            await self._serving
        if self._socket is not None:
            self._socket.close()
        self._uvicorn = self._serving = self._socket = None

    async def __aenter__(self) -> AgentServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def _app(self) -> Starlette:
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
            middleware=[Middleware(_RequireAuth, auth=self.auth, refusals=self.refusals)],
            exception_handlers={404: _not_found, 405: _not_allowed},
        )

    async def _load(self, request: Request) -> Response:
        # Draining takes effect at once: the flag is one stat, never served from the cache.
        if is_drained(self.config):
            return _text(200, DRAIN)
        return _text(200, await self.load.get())

    async def _sessions(self, request: Request) -> Response:
        try:
            sessions = await read_sessions(self.config, self.sources)
        except SourceError as exc:
            log.warning("session source failed: %s", exc)
            return _text(503, f"session source failed: {exc}")
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
                return _text(exc.status, str(exc))
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


class _RequireAuth:
    """Every path but /healthz needs a valid bearer token, or HTTPS with a verified client certificate
    (the listener requires one when `tls_ca` is set, so any HTTPS request has one). 401 otherwise."""

    def __init__(self, app: ASGIApp, auth: AgentAuth, refusals: _Refusals) -> None:
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
        response = _text(401, detail)
        response.headers["WWW-Authenticate"] = challenge
        await response(scope, receive, send)


class _Refusals:
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


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol with two bounds on each request head, and a look at the TLS files on each
    new connection. The head must arrive within `head_timeout_s` (uvicorn times out only a connection
    idle after an answer) and end within MAX_HEAD bytes: h11's own limit only applies to a head still
    incomplete after a read, so one sent in a single burst (a read takes up to 256 KiB) would pass."""

    head_timeout_s = 10.0
    server_tls: TlsContext | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        self._head_size = 0  # bytes of the awaited head received so far
        self._tail = b""  # its last bytes, for an end of head split across reads
        super().connection_made(transport)
        self._arm()
        if self.server_tls is not None:
            try:
                self.server_tls.refresh()  # for the next connections: this one's handshake is done
            except Exception:  # a failed look at the files must not fail the connection
                log.exception("cannot check the TLS files")

    def data_received(self, data: bytes) -> None:
        if self._deadline is not None:  # a head is awaited
            window = self._tail + data
            end = _HEAD_END.search(window)
            size = self._head_size - len(self._tail) + (end.end() if end else len(window))
            if size > MAX_HEAD:
                self._refuse_head()
                return
            self._head_size += len(data)
            self._tail = window[-2:]
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle:  # a request head was read
            self._disarm()

    def on_response_complete(self) -> None:
        cycle = self.cycle
        super().on_response_complete()
        if self.cycle is cycle and not self.transport.is_closing():
            self._arm()  # the next request's head

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._head_size, self._tail = 0, b""
        self._deadline = self.loop.call_later(self.head_timeout_s, self._head_too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def _refuse_head(self) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self.transport.write(_HEAD_TOO_LARGE)
            self.transport.close()


_HEAD_END = re.compile(rb"\n\r?\n")  # as h11 finds it
_HEAD_TOO_LARGE_TEXT = f"request head longer than {MAX_HEAD} bytes\n".encode()
_HEAD_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    + f"content-length: {len(_HEAD_TOO_LARGE_TEXT)}\r\n".encode()
    + b"connection: close\r\n\r\n"
    + _HEAD_TOO_LARGE_TEXT
)


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling (the agent's stop event drives shutdown), telling when
    it listens."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()


def _server_tls(config: AgentConfig) -> TlsContext | None:
    """HTTPS with tls_cert/tls_key; with tls_ca, client certificates it signed are required. Renewed files
    take over from the next connection (each connection looks at them: three `os.stat`)."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    try:
        return TlsContext.server(config.tls_cert, config.tls_key, config.tls_ca)
    except ValueError as exc:
        raise ConfigError(f"tls_cert/tls_key/tls_ca: {exc}") from exc


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def _guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """A bug must not leave the poller without an answer: 500 `internal error`, logged."""

    async def guarded(request: Request) -> Response:
        try:
            return await handler(request)
        except Exception:
            log.exception("agent request failed")
            return _text(500, "internal error")

    return guarded


async def _healthz(request: Request) -> Response:
    return _text(200, "ok")


async def _not_found(request: Request, exc: Exception) -> Response:
    return _text(404, "not found: try /load, /sessions, /sessions/logoff|disconnect|message or /healthz")


async def _not_allowed(request: Request, exc: Exception) -> Response:
    # Reads are GET (Starlette adds HEAD; its own Allow lists them in set order), actions POST.
    if request.url.path.startswith("/sessions/"):
        return _text(405, "only POST", {"Allow": "POST"})
    return _text(405, "only GET (or HEAD)", {"Allow": "GET, HEAD"})


def _text(status: int, text: str, headers: Mapping[str, str] | None = None) -> Response:
    return PlainTextResponse(f"{text}\n", status, headers={**NO_STORE, **(headers or {})})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None
