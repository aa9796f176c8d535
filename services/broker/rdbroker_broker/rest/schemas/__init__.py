"""The REST API's JSON shapes (docs/api.md): pydantic models, converted from `domain` only here.
One module per resource; the names routes use are re-exported here."""

from __future__ import annotations

from rdbroker_broker.rest.schemas.audit import AuditEntryOut, AuditPageOut
from rdbroker_broker.rest.schemas.common import PRINTABLE, AdminStateName, PlacementName
from rdbroker_broker.rest.schemas.drains import DrainIn, DrainOut
from rdbroker_broker.rest.schemas.history import HistoryMinuteOut, HistoryOut
from rdbroker_broker.rest.schemas.pools import PoolOut, PoolPatch, PoolsOut
from rdbroker_broker.rest.schemas.problem import FieldError, Problem
from rdbroker_broker.rest.schemas.route import AssignmentOut, CandidateOut, ExplainOut, UnavailableOut
from rdbroker_broker.rest.schemas.servers import (
    AgentStateName,
    HealthName,
    PowerName,
    ServerIn,
    ServerOut,
    ServerPatch,
    ServersOut,
    SessionStatesOut,
)
from rdbroker_broker.rest.schemas.sessions import (
    MessageIn,
    SessionActionOut,
    SessionOut,
    SessionPageOut,
    SessionStateName,
    UserSessionsOut,
)
from rdbroker_broker.rest.schemas.status import DatabaseStatusOut, StatusOut

__all__ = [
    "PRINTABLE",
    "AdminStateName",
    "AgentStateName",
    "AssignmentOut",
    "AuditEntryOut",
    "AuditPageOut",
    "CandidateOut",
    "DatabaseStatusOut",
    "DrainIn",
    "DrainOut",
    "ExplainOut",
    "FieldError",
    "HealthName",
    "HistoryMinuteOut",
    "HistoryOut",
    "MessageIn",
    "PlacementName",
    "PoolOut",
    "PoolPatch",
    "PoolsOut",
    "PowerName",
    "Problem",
    "ServerIn",
    "ServerOut",
    "ServerPatch",
    "ServersOut",
    "SessionActionOut",
    "SessionOut",
    "SessionPageOut",
    "SessionStateName",
    "SessionStatesOut",
    "StatusOut",
    "UnavailableOut",
    "UserSessionsOut",
]
