"""The directory's history for the dashboard: logons and refusals per minute over the last hours."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from rdbroker_broker import history
from rdbroker_broker.rest import auth
from rdbroker_broker.rest.schemas import HistoryMinuteOut, HistoryOut

router = APIRouter(prefix="/v1", tags=["history"])


@router.get("/history", dependencies=[auth.Read], summary="Logons and refusals per minute")
async def get_history(
    request: Request,
    hours: Annotated[int, Query(ge=1, le=history.MAX_HOURS, description="how far back")] = 3,
) -> HistoryOut:
    """First Route answers per minute over the last `hours` (the current minute included), by how
    the user was routed, from the directory's record of Route answers (kept `RDBROKER_RETENTION_S`),
    and the Route calls refused, as the brokers have written them (each at its sweep)."""
    found = await history.logon_history(request.app.state.service, hours)
    minutes = [
        HistoryMinuteOut(
            at=m.at,
            logons=m.logons,
            refused=m.refused,
            refusals=m.refusals,
            **{reason: m.answers.get(reason, 0) for reason in history.REASONS},
        )
        for m in found.minutes
    ]
    return HistoryOut(hours=hours, since=found.since, until=found.until, minutes=minutes)
