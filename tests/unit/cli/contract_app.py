"""A small in-memory FastAPI app serving the REST contract of docs/api.md, for the CLI's formatting and
error tests (the broker's real API is tested in tests/integration/rest), and a uvicorn server running it
on 127.0.0.1 in a thread (as httpx's own tests do).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import uvicorn
from fastapi import FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, Response

READ_TOKEN = "read-secret"
ADMIN_TOKEN = "admin-secret"
STATES = {"drain": "draining", "maintenance": "maintenance", "enable": "enabled"}


def stale_result_at() -> str:
    """Today at 00:00:05 UTC, so the CLI shows the time alone; read when an app is built (a value read
    once at import was yesterday's for a test run that crossed midnight: the table showed the date)."""
    return datetime.now(UTC).replace(hour=0, minute=0, second=5).strftime("%Y-%m-%dT%H:%M:%SZ")


def _problem(status: int, title: str, detail: str) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    return JSONResponse(body, status_code=status, media_type="application/problem+json")


def _server(address: str, pool: str = "default", **extra: Any) -> dict[str, Any]:
    server = {
        "address": address,
        "pool": pool,
        "weight": 100,
        "max_sessions": 0,
        "admin_state": "enabled",
        "effective_admin_state": "enabled",
        "health": "up",
        "health_detail": "neg_rsp protocol=1",
        "health_changed_at": "2026-11-27T09:00:02Z",
        "agent_state": "none",
        "agent_detail": "",
        "probed_at": "2026-11-27T09:41:12Z",
        "stale": False,
        "load": -1,
        "live_sessions": 0,
        "held_sessions": 0,
        "agent_url": "",
        "sessions_url": "",
        "routable": True,
        "power": "on",
    }
    server.update(extra)
    return server


def _session(session_id: str, user: str, server: str, state: str) -> dict[str, Any]:
    return {
        "id": session_id,
        "user": user,
        "pool": "default",
        "server_address": server,
        "state": state,
        "created_at": "2026-11-27T09:30:00Z",
        "updated_at": "2026-11-27T09:31:00Z",
        "disconnected_at": None,
        "expires_at": None,
        "end_reason": "",
        "confirmed": False,
    }


def build_app() -> FastAPI:
    app = FastAPI()
    servers = {
        "10.0.0.11:3389": _server("10.0.0.11:3389", load=35, live_sessions=1, held_sessions=1),
        "10.0.0.12:3389": _server("10.0.0.12:3389", health="down", routable=False, power="off"),
        # A stale result: health reads unknown, probed_at says when the last result was.
        "10.0.0.13:3389": _server(
            "10.0.0.13:3389", health="unknown", stale=True, probed_at=stale_result_at(), live_sessions=2
        ),
    }
    pools = {
        "default": {
            "name": "default",
            "default": True,
            "disconnect_timeout_s": 28800.0,
            "domain": "CORP",
            "upn_suffixes": ["corp.example.com"],
            "junk_bytes": 2048,
            "confirm_timeout_s": 120.0,
            "stale_after_ms": 0,
            "logon_lag_s": 30.0,
            "honor_routing_tokens": True,
            "probe_interval_ms": 2000,
            "probe_timeout_ms": 0,
            "probe_rise": 0,
            "probe_fall": 3,
            "sessions_interval_ms": 5000,
            "placement": "depth",
        }
    }
    sessions = {
        "s-1": _session("s-1", "alice", "10.0.0.11:3389", "active"),
        "s-2": _session("s-2", "CORP\\bob", "10.0.0.11:3389", "ended"),
        "s-3": {**_session("s-3", "carol", "10.0.0.11:3389", "disconnected"), "confirmed": True},
    }
    app.state.calls = []
    app.state.raw_paths = []

    def auth(authorization: str | None, admin: bool) -> JSONResponse | None:
        token = (authorization or "").removeprefix("Bearer ")
        if token not in (READ_TOKEN, ADMIN_TOKEN):
            return _problem(401, "Authentication required", "send Authorization: Bearer <token>")
        if admin and token != ADMIN_TOKEN:
            return _problem(403, "Admin token required", "this change needs the admin token")
        return None

    @app.middleware("http")
    async def record(request: Request, call_next: Any) -> Response:
        app.state.calls.append((request.method, request.scope["path"], str(request.url.query)))
        app.state.raw_paths.append(request.scope["raw_path"])
        response: Response = await call_next(request)
        return response

    @app.get("/v1/servers")
    def list_servers(pool: str = "", authorization: str | None = Header(None)) -> Any:
        if denied := auth(authorization, admin=False):
            return denied
        if pool and pool != "default":
            return _problem(404, "Pool not found", f"no pool named {pool}")
        return {"servers": list(servers.values())}

    @app.post("/v1/servers/{address}/{action}")
    def act(address: str, action: str, authorization: str | None = Header(None)) -> Any:
        if denied := auth(authorization, admin=True):
            return denied
        if address not in servers:
            return _problem(404, "Server not found", f"no server is registered at {address}")
        servers[address]["admin_state"] = servers[address]["effective_admin_state"] = STATES[action]
        return servers[address]

    @app.post("/v1/servers", status_code=201)
    async def add(request: Request, authorization: str | None = Header(None)) -> Any:
        if denied := auth(authorization, admin=True):
            return denied
        body = await request.json()
        servers[body["address"]] = _server(**body)
        return servers[body["address"]]

    @app.patch("/v1/servers/{address}")
    async def patch(address: str, request: Request, authorization: str | None = Header(None)) -> Any:
        if denied := auth(authorization, admin=True):
            return denied
        servers[address].update(await request.json())
        return servers[address]

    @app.delete("/v1/servers/{address}", status_code=204, response_model=None)
    def remove(address: str, force: bool = False, authorization: str | None = Header(None)) -> Response:
        if denied := auth(authorization, admin=True):
            return denied
        if servers[address]["live_sessions"] and not force:
            return _problem(409, "Server holds live sessions", f"{address} holds 1 live session")
        del servers[address]
        return Response(status_code=204)

    def counted(pool: dict[str, Any]) -> dict[str, Any]:
        return {**pool, "servers": len(servers), "live_sessions": 1}

    @app.get("/v1/pools")
    def list_pools(authorization: str | None = Header(None)) -> Any:
        if denied := auth(authorization, admin=False):
            return denied
        return {"pools": [counted(p) for p in pools.values()]}

    @app.get("/v1/pools/{name}")
    def get_pool(name: str, authorization: str | None = Header(None)) -> Any:
        if denied := auth(authorization, admin=False):
            return denied
        if name not in pools:
            return _problem(404, "Not found", f"unknown pool {name!r}")
        return counted(pools[name])

    @app.patch("/v1/pools/{name}")
    async def patch_pool(name: str, request: Request, authorization: str | None = Header(None)) -> Any:
        if denied := auth(authorization, admin=True):
            return denied
        if name not in pools:
            return _problem(404, "Not found", f"unknown pool {name!r}")
        body = await request.json()
        if body.get("junk_bytes", 0) > 1024 * 1024:
            return _problem(422, "Invalid request", "body.junk_bytes: Value error, expected 0 bytes to 1MiB")
        pools[name].update(body)
        return counted(pools[name])

    @app.get("/v1/users/{user}/sessions")
    def lookup(user: str, include_ended: bool = False, authorization: str | None = Header(None)) -> Any:
        if denied := auth(authorization, admin=False):
            return denied
        found = [
            s
            for s in sessions.values()
            if s["user"].casefold() == user.casefold() and (include_ended or s["state"] != "ended")
        ]
        return {"user": user, "sessions": found}

    @app.get("/v1/sessions")
    def list_sessions(
        state: list[str] = Query(default=["live"]),  # noqa: B008 - FastAPI's way to declare it
        limit: int = 100,
        offset: int = 0,
        authorization: str | None = Header(None),
    ) -> Any:
        if denied := auth(authorization, admin=False):
            return denied
        wanted = set(state)
        if "live" in wanted:
            wanted |= {"pending", "active", "disconnected"}
        found = [s for s in sessions.values() if s["state"] in wanted]
        page = found[offset : offset + limit]
        return {"items": page, "total": len(found), "limit": limit, "offset": offset}

    @app.delete("/v1/sessions/{session_id}")
    def end(session_id: str, authorization: str | None = Header(None)) -> Any:
        if denied := auth(authorization, admin=True):
            return denied
        if session_id not in sessions:
            return _problem(404, "Session not found", f"no session {session_id}")
        sessions[session_id]["state"] = "ended"
        sessions[session_id]["end_reason"] = "operator"
        return sessions[session_id]

    @app.get("/broken")
    def broken() -> Response:
        return Response("<html>oops</html>", status_code=502, media_type="text/html")

    return app


@contextlib.contextmanager
def serve(app: FastAPI, port: int) -> Iterator[str]:
    """Run `app` on 127.0.0.1:port in a thread; yields its base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test API server did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
