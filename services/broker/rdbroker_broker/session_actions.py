"""An operator's action on a user's session, carried out by the session's server's agent: log it off,
disconnect it, or show it a message (`POST /v1/sessions/{id}/logoff|disconnect|message`, docs/api.md).

1. The directory names the session's user and server (one transaction): 404 for an unknown session,
   409 for one that is not live, has no user name, or whose server has no agent to ask (agents.py).
2. The server's agent is asked, outside any transaction (it may take seconds): the agent finds the
   user's session on its host and acts, or says why it cannot (502; 504 when it does not answer).
3. What was done is recorded (one transaction): the audit row, and after a logoff the session is ended
   `logged_off` at once, as the agent's next session list would have it. A disconnect and a message
   change nothing in the directory: the proxy reports the closed connection, the agent's next list the
   disconnected state.

Each request writes one audit line however it ends (`session.logoff`, `session.disconnect`,
`session.message`); a row only when the agent did it. The message's text is in the row, not the line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rdbroker_broker import audit
from rdbroker_broker import domain as d
from rdbroker_broker.agents import AgentAnswer, AgentCaller, action_url
from rdbroker_broker.errors import Conflict, InvalidInput, NotFound
from rdbroker_broker.service import BrokerService
from rdbroker_broker.service.changes import Change, audited
from rdbroker_broker.store import Repos

Action = Literal["logoff", "disconnect", "message"]
MAX_TEXT = 500  # characters of a message (the agent's bound too)
ACTIONS: tuple[Action, ...] = ("logoff", "disconnect", "message")


@dataclass(frozen=True)
class ActionResult:
    session: d.Session  # as the directory holds it afterwards
    action: Action
    server: str
    agent: AgentAnswer


def check_text(action: Action, text: str) -> str:
    if action != "message":
        return ""
    text = text.strip()
    if not text or len(text) > MAX_TEXT or not text.isprintable():
        raise InvalidInput(f"text must be one line of 1..{MAX_TEXT} printable characters")
    return text


async def act_on_session(
    service: BrokerService, agents: AgentCaller, session_id: str, action: Action, text: str = ""
) -> ActionResult:
    name = f"session.{action}"
    try:
        text = check_text(action, text)
        session, url = await service.run_tx(lambda r: _target(r, session_id, action))
        answer = await agents.act(url, action, session.user, text)
    except Exception as exc:
        audit.refused(name, session_id, exc)
        raise

    async def record(r: Repos, change: Change) -> d.Session:
        where = f"on {session.server_address} (pool {session.pool}): {answer.detail}"
        private = f"user {session.user}" + (f", text {text!r}" if text else "")
        if action == "logoff":
            await r.sessions.end(session_id, "logged_off", service.now())
        await change.record(r, where, private=private)
        after = await r.sessions.get(session_id)
        return after if after is not None else session

    after = await audited(service, name, session_id, record)
    return ActionResult(after, action, session.server_address, answer)


async def _target(r: Repos, session_id: str, action: Action) -> tuple[d.Session, str]:
    """The live session and its agent's URL for `action`."""
    if not session_id or len(session_id) > 64:
        raise InvalidInput("session_id is required (at most 64 characters)")
    session = await r.sessions.get(session_id)
    if session is None:
        raise NotFound(f"unknown session {session_id!r}")
    if session.state not in d.LIVE_STATES:
        why = f" ({session.end_reason})" if session.end_reason else ""
        raise Conflict(f"session {session_id} is {session.state.value}{why}: there is nothing to {action}")
    if not session.user:
        raise Conflict(
            f"session {session_id} has no user name (its client sent none): its server's agent cannot find it"
        )
    server = await r.servers.get(session.server_address)
    if server is None:
        raise Conflict(f"session {session_id}'s server {session.server_address} is no longer registered")
    return session, action_url(server.sessions_url, action, server.address)
