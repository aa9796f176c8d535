"""This broker process's status: version, schema, readiness and the database as its calls find it."""

from __future__ import annotations

from importlib import metadata

from fastapi import APIRouter, Request

from rdbroker_broker.rest import auth
from rdbroker_broker.rest.schemas import DatabaseStatusOut, StatusOut

router = APIRouter(prefix="/v1", tags=["status"])


def _version() -> str:
    try:
        return metadata.version("rdbroker")
    except metadata.PackageNotFoundError:
        return "unknown"


VERSION = _version()


@router.get("/status", dependencies=[auth.Read], summary="This broker's status")
async def get_status(request: Request) -> StatusOut:
    """Answered from memory (no database call): the database's `state` is what this broker's last
    calls found (its routes, its sweep every few seconds, a ping when idle), so it answers while the
    database does not. Each replica answers for itself."""
    database = request.app.state.service.store.database.snapshot()
    return StatusOut(
        version=VERSION,
        schema_revision=request.app.state.schema_revision,
        ready=not request.app.state.stopping,
        database=DatabaseStatusOut(
            state="up" if database.up else "down",
            since=database.since,
            last_error=database.last_error or None,
            last_error_at=database.last_error_at,
        ),
    )
