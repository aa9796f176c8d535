"""Drains until empty: what an operator asks of a server, and how far the drain has got."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from rdbroker_broker import domain as d
from rdbroker_broker.drains import MAX_LOGOFF_AFTER_S
from rdbroker_broker.rest.schemas.common import PRINTABLE, AdminStateName
from rdbroker_broker.session_actions import MAX_TEXT as MAX_MESSAGE


class DrainIn(BaseModel):
    """A drain until empty: message the users, log off sessions disconnected this long, and move the
    server to `then` once it holds no sessions."""

    model_config = ConfigDict(extra="forbid")
    notify: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_MESSAGE,
        pattern=PRINTABLE,
        description="sent once to each user with an active session (null: no message)",
        examples=["This server restarts at 18:00: please save your work and log off."],
    )
    logoff_disconnected_after_s: float | None = Field(
        default=None,
        ge=0,
        le=MAX_LOGOFF_AFTER_S,
        description="log off sessions disconnected for this long (null: leave them to expire)",
        examples=[1800],
    )
    then: Literal["maintenance", "draining"] = Field(
        default="maintenance", description="the server's state once it holds no sessions"
    )


class DrainOut(BaseModel):
    """A server's latest drain until empty and its progress."""

    server_address: str
    step: Literal["starting", "messaging", "waiting", "done", "cancelled"]
    running: bool
    then: AdminStateName
    notify: str
    logoff_disconnected_after_s: float | None
    started_at: datetime
    started_by: str
    updated_at: datetime | None
    finished_at: datetime | None
    sessions_left: int = Field(description="live sessions on the server at the last pass")
    active: int
    disconnected: int
    messaged: int = Field(description="sessions sent the message")
    logged_off: int = Field(description="disconnected sessions logged off")
    errors: int = Field(description="failed agent actions (each is tried again later)")
    last_error: str
    next_logoff_at: datetime | None = Field(description="when the next disconnected session is due")
    detail: str

    @classmethod
    def of(cls, drain: d.Drain) -> DrainOut:
        return cls(
            server_address=drain.server_address,
            step=drain.step.value,
            running=drain.running,
            then=drain.then_state.value,
            notify=drain.notify_text,
            logoff_disconnected_after_s=drain.logoff_after_s,
            started_at=drain.started_at,
            started_by=drain.started_by,
            updated_at=drain.updated_at,
            finished_at=drain.finished_at,
            sessions_left=drain.sessions_left,
            active=drain.active,
            disconnected=drain.disconnected,
            messaged=drain.messaged,
            logged_off=drain.logged_off,
            errors=drain.errors,
            last_error=drain.last_error,
            next_logoff_at=drain.next_logoff_at,
            detail=drain.detail,
        )
