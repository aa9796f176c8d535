"""Route explain: which pool and server a Route would give a user now, and why (reads only)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from rdbroker_broker import explain
from rdbroker_broker.rest import auth
from rdbroker_broker.rest.schemas import (
    PRINTABLE,
    AssignmentOut,
    CandidateOut,
    ExplainOut,
    SessionOut,
    UnavailableOut,
)

router = APIRouter(prefix="/v1", tags=["route"])


def _out(e: explain.Explanation) -> ExplainOut:
    rule = e.match.rule
    return ExplainOut(
        user=e.user,
        client=e.client,
        pool_asked=e.pool_asked,
        assignment=AssignmentOut(
            rule=e.match.position,
            match=rule.describe() if rule is not None else "",
            rules=e.rules,
            consulted=not e.pool_asked,
        ),
        pool=e.pool.name,
        placement=e.pool.placement.value,
        account_key=e.account_key,
        decision=e.decision,
        server=e.server,
        why=e.why,
        notes=e.notes,
        session=SessionOut.of(e.session) if e.session is not None else None,
        candidates=[
            CandidateOut(
                address=s.address,
                effective_load=load,
                load=s.load,
                held_sessions=s.held_sessions,
                max_sessions=s.max_sessions,
                weight=s.weight,
            )
            for s, load in e.candidates
        ],
        eligible=e.eligible,
        unavailable=[UnavailableOut(address=s.address, why=why) for s, why in e.unavailable],
    )


@router.get("/route/explain", dependencies=[auth.Read], summary="Explain a user's route")
async def explain_route(
    request: Request,
    user: Annotated[
        str,
        Query(min_length=1, max_length=256, pattern=PRINTABLE, description="user name as a client sends it"),
    ],
    client: Annotated[
        str,
        Query(max_length=64, pattern=PRINTABLE, description="client address: 10.20.1.5, [2001:db8::5]:50123"),
    ] = "",
    pool: Annotated[
        str,
        Query(
            max_length=128,
            pattern=PRINTABLE,
            description="the pool the client names (its load-balance info, a collection)",
        ),
    ] = "",
) -> ExplainOut:
    """Which assignment rule a connection of `user` from `client` meets (when it names no `pool`),
    which pool it goes to, and which server the routing policy would pick now: the user's live
    session (a reconnect), or the placement ranking with its best candidates and why the other
    servers take no new sessions. Nothing is placed or written; a Route a moment later may answer
    otherwise (other users placed meanwhile, a new load report)."""
    return _out(await explain.explain_route(request.app.state.service, user, client, pool))
