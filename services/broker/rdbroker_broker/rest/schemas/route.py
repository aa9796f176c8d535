"""Route explain: what a Route of a user would meet now."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from rdbroker_broker.rest.schemas.common import PlacementName
from rdbroker_broker.rest.schemas.sessions import SessionOut


class AssignmentOut(BaseModel):
    rule: int = Field(description="the matching rule's position in `assignments:` (1 = first); 0 for none")
    match: str = Field(description='what the rule matches, like "user CORP\\\\fin-* and network 10.0.0.0/8"')
    rules: int = Field(description="how many assignment rules there are")
    consulted: bool = Field(
        description="false: the client named a pool (its load-balance info, a collection)"
    )


class CandidateOut(BaseModel):
    address: str
    effective_load: float = Field(description="load (or sessions against the limit) by weight, as ranked")
    load: int = Field(description="0..100 as last reported, -1 if never (or stale)")
    held_sessions: int
    max_sessions: int = Field(description="0 = no limit")
    weight: int


class UnavailableOut(BaseModel):
    address: str
    why: str = Field(description="down, draining, maintenance, weight 0, load 100 or full")


class ExplainOut(BaseModel):
    """What a Route of this user would meet now; nothing was placed or written."""

    user: str
    client: str = Field(description='the client IP address as read; "" for none')
    pool_asked: str = Field(description='the pool the client named (its load-balance info); "" for none')
    assignment: AssignmentOut
    pool: str
    placement: PlacementName
    account_key: str = Field(description="the user's account key in the pool (docs/accounts.md)")
    decision: Literal["reconnect", "new", "none"] = Field(
        description="reconnect to a live session, a new session, or none (no server can take one)"
    )
    server: str = Field(description='where a Route would send the user now; "" for nowhere')
    why: str
    notes: list[str] = Field(description="what else a Route would do or meet on the way")
    session: SessionOut | None = Field(description="the user's live session in the pool")
    candidates: list[CandidateOut] = Field(description="servers taking new sessions, best first (top 5)")
    eligible: int = Field(description="how many servers of the pool take new sessions")
    unavailable: list[UnavailableOut]
