"""The agent's plain-text answers: one line, never cached."""

from __future__ import annotations

from collections.abc import Mapping

from starlette.responses import PlainTextResponse, Response

NO_STORE = {"Cache-Control": "no-store"}


def plain_text(status: int, line: str, headers: Mapping[str, str] | None = None) -> Response:
    return PlainTextResponse(f"{line}\n", status, headers={**NO_STORE, **(headers or {})})
