"""The REST application (docs/api.md): lookups and operator actions under `/v1`, the dashboard at `/`,
OpenAPI at `/docs`, and the probes `/healthz` (alive) and `/readyz` (serving, not shutting down).

Every page and its files come from the broker itself, under the headers of rest/headers.py
(docs/security.md, "Web pages and the REST API").
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp

from rdbroker_broker.agents import AgentCaller
from rdbroker_broker.rest import problems
from rdbroker_broker.rest.guard import RequestGuard
from rdbroker_broker.rest.headers import SecurityHeaders
from rdbroker_broker.rest.routes import audit, history, pools, route, servers, sessions, status
from rdbroker_broker.rest.schemas import Problem
from rdbroker_broker.service import BrokerService

log = logging.getLogger(__name__)

DASHBOARD = Path(__file__).resolve().parent / "dashboard"
# Swagger UI's files (swagger-ui-dist, vendored: see apidocs/README.md) and the page that starts it.
API_DOCS = Path(__file__).resolve().parent / "apidocs"

# Documented on every route, so clients (and schemathesis) know the error shape.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": Problem, "content": {problems.MEDIA_TYPE: {}}, "description": problems.TITLES[status]}
    for status in (400, 401, 403, 404, 409, 422, 503)
}

DESCRIPTION = """The session directory of rdbroker: where each user's RDP session is, the terminal servers
with their health and load, and the operator's actions on them. Send `Authorization: Bearer <token>`
(the read token reads, the admin token also changes) unless the broker has no tokens configured.
Errors are `application/problem+json` (RFC 9457)."""


PROBE_PATHS = frozenset({"/healthz", "/readyz"})


def _is_probe(scope: MutableMapping[str, Any]) -> bool:
    return scope.get("path") in PROBE_PATHS


class BrokerApp(FastAPI):
    """FastAPI with SecurityHeaders outside its whole stack: Starlette's ServerErrorMiddleware, which
    answers a 500, sits outside every middleware `add_middleware` installs."""

    def build_middleware_stack(self) -> ASGIApp:
        return SecurityHeaders(super().build_middleware_stack())


def create_app(
    service: BrokerService, *, schema_revision: str | None = None, agents: AgentCaller | None = None
) -> FastAPI:
    """`schema_revision`: what the broker found at start (shown by `/v1/status`); `agents`: how session
    actions reach the servers' agents (default: the settings' agent token and TLS; ValueError if they
    cannot be used)."""
    app = BrokerApp(
        title="rdbroker",
        version="1",
        description=DESCRIPTION,
        # FastAPI's own /docs page loads Swagger UI from a CDN and starts it with an inline script;
        # _api_docs serves the same UI from the broker's files.
        docs_url=None,
        redoc_url=None,
        responses=ERROR_RESPONSES,
        # FastAPI's own OpenTelemetry: a server span per request, without the kubelet's probes and
        # without a span per dependency/endpoint/serialization step (docs/contracts.md, Telemetry).
        telemetry={"exclude": _is_probe, "operation_spans": False},
    )
    app.state.service = service
    app.state.settings = service.settings
    app.state.schema_revision = schema_revision
    app.state.agents = agents if agents is not None else AgentCaller.from_settings(service.settings)
    app.state.stopping = False
    problems.install(app)
    # Outermost: a refused browser request reaches no route (see rest/guard.py).
    app.add_middleware(RequestGuard, open_api=not service.settings.api_tokens_configured)
    for router in (
        sessions.router,
        servers.router,
        pools.router,
        route.router,
        history.router,
        audit.router,
        status.router,
    ):
        app.include_router(router)
    _probes(app)
    _dashboard(app)
    _api_docs(app)
    if not service.settings.api_tokens_configured:
        log.warning(
            "REST API has no tokens: anyone on this host may use it; listening on loopback only (%s), "
            "answering only loopback Host names",
            service.settings.http_listen,
        )
    return app


def set_stopping(app: FastAPI) -> None:
    """The broker is shutting down: `/readyz` answers 503 from now on."""
    app.state.stopping = True


def _probes(app: FastAPI) -> None:
    @app.get("/healthz", tags=["probes"], summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["probes"], summary="The broker serves (not shutting down)", response_model=None)
    async def readyz(request: Request) -> JSONResponse | dict[str, str]:
        """Ready while the process serves: its listeners are up (this answers) and the schema was at
        head when it started (else it would not have). Not a database ping: a PostgreSQL failover would
        take every broker out of its Service at once, though each answers again the moment the database
        is back. The database's state is in `/v1/status` and `rdbroker_database_up`."""
        if app.state.stopping:
            return problems.problem(request, 503, problems.TITLES[503], "the broker is shutting down")
        return {"status": "ready"}


def _dashboard(app: FastAPI) -> None:
    """Static files, no build step; the page calls the API with the token the browser holds."""
    app.mount("/dashboard", StaticFiles(directory=DASHBOARD), name="dashboard")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(DASHBOARD / "index.html", headers={"Cache-Control": "no-cache"})


def _api_docs(app: FastAPI) -> None:
    app.mount("/docs/assets", StaticFiles(directory=API_DOCS / "assets"), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> FileResponse:
        return FileResponse(API_DOCS / "index.html", headers={"Cache-Control": "no-cache"})
