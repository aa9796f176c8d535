"""Which change a route makes, for the audit line of a request refused before its use case ran.

The use cases write the audit line of every change they are asked for (`service.changes.audited`); a
request FastAPI refuses as invalid (422) never reaches them, so the error handler writes that line, by
the action the route declares with `action(...)`.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Depends, Request

from rdbroker_broker import audit

# Where a route's target is when the request is refused: its path parameter, or for a new server the
# body's address.
_TARGET_PARAMS = ("address", "name", "session_id")


def action(name: str) -> Any:
    """A route dependency naming the change the route makes (after the auth dependency: a refused
    token is the auth layer's answer, not an audited attempt)."""

    async def mark(request: Request) -> None:
        request.state.audit_action = name

    return Depends(mark)


async def refused(request: Request, detail: str) -> None:
    """The audit line of a change request refused as invalid; nothing when the route makes no change."""
    name = getattr(request.state, "audit_action", None)
    if name is None:
        return
    target = next((str(request.path_params[p]) for p in _TARGET_PARAMS if p in request.path_params), "")
    if not target:
        target = await _body_address(request)
    audit.write_log(audit.entry(name, target, audit.INVALID, detail))


async def _body_address(request: Request) -> str:
    """The `address` a refused body named, if it named one (FastAPI has read and kept the body)."""
    try:
        body = json.loads(await request.body())
    except (ValueError, RuntimeError):  # not JSON, or the body was not kept
        return ""
    address = body.get("address") if isinstance(body, dict) else None
    return address if isinstance(address, str) else ""
