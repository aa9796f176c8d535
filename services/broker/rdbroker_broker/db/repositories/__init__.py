"""Queries on pools, servers, sessions and connections. Repositories take a connection inside the
caller's transaction, return domain objects, and never commit (the use case owns the transaction).
One module per concept:

pools            PoolRepository: find, list, create or change, delete
servers          ServerRepository: read, lock for a placement, health results, register, remove
sessions         SessionRepository: the reads (the Route's context among them), with the two below
session_changes  claims, opened/disconnected/ended, relabel and re-key, the agents' word
session_sweeps   the sweep and proxies' heartbeats: expiry, silent proxies, unlisted connections, purge
connections      ConnectionRepository: each attempt's answer, opened/closed reports, purge
rows             what all share: live states, the dialect's upsert, rows read into domain objects
"""

from rdbroker_broker.db.repositories.connections import ConnectionRepository
from rdbroker_broker.db.repositories.pools import PoolRepository
from rdbroker_broker.db.repositories.rows import (
    LIVE,
    SERVER_COLUMNS,
    SESSION_COLUMNS,
    pool_from_row,
    server_from_row,
    session_from_row,
    upsert,
)
from rdbroker_broker.db.repositories.servers import NEVER_SESSIONS, ServerRepository
from rdbroker_broker.db.repositories.session_changes import new_session_id
from rdbroker_broker.db.repositories.session_sweeps import NEWS_LOST
from rdbroker_broker.db.repositories.sessions import SessionRepository

__all__ = [
    "LIVE",
    "NEVER_SESSIONS",
    "NEWS_LOST",
    "SERVER_COLUMNS",
    "SESSION_COLUMNS",
    "ConnectionRepository",
    "PoolRepository",
    "ServerRepository",
    "SessionRepository",
    "new_session_id",
    "pool_from_row",
    "server_from_row",
    "session_from_row",
    "upsert",
]
