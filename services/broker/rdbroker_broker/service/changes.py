"""Operators' changes: each runs in one transaction with its audit record, and the audit trail."""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from rdbroker_broker import audit
from rdbroker_broker import domain as d
from rdbroker_broker.db.audit_repository import AuditFilter
from rdbroker_broker.service.core import Core
from rdbroker_broker.store import Repos

T = TypeVar("T")


class Change:
    """An operator's change under way, by the caller of the request (`callers.current`). The use case
    calls `record` in its transaction once it has changed something; a call that changed nothing
    stays UNCHANGED (a log line, no record)."""

    def __init__(self, core: Core, action: str, target: str) -> None:
        self.core = core
        self.asked = audit.entry(action, target, audit.UNCHANGED)
        self.entry = self.asked

    async def record(self, r: Repos, detail: str, private: str = "", target: str = "") -> None:
        """Write the record in the change's transaction. `target` names what was changed when the
        request named it otherwise (a pool's name in another case). `private` (a user name) goes in
        the record's detail only, not in the log line: logs are read more widely than this table."""
        self.entry = replace(
            self.entry,
            outcome=audit.OK,
            target=(target or self.entry.target)[: audit.TEXT_CHARS],
            detail=detail[: audit.DETAIL_CHARS],
        )
        stored = "; ".join(part for part in (detail, private) if part)
        await r.audit.add([replace(self.entry, detail=stored[: audit.DETAIL_CHARS])], self.core.now())


async def audited(core: Core, action: str, target: str, work: Callable[[Repos, Change], Awaitable[T]]) -> T:
    """Run an operator's change in a transaction (`run_tx`) and write its audit line however it ends:
    its outcome and detail once committed, or why it was refused or failed (then nothing of it,
    its record included, was kept)."""
    change = Change(core, action, target)

    async def attempt(r: Repos) -> T:
        change.entry = change.asked  # a retried transaction starts over
        return await work(r, change)

    try:
        result = await core.run_tx(attempt)
    except Exception as exc:
        detail = audit.failure_detail(exc)[: audit.DETAIL_CHARS]
        audit.write_log(replace(change.asked, outcome=audit.outcome_of(exc), detail=detail))
        raise
    audit.write_log(change.entry)
    return result


def _shown(value: Any) -> str:
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return repr(value) if value == "" else str(value)


def described(thing: Any, names: Sequence[str]) -> str:
    """`pool default, weight 100, ...`: the fields of a new server, for its audit record."""
    return ", ".join(f"{name} {_shown(getattr(thing, name))}" for name in names)


def differences(old: Any, new: Any, names: Sequence[str]) -> str:
    """`weight 100 -> 50, admin_state enabled -> draining`: what a change changed ("" for nothing)."""
    return ", ".join(
        f"{name} {_shown(getattr(old, name))} -> {_shown(getattr(new, name))}"
        for name in names
        if getattr(old, name) != getattr(new, name)
    )


class AuditTrail:
    def __init__(self, core: Core) -> None:
        self.core = core

    async def audit_trail(
        self, filters: AuditFilter, limit: int, before: int | None = None
    ) -> list[d.AuditEntry]:
        """Operators' changes, newest first: at most `limit`, with ids below `before` when given."""

        async def work(r: Repos) -> list[d.AuditEntry]:
            return await r.audit.page(filters, limit, before)

        return await self.core.run_tx(work)
