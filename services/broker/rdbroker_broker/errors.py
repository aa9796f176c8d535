"""Errors the broker's use cases raise. The edges translate them (rpc/status.py, the REST app).

BrokerError
├── NotFound           unknown pool, server or session
├── PermissionDenied   a routing token naming an address that is not a registered server
├── NoCapacity         no server can take a new session
├── InvalidInput       malformed request fields, farm file errors
├── Unavailable        the database, or the server holding the user's session, cannot be reached
│   ├── DatabaseUnavailable  the database did not answer (the sweep counts these: see BrokerService)
│   ├── Overloaded     the call could not be given a database connection in time (admission.py)
│   └── CapacityStarting  no server takes a new user now, but one is starting: retry for `wait_s`
├── Conflict           the request contradicts the directory (e.g. a second live session)
└── AgentFailed        a server's agent refused or could not carry out a session action, or was unreachable
    └── AgentTimeout   it did not answer in time
"""

from __future__ import annotations


class BrokerError(Exception):
    """Base of every error the broker raises on purpose; the message is safe to show a caller."""


class NotFound(BrokerError):
    pass


class PermissionDenied(BrokerError):
    pass


class NoCapacity(BrokerError):
    pass


class InvalidInput(BrokerError):
    pass


class Unavailable(BrokerError):
    pass


class DatabaseUnavailable(Unavailable):
    pass


class Overloaded(Unavailable):
    pass


class CapacityStarting(Unavailable):
    """The proxy holds the user and retries for up to `wait_s` (the pool's `start_wait`)."""

    def __init__(self, message: str, wait_s: float) -> None:
        super().__init__(message)
        self.wait_s = wait_s


class Conflict(BrokerError):
    pass


class AgentFailed(BrokerError):
    pass


class AgentTimeout(AgentFailed):
    pass
