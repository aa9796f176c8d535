"""Who is calling: the identity a request authenticated as, for authorization and the audit trail.

The gRPC interceptor (rpc/authz.py) and the REST auth dependency (rest/auth.py) set `current` for the
call; use cases that change the directory read it to write their audit record. Outside any request
(`rdbroker apply`, tests) the caller is whoever `use_caller` names, or `UNKNOWN`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

# Roles of the gRPC API (docs/security.md): what each may call is in rpc/authz.py.
PROXY, HEALTH, ADMIN = "proxy", "health", "admin"
ROLES = (PROXY, HEALTH, ADMIN)


@dataclass(frozen=True, slots=True)
class Caller:
    actor: str  # "token:admin", "spiffe://corp.example/rdbroker/admin", "open-api", "cli:alice@host", ...
    client: str = ""  # peer address ("ipv4:10.0.0.7:51234", "10.0.0.7"), "" when local
    role: str = ""  # one of ROLES for gRPC callers, "read"/"admin" for REST, "" when not applicable


UNKNOWN = Caller("unknown")

current: ContextVar[Caller] = ContextVar("rdbroker_caller", default=UNKNOWN)


@contextlib.contextmanager
def use_caller(caller: Caller) -> Iterator[Caller]:
    """Run the block as `caller` (restored after)."""
    token = current.set(caller)
    try:
        yield caller
    finally:
        current.reset(token)
