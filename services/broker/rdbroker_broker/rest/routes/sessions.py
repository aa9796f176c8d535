"""Sessions: where is a user, the session list, ending a session, and actions on a user's session
through its server's agent (logoff, disconnect, message: session_actions.py)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request

from rdbroker_broker import domain as d
from rdbroker_broker import session_actions
from rdbroker_broker.agents import AgentCaller
from rdbroker_broker.rest import audited, auth
from rdbroker_broker.rest.schemas import (
    PRINTABLE,
    MessageIn,
    Problem,
    SessionActionOut,
    SessionOut,
    SessionPageOut,
    UserSessionsOut,
)
from rdbroker_broker.service import BrokerService
from rdbroker_broker.service.sessions import SessionFilter

router = APIRouter(prefix="/v1", tags=["sessions"])


def _service(request: Request) -> BrokerService:
    service: BrokerService = request.app.state.service
    return service


SessionId = Annotated[str, Path(min_length=1, max_length=64, pattern=PRINTABLE)]
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
    found = await _service(request).find_user_sessions(user, pool, include_ended)
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
    filters = SessionFilter(pool=pool, server=server, user=user, states=_states(state or ["live"]))
    page = await _service(request).list_sessions(filters, limit, offset)
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


# The agent's answers, beside the errors every route documents.
AGENT_RESPONSES: dict[int | str, dict[str, Any]] = {
    502: {"model": Problem, "description": "the server's agent refused, could not, or was unreachable"},
    504: {"model": Problem, "description": "the server's agent did not answer in time"},
}


async def _act(
    request: Request, session_id: str, action: session_actions.Action, text: str = ""
) -> SessionActionOut:
    agents: AgentCaller = request.app.state.agents
    done = await session_actions.act_on_session(request.app.state.service, agents, session_id, action, text)
    return SessionActionOut.of(done)


@router.post(
    "/sessions/{session_id}/logoff",
    dependencies=[auth.Admin, audited.action("session.logoff")],
    summary="Log the user's session off its server",
    responses=AGENT_RESPONSES,
)
async def logoff_session(request: Request, session_id: SessionId) -> SessionActionOut:
    """The session's server's agent logs the user's session off (their programs end); the directory
    then ends the session `logged_off`. 409 when the session is not live or its server has no
    `sessions_url` (no agent to ask); 502/504 with the agent's reason when it cannot."""
    return await _act(request, session_id, "logoff")


@router.post(
    "/sessions/{session_id}/disconnect",
    dependencies=[auth.Admin, audited.action("session.disconnect")],
    summary="Disconnect the user's session (it stays on its server)",
    responses=AGENT_RESPONSES,
)
async def disconnect_session(request: Request, session_id: SessionId) -> SessionActionOut:
    """The agent closes the user's connection; the session stays on the server for the user to come
    back to (the directory learns `disconnected` from the proxy and the agent's next list)."""
    return await _act(request, session_id, "disconnect")


@router.post(
    "/sessions/{session_id}/message",
    dependencies=[auth.Admin, audited.action("session.message")],
    summary="Show the user a message in their session",
    responses=AGENT_RESPONSES,
)
async def message_session(request: Request, session_id: SessionId, body: MessageIn) -> SessionActionOut:
    """The agent shows `text` in the user's session (Windows `msg`, xmessage on xrdp)."""
    return await _act(request, session_id, "message", body.text)
