"""Sessions: where is a user, the session list, ending a session."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request

from rdbroker_broker import domain as d
from rdbroker_broker import service as use_cases
from rdbroker_broker.rest import audited, auth
from rdbroker_broker.rest.schemas import PRINTABLE, SessionOut, SessionPageOut, UserSessionsOut

router = APIRouter(prefix="/v1", tags=["sessions"])

StateFilter = Literal["pending", "active", "disconnected", "ended", "live"]
PoolQuery = Annotated[str, Query(max_length=128, pattern=PRINTABLE, description="pool name")]
MAX_PAGE = 500
MAX_OFFSET = 10_000_000


def _states(values: list[StateFilter]) -> tuple[d.SessionState, ...]:
    states: set[d.SessionState] = set()
    for value in values:
        states |= set(d.LIVE_STATES) if value == "live" else {d.SessionState(value)}
    return tuple(sorted(states, key=list(d.SessionState).index))


@router.get("/users/{user}/sessions", dependencies=[auth.Read], summary="Where is this user?")
async def user_sessions(
    request: Request,
    user: Annotated[str, Path(min_length=1, max_length=256, pattern=PRINTABLE, examples=["alice"])],
    pool: PoolQuery = "",
    include_ended: Annotated[bool, Query(description="add recent ended sessions")] = False,
) -> UserSessionsOut:
    """The user's live sessions (their server), newest first, found by any spelling of the account
    (`DOMAIN\\user`, bare, UPN, mstsc's 9-character cuts; docs/accounts.md). An unknown user has none."""
    found = await use_cases.find_user_sessions(request.app.state.service, user, pool, include_ended)
    return UserSessionsOut(user=user, sessions=[SessionOut.of(s) for s in found])


@router.get("/sessions", dependencies=[auth.Read], summary="List sessions")
async def list_sessions(
    request: Request,
    pool: PoolQuery = "",
    server: Annotated[str, Query(max_length=255, pattern=PRINTABLE, description="server address")] = "",
    user: Annotated[str, Query(max_length=256, pattern=PRINTABLE)] = "",
    state: Annotated[list[StateFilter] | None, Query(description="repeatable; default live")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> SessionPageOut:
    """Sessions matching every filter, oldest first, a page at a time."""
    filters = use_cases.SessionFilter(pool=pool, server=server, user=user, states=_states(state or ["live"]))
    page = await use_cases.list_sessions(request.app.state.service, filters, limit, offset)
    return SessionPageOut(
        items=[SessionOut.of(s) for s in page.items], total=page.total, limit=limit, offset=offset
    )


@router.delete(
    "/sessions/{session_id}",
    dependencies=[auth.Admin, audited.action("session.end")],
    summary="End a session",
)
async def end_session(
    request: Request, session_id: Annotated[str, Path(min_length=1, max_length=64, pattern=PRINTABLE)]
) -> SessionOut:
    """The directory forgets the placement (the user is placed anew next time); the user is not
    logged off the terminal server. Ending an ended session answers it unchanged."""
    session = await request.app.state.service.end_session(session_id, "operator")
    return SessionOut.of(session)
