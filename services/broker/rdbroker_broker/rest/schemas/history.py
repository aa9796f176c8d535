"""Logon history: Route answers and refusals per minute."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field


class HistoryMinuteOut(BaseModel):
    at: datetime = Field(description="the minute's start (UTC)")
    logons: int = Field(description="first Route answers in the minute: the sum of the four below")
    new: int = Field(description="placed anew by policy")
    reconnect: int = Field(description="sent back to the user's live session")
    token: int = Field(description="sent where a routing token said")
    no_identity: int = Field(description="placed with no user name (no cookie, no token)")
    refused: int = Field(description="Route calls refused (written by each broker at its sweep)")
    refusals: dict[str, int] = Field(
        description="the refused calls by gRPC status, lower case: resource_exhausted (no server can "
        "take the user), not_found, invalid_argument, unavailable, ..."
    )


class HistoryOut(BaseModel):
    hours: int
    since: datetime = Field(description="the first minute's start")
    until: datetime = Field(description="the end of the current minute")
    minutes: list[HistoryMinuteOut] = Field(
        description="oldest first; a minute without any answer or refusal is left out"
    )
