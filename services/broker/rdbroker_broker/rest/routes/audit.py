"""The audit trail: operators' changes to the directory, newest first (admin only)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from rdbroker_broker.db.audit_repository import AuditFilter
from rdbroker_broker.rest import auth
from rdbroker_broker.rest.schemas import PRINTABLE, AuditEntryOut, AuditPageOut
from rdbroker_broker.service import BrokerService

router = APIRouter(prefix="/v1", tags=["audit"])

MAX_PAGE = 1000
MAX_ID = 2**63 - 1  # the column is a BIGINT


@router.get("/audit", dependencies=[auth.Admin], summary="The audit trail")
async def audit_trail(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    before: Annotated[
        int | None, Query(ge=1, le=MAX_ID, description="only entries older than this id")
    ] = None,
    action: Annotated[str, Query(max_length=64, pattern=PRINTABLE, examples=["server.drain"])] = "",
    target: Annotated[str, Query(max_length=255, pattern=PRINTABLE)] = "",
    actor: Annotated[str, Query(max_length=255, pattern=PRINTABLE, examples=["token:admin"])] = "",
) -> AuditPageOut:
    """Changes operators made (REST, CLI, gRPC admin calls, `rdbroker apply`), newest first, a page at a
    time; filters match exactly. Refused and failed attempts are in the broker's log only."""
    filters = AuditFilter(action=action, target=target, actor=actor)
    service: BrokerService = request.app.state.service
    found = await service.audit_trail(filters, limit + 1, before)
    items = [AuditEntryOut.of(entry) for entry in found[:limit]]
    return AuditPageOut(items=items, next_before=items[-1].id if len(found) > limit else None)
