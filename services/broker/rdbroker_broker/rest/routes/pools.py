"""Pools (farms, collections)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from rdbroker_broker import service as use_cases
from rdbroker_broker.rest import auth
from rdbroker_broker.rest.schemas import PoolOut, PoolsOut

router = APIRouter(prefix="/v1", tags=["pools"])


@router.get("/pools", dependencies=[auth.Read], summary="List pools")
async def list_pools(request: Request) -> PoolsOut:
    summaries = await use_cases.pool_summaries(request.app.state.service)
    return PoolsOut(
        pools=[
            PoolOut(
                name=s.pool.name,
                default=s.pool.is_default,
                disconnect_timeout_s=s.pool.disconnect_timeout_s,
                servers=s.servers,
                live_sessions=s.live_sessions,
            )
            for s in summaries
        ]
    )
