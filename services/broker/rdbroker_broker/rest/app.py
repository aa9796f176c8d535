"""The FastAPI application: `GET /v1/users/{user}/sessions`, `/healthz`, `/readyz`."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from rdbroker_broker import domain as d
from rdbroker_broker import errors
from rdbroker_broker.service import BrokerService

HTTP_STATUS: dict[type[errors.BrokerError], int] = {
    errors.NotFound: 404,
    errors.PermissionDenied: 403,
    errors.NoCapacity: 503,
    errors.InvalidInput: 422,
    errors.Unavailable: 503,
    errors.Conflict: 409,
}


class SessionOut(BaseModel):
    session_id: str
    user: str
    pool: str
    server_address: str
    state: str
    created_at: datetime
    updated_at: datetime
    disconnected_at: datetime | None
    expires_at: datetime | None

    @classmethod
    def of(cls, s: d.Session) -> SessionOut:
        return cls(
            session_id=s.session_id,
            user=s.user,
            pool=s.pool,
            server_address=s.server_address,
            state=s.state.value,
            created_at=s.created_at,
            updated_at=s.updated_at,
            disconnected_at=s.disconnected_at if s.state is d.SessionState.DISCONNECTED else None,
            expires_at=s.expires_at,
        )


class SessionsOut(BaseModel):
    user: str
    sessions: list[SessionOut]


def create_app(service: BrokerService) -> FastAPI:
    app = FastAPI(title="rdbroker", version="1", docs_url="/docs", redoc_url=None)

    @app.exception_handler(errors.BrokerError)
    async def broker_error(_request: Request, exc: errors.BrokerError) -> JSONResponse:
        status = next((HTTP_STATUS[k] for k in type(exc).__mro__ if k in HTTP_STATUS), 500)
        return JSONResponse({"detail": str(exc)}, status_code=status)

    @app.get("/v1/users/{user}/sessions")
    async def user_sessions(
        user: str,
        pool: Annotated[str, Query(max_length=128)] = "",
        include_ended: bool = False,
    ) -> SessionsOut:
        found = await service.lookup_user_sessions(user, pool, include_ended)
        return SessionsOut(user=user, sessions=[SessionOut.of(s) for s in found])

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        try:
            await service.store.ping()
        except errors.Unavailable as exc:
            return JSONResponse({"status": "unavailable", "detail": str(exc)}, status_code=503)
        return JSONResponse({"status": "ready"})

    return app
