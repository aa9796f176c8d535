"""Bearer tokens from the broker's settings: the read token reads, the admin token does everything.

With no token configured the API is open; the settings then refuse a non-loopback `http_listen`, so an
open API is only ever reachable from the broker's own host.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from rdbroker_broker import callers
from rdbroker_broker.config import BrokerSettings
from rdbroker_broker.rest.problems import ApiError

# The audit trail's actors (docs/security.md): which token a request carried, or none at all.
ADMIN_TOKEN, READ_TOKEN, OPEN_API = "token:admin", "token:read", "open-api"
READ_ROLE = "read"

bearer = HTTPBearer(auto_error=False, description="the read or the admin token")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def _matches(given: str, expected: str) -> bool:
    return bool(expected) and hmac.compare_digest(given.encode(), expected.encode())


def _settings(request: Request) -> BrokerSettings:
    settings: BrokerSettings = request.app.state.settings
    return settings


def _authenticated(request: Request, actor: str, role: str) -> None:
    """Who this request is, for the use cases' audit trail (callers.py). Set in the request's own task
    (an async dependency), so the route and the error handlers see it."""
    client = request.client.host if request.client is not None else ""
    callers.current.set(callers.Caller(actor, client, role))


def _check(request: Request, credentials: HTTPAuthorizationCredentials | None, admin: bool) -> None:
    settings = _settings(request)
    read, full = settings.api_read_token_text, settings.api_admin_token_text
    if not read and not full:
        _authenticated(request, OPEN_API, callers.ADMIN)
        return  # open API, loopback only (see BrokerSettings)
    given = credentials.credentials if credentials is not None else ""
    if _matches(given, full):
        _authenticated(request, ADMIN_TOKEN, callers.ADMIN)
        return
    if _matches(given, read):
        if not admin:
            _authenticated(request, READ_TOKEN, READ_ROLE)
            return
        # Some reads are the admin's too (the audit trail): say which kind of request was refused.
        what = "this read" if request.method in ("GET", "HEAD") else "this change"
        raise ApiError(
            403,
            "Admin token required",
            f"{what} needs the admin token; the read token reads the directory only",
        )
    detail = "send `Authorization: Bearer <token>`" if not given else "the token is not valid here"
    raise ApiError(401, "Authentication required", detail, {"WWW-Authenticate": "Bearer"})


async def read_access(request: Request, credentials: Credentials) -> None:
    _check(request, credentials, admin=False)


async def admin_access(request: Request, credentials: Credentials) -> None:
    _check(request, credentials, admin=True)


Read = Depends(read_access)
Admin = Depends(admin_access)
