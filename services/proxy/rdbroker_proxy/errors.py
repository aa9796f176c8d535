"""Why a client connection could not be routed.

ProxyError
├── RouteRefused        the broker answered with an error: refuse this client (not retried)
└── BrokerUnavailable   no broker answered within the Route deadline: close the client
"""

from __future__ import annotations

import grpc


class ProxyError(Exception):
    """Base of the proxy's own errors."""


class RouteRefused(ProxyError):
    """The broker refused the route (PERMISSION_DENIED, NOT_FOUND, RESOURCE_EXHAUSTED, ...)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @property
    def end_reason(self) -> str:
        return f"refused_{self.code.name.lower()}"


class BrokerUnavailable(ProxyError):
    """Every broker failed or timed out within the deadline."""

    end_reason = "broker_unavailable"
