"""Security headers on every answer of the REST app: pages, static files, API bodies, errors, refusals.

One policy for all: the pages (the dashboard, `/docs`) load only the broker's own files, so no third-party
script runs in the broker's origin, and no other site may frame them (clickjacking the drain buttons).
On a JSON answer the same policy costs nothing and covers one opened as a document.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        # swagger-ui.css draws its icons as data: SVG images; the dashboard's favicon is `data:,`.
        "img-src 'self' data:",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)

# No Referer anywhere: the pages link nowhere that needs one. Their changes are fetch() calls, which send
# the page's real Origin for the RequestGuard whatever the policy (a plain <form> POST would send
# `Origin: null` under it and be refused; no page posts one).
HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),  # frame-ancestors for browsers that predate it
)


class SecurityHeaders:
    """ASGI middleware adding HEADERS to each response that does not set its own."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                raw = list(message.get("headers", ()))
                present = {bytes(name).lower() for name, _ in raw}
                raw += [(name, value) for name, value in HEADERS if name not in present]
                message["headers"] = raw
            await send(message)

        await self.app(scope, receive, send_with_headers)
