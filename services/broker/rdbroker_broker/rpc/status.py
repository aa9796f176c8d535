"""One table from broker errors to gRPC status codes (the REST app has its own for HTTP)."""

from __future__ import annotations

import grpc

from rdbroker_broker import errors

STATUS: dict[type[errors.BrokerError], grpc.StatusCode] = {
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.NoCapacity: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Conflict: grpc.StatusCode.ABORTED,
    errors.AgentFailed: grpc.StatusCode.UNAVAILABLE,
    errors.AgentTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_for(exc: errors.BrokerError) -> grpc.StatusCode:
    for kind in type(exc).__mro__:
        if kind in STATUS:
            return STATUS[kind]
    return grpc.StatusCode.INTERNAL
