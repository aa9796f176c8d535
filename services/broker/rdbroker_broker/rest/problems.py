"""Every error the REST API answers is `application/problem+json` (RFC 9457) with a title and a detail.

The broker's own errors map through one table; FastAPI's validation errors list each bad field; an
unexpected exception is logged and answered as a bare 500 (no internals in the body).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rdbroker_broker import errors
from rdbroker_broker.rest import audited

log = logging.getLogger(__name__)

MEDIA_TYPE = "application/problem+json"

# error class -> (HTTP status, title)
BROKER_ERRORS: dict[type[errors.BrokerError], tuple[int, str]] = {
    errors.NotFound: (404, "Not found"),
    errors.Conflict: (409, "Conflict"),
    errors.InvalidInput: (400, "Invalid input"),
    errors.PermissionDenied: (403, "Forbidden"),
    errors.NoCapacity: (503, "No capacity"),
    errors.Unavailable: (503, "Unavailable"),
    errors.AgentFailed: (502, "Agent failed"),
    errors.AgentTimeout: (504, "Agent timeout"),
}

TITLES = {
    400: "Bad request",
    401: "Authentication required",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    406: "Not acceptable",
    409: "Conflict",
    413: "Request too large",
    415: "Unsupported media type",
    422: "Invalid request",
    500: "Internal error",
    502: "Bad gateway",
    503: "Unavailable",
    504: "Gateway timeout",
}


class ApiError(Exception):
    """An error raised by the REST layer itself (authentication)."""

    def __init__(self, status: int, title: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.headers = headers or {}


def problem(
    request: Request,
    status: int,
    title: str,
    detail: str,
    *,
    headers: dict[str, str] | None = None,
    field_errors: Sequence[dict[str, str]] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
    }
    if field_errors is not None:
        body["errors"] = list(field_errors)
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


def _location(loc: Sequence[Any]) -> str:
    return ".".join(str(part) for part in loc) or "request"


def install(app: FastAPI) -> None:
    @app.exception_handler(errors.BrokerError)
    async def broker_error(request: Request, exc: errors.BrokerError) -> JSONResponse:
        status, title = next(
            (BROKER_ERRORS[k] for k in type(exc).__mro__ if k in BROKER_ERRORS), (500, "Internal error")
        )
        return problem(request, status, title, str(exc))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return problem(request, exc.status, exc.title, exc.detail, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = [
            {"location": _location(e.get("loc", ())), "message": str(e.get("msg", "invalid"))}
            for e in exc.errors()
        ]
        detail = "; ".join(f"{f['location']}: {f['message']}" for f in fields[:5])
        if len(fields) > 5:
            detail += f"; and {len(fields) - 5} more"
        await audited.refused(request, detail)
        return problem(request, 422, TITLES[422], detail, field_errors=fields)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        title = TITLES.get(exc.status_code, "Error")
        detail = exc.detail if isinstance(exc.detail, str) else title
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such resource: {request.url.path}"
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}"
        return problem(request, exc.status_code, title, detail, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after this answer, so the server logs the traceback once; this line says
        # which request it was.
        log.error("unexpected error on %s %s: %s", request.method, request.url.path, type(exc).__name__)
        return problem(request, 500, TITLES[500], "the broker failed to answer; see its log")
