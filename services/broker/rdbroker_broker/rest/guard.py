"""Browser-borne requests the bearer tokens alone do not stop.

- With no token configured the API is open to this host, and so to any web page a browser on this host
  shows. A DNS-rebinding page reaches it under its own name, so an open API answers only requests whose
  `Host` is a loopback name or address (421 otherwise).
- A body-less POST is a "simple" cross-site request a page may send without asking: a change whose
  `Origin` is not the API's own, or that the browser marks `Sec-Fetch-Site: cross-site`, is refused (403),
  tokens or not. Clients that are not browsers (the CLI, curl, the proxies) send neither header.
"""

from __future__ import annotations

import ipaddress

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from rdbroker_broker.rest.problems import MEDIA_TYPE

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def host_name(host: str) -> str:
    """The name or address of a `Host` header, without its port and brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback_host(host: str) -> bool:
    name = host_name(host).rstrip(".")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class RequestGuard:
    """ASGI middleware applying the two checks above before any route runs."""

    def __init__(self, app: ASGIApp, *, open_api: bool) -> None:
        self.app = app
        self.open_api = open_api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, title, detail = refusal
        body = {
            "type": "about:blank",
            "title": title,
            "status": status,
            "detail": detail,
            "instance": scope.get("path", ""),
        }
        await JSONResponse(body, status_code=status, media_type=MEDIA_TYPE)(scope, receive, send)

    def _refusal(self, scope: Scope) -> tuple[int, str, str] | None:
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if self.open_api and not is_loopback_host(host):
            return (
                421,
                "Misdirected request",
                f"this broker's API has no tokens, so it answers only to a loopback Host "
                f"(127.0.0.1, localhost, [::1]), not {host[:100]!r}",
            )
        if scope.get("method", "GET") in SAFE_METHODS:
            return None
        if headers.get("sec-fetch-site", "").lower() == "cross-site":
            return 403, "Cross-site request refused", "a page from another site may not change this broker"
        origin = headers.get("origin")
        own = f"{scope.get('scheme', 'http')}://{host}".lower()
        if origin is not None and origin.strip().lower() != own:
            return (
                403,
                "Cross-site request refused",
                f"a change from origin {origin[:100]!r} is refused; "
                f"only the API's own origin ({own[:100]}) may send one",
            )
        return None
