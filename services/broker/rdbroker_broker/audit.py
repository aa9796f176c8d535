"""The operators' audit trail (docs/security.md, Audit trail).

Every change an operator asks for (REST, CLI, gRPC admin calls, `rdbroker apply`) writes one log line
`{"event": "audit", "action", "target", "actor", "client", "outcome", "detail"}` however it ended; a change
that was made is also a row of the `audit` table, written by the use case in the change's own transaction
(so neither lands without the other).
"""

from __future__ import annotations

import json
import logging
import re

from rdbroker_broker import callers, errors
from rdbroker_broker.domain import AuditEntry

log = logging.getLogger("rdbroker_broker.audit")
# Audit lines are written whatever level the rest of the broker logs at.
log.setLevel(logging.INFO)

# Outcomes. A row is only ever written with OK: the others are log lines only.
OK = "ok"
UNCHANGED = "unchanged"  # accepted, but the directory already was so (ending an ended session)
NOT_FOUND = "not_found"
CONFLICT = "conflict"
INVALID = "invalid"  # refused input: 400 or 422 on REST, INVALID_ARGUMENT on gRPC
DENIED = "denied"
REFUSED = "refused"  # `rdbroker apply` refused the plan (nothing of it was applied)
UNAVAILABLE = "unavailable"  # the database (or the broker) could not make it now
AGENT_FAILED = "agent_failed"  # the server's agent refused, could not, or did not answer
ERROR = "error"  # an unexpected failure; the broker's log has the traceback

# The audit table's column sizes (db/tables.py): a longer value is cut, never refused.
ACTION_CHARS, TEXT_CHARS, OUTCOME_CHARS, DETAIL_CHARS = 64, 255, 32, 1024

_OUTCOMES: tuple[tuple[type[Exception], str], ...] = (
    (errors.NotFound, NOT_FOUND),
    (errors.Conflict, CONFLICT),
    (errors.InvalidInput, INVALID),
    (errors.PermissionDenied, DENIED),
    (errors.Unavailable, UNAVAILABLE),
    (errors.NoCapacity, UNAVAILABLE),
    (errors.AgentFailed, AGENT_FAILED),
)
_BARE = re.compile(r"[^\s\"'=\\\x00-\x1f\x7f]+")


def outcome_of(exc: BaseException) -> str:
    return next((outcome for kind, outcome in _OUTCOMES if isinstance(exc, kind)), ERROR)


def failure_detail(exc: BaseException) -> str:
    """What a failed change's line says: a broker error's message is safe to show, anything else
    only by its type (a driver's message may quote SQL and values)."""
    return str(exc) if isinstance(exc, errors.BrokerError) else type(exc).__name__


def entry(
    action: str, target: str, outcome: str, detail: str = "", caller: callers.Caller | None = None
) -> AuditEntry:
    """An entry for the current caller (`callers.current`), its fields cut to their columns."""
    who = caller or callers.current.get()
    return AuditEntry(
        action=action[:ACTION_CHARS],
        target=target[:TEXT_CHARS],
        actor=who.actor[:TEXT_CHARS],
        client=who.client[:TEXT_CHARS],
        outcome=outcome[:OUTCOME_CHARS],
        detail=detail[:DETAIL_CHARS],
    )


def _shown(value: str) -> str:
    """A value in the text line: bare when it is one plain word, else JSON-quoted (control characters
    escaped), so one line stays one line and `key=value` pairs stay apart."""
    return value if _BARE.fullmatch(value) else json.dumps(value, ensure_ascii=False)


def write_log(item: AuditEntry) -> None:
    """The audit line: its fields as `extra` (JSON format) and as `key=value` in the message (text)."""
    fields = {
        "action": item.action,
        "target": item.target,
        "actor": item.actor,
        "client": item.client,
        "outcome": item.outcome,
    }
    shown = fields | {"detail": item.detail} if item.detail else fields
    text = " ".join(f"{key}={_shown(value)}" for key, value in shown.items())
    log.info("audit %s", text, extra={"event": "audit", **fields, "detail": item.detail})


def refused(action: str, target: str, exc: BaseException, caller: callers.Caller | None = None) -> None:
    """Log a change that did not happen, with why."""
    write_log(entry(action, target, outcome_of(exc), failure_detail(exc), caller))
