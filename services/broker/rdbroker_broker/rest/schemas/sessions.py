"""Sessions: where a user's session is, and what the user's server's agent did to it."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from rdbroker_broker import domain as d
from rdbroker_broker.rest.schemas.common import PRINTABLE
from rdbroker_broker.session_actions import MAX_TEXT as MAX_MESSAGE
from rdbroker_broker.session_actions import ActionResult

SessionStateName = Literal["pending", "active", "disconnected", "ended"]


class SessionOut(BaseModel):
    id: str
    user: str = Field(description='"" when the client sent no user name')
    pool: str
    server_address: str
    state: SessionStateName
    created_at: datetime
    updated_at: datetime
    disconnected_at: datetime | None
    expires_at: datetime | None
    end_reason: str
    confirmed: bool = Field(description="the server's agent listed the user there; false: a claim so far")

    @classmethod
    def of(cls, s: d.Session) -> SessionOut:
        return cls(
            id=s.session_id,
            user=s.user,
            pool=s.pool,
            server_address=s.server_address,
            state=s.state.value,
            created_at=s.created_at,
            updated_at=s.updated_at,
            disconnected_at=s.disconnected_at if s.state is d.SessionState.DISCONNECTED else None,
            expires_at=s.expires_at,
            end_reason=s.end_reason,
            confirmed=s.confirmed,
        )


class MessageIn(BaseModel):
    """A message for the user's session."""

    model_config = ConfigDict(extra="forbid")
    text: str = Field(
        min_length=1, max_length=MAX_MESSAGE, pattern=PRINTABLE, examples=["The server restarts at 18:00."]
    )


class SessionActionOut(BaseModel):
    """What the session's server's agent did, and the session as the directory holds it afterwards."""

    action: Literal["logoff", "disconnect", "message"]
    server_address: str
    server_user: str = Field(description="the user as the server knows them")
    server_sessions: list[str] = Field(description="the server's ids of the sessions acted on")
    detail: str = Field(description="the agent's account of what it did")
    session: SessionOut

    @classmethod
    def of(cls, done: ActionResult) -> SessionActionOut:
        return cls(
            action=done.action,
            server_address=done.server,
            server_user=done.agent.user,
            server_sessions=list(done.agent.sessions),
            detail=done.agent.detail,
            session=SessionOut.of(done.session),
        )


class UserSessionsOut(BaseModel):
    user: str
    sessions: list[SessionOut]


class SessionPageOut(BaseModel):
    items: list[SessionOut]
    total: int = Field(description="sessions matching the filters, on every page")
    limit: int
    offset: int
