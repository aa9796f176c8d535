"""Pools (farms, collections): their settings, server and session counts; changing the settings."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request

from rdbroker_broker.rest import audited, auth
from rdbroker_broker.rest.schemas import PRINTABLE, PoolOut, PoolPatch, PoolsOut
from rdbroker_broker.service import BrokerService
from rdbroker_broker.service.servers import PoolSummary

router = APIRouter(prefix="/v1", tags=["pools"])


def _service(request: Request) -> BrokerService:
    service: BrokerService = request.app.state.service
    return service


PoolPath = Annotated[
    str, Path(min_length=1, max_length=128, pattern=PRINTABLE, description="pool name", examples=["default"])
]


def _out(summary: PoolSummary) -> PoolOut:
    return PoolOut.of(summary.pool, summary.servers, summary.live_sessions)


@router.get("/pools", dependencies=[auth.Read], summary="List pools")
async def list_pools(request: Request) -> PoolsOut:
    summaries = await _service(request).pool_summaries()
    return PoolsOut(pools=[_out(s) for s in summaries])


@router.get("/pools/{name}", dependencies=[auth.Read], summary="One pool")
async def get_pool(request: Request, name: PoolPath) -> PoolOut:
    return _out(await _service(request).pool_summary(name))


@router.patch(
    "/pools/{name}",
    dependencies=[auth.Admin, audited.action("pool.update")],
    summary="Change a pool's settings",
)
async def update_pool(request: Request, name: PoolPath, body: PoolPatch) -> PoolOut:
    """Any subset of the settings, within the farm file's bounds (422 otherwise); 400 when the result
    breaks a rule across settings (UPN suffixes without a domain, `stale_after_ms` not longer than
    the probe interval, `depth` placement with a server that has no `max_sessions`). The next
    `rdbroker apply` of a farm file sets every setting from the file."""
    return _out(await _service(request).update_pool(name, body.changes()))
