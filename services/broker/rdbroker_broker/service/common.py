"""What several use cases share: input checks, a pool's account rules, and finding a pool by name."""

from __future__ import annotations

from typing import cast

from sqlalchemy import Column, String

from rdbroker_broker import accounts
from rdbroker_broker import domain as d
from rdbroker_broker.db import routing_sql
from rdbroker_broker.db.tables import connections, proxies, sessions
from rdbroker_broker.errors import Conflict, InvalidInput, NotFound
from rdbroker_broker.store import Repos


def _column_chars(*columns: Column[str]) -> int:
    """The smallest VARCHAR size among the columns a value is stored in: taken from the tables so a
    check and its column cannot drift apart."""
    return min(cast(String, column.type).length or MAX_ID_CHARS for column in columns)


# Stored ids are bounded by their columns; ids that are only looked up (session ids) by MAX_ID_CHARS.
MAX_ID_CHARS = 256
CONNECTION_ID_CHARS = _column_chars(
    sessions.c.connection_id, sessions.c.origin_connection_id, connections.c.connection_id
)
PROXY_ID_CHARS = _column_chars(sessions.c.proxy_id, connections.c.proxy_id, proxies.c.proxy_id)


def require(name: str, value: str, limit: int = MAX_ID_CHARS) -> None:
    if not value:
        raise InvalidInput(f"{name} is required")
    if len(value) > limit:
        raise InvalidInput(f"{name} is too long ({len(value)} characters, at most {limit})")
    if any(ord(ch) < 0x20 for ch in value):
        raise InvalidInput(f"{name} contains control characters")


def pool_rules(pool: d.Pool) -> accounts.Rules:
    """The account rules of a pool's settings."""
    return accounts.Rules.of(pool.domain, pool.upn_suffixes)


_NO_ACCOUNTS: tuple[tuple[str, str], accounts.Rules] = (("", ""), accounts.NO_RULES)


class PoolAccounts:
    """Pools' account settings as last read, by the pool name a Route names ("" = the default): the
    Route statements need the canonical key before they read the pool, and check them."""

    def __init__(self) -> None:
        self._known: dict[str, tuple[tuple[str, str], accounts.Rules]] = {}

    def for_pool(self, pool: str) -> tuple[tuple[str, str], accounts.Rules]:
        return self._known.get(pool.casefold(), _NO_ACCOUNTS)

    def remember(self, pool_asked: str, pool: d.Pool) -> bool:
        """Remember the pool's account settings; False when they differ from what was used."""
        stored = routing_sql.account_settings(pool)
        known = self.for_pool(pool_asked)[0]
        if stored != known:
            self._known[pool_asked.casefold()] = (stored, pool_rules(pool))
        return stored == known


def unknown_pool(pool: str) -> NotFound:
    return NotFound(
        f"unknown pool {pool!r}"
        if pool
        else "no default pool: apply a farm file with a pool marked `default: true`"
    )


async def pool_named(r: Repos, name: str) -> d.Pool:
    """The pool called `name` (case-insensitively), or the default pool for ""."""
    found = await r.pools.resolve(name)
    if found is None:
        raise NotFound(
            f"unknown pool {name!r}" if name else "there is no default pool: apply a farm file first"
        )
    return found


def newer_session(session_id: str) -> Conflict:
    return Conflict(f"session {session_id} has ended and its user has a newer session")
