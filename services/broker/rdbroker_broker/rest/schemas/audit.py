"""The audit trail: the changes made, newest first."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from rdbroker_broker import domain as d


class AuditEntryOut(BaseModel):
    id: int
    at: datetime
    actor: str = Field(
        description="`token:admin`, `open-api`, a certificate's SPIFFE ID, `apply:<user>@<host>`"
    )
    client: str = Field(description='the caller\'s address; "" when local (`rdbroker apply`)')
    action: str = Field(examples=["server.drain"])
    target: str = Field(description="the server's address, the pool's name or the session's id")
    outcome: str = Field(description="`ok`: the change was made (only changes made are stored)")
    detail: str = Field(description="what changed, `weight 100 -> 50`")

    @classmethod
    def of(cls, entry: d.AuditEntry) -> AuditEntryOut:
        assert entry.at is not None  # a stored entry has its time
        return cls(
            id=entry.id,
            at=entry.at,
            actor=entry.actor,
            client=entry.client,
            action=entry.action,
            target=entry.target,
            outcome=entry.outcome,
            detail=entry.detail,
        )


class AuditPageOut(BaseModel):
    items: list[AuditEntryOut] = Field(description="newest first")
    next_before: int | None = Field(
        description="pass as `before` for the next (older) page; null on the last page"
    )
