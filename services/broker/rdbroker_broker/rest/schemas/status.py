"""This broker's status: its version, readiness and database."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field


class DatabaseStatusOut(BaseModel):
    state: Literal["up", "down"] = Field(description="as this broker's calls find it")
    since: datetime = Field(description="when the state last changed (or the broker started)")
    last_error: str | None = Field(description="the last failure to reach the database (no password)")
    last_error_at: datetime | None


class StatusOut(BaseModel):
    """This broker process: what it runs, and whether it reaches its database."""

    version: str = Field(examples=["0.1.0"])
    schema_revision: str | None = Field(description="the schema revision found at start (at head)")
    ready: bool = Field(description="what /readyz answers: false only while shutting down")
    database: DatabaseStatusOut
