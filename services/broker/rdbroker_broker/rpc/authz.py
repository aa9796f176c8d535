"""Which role may call which Broker RPC, and the interceptor that checks it (docs/security.md).

Least privilege: each role calls only its own methods. Proxies route and report connections; health
replicas claim probe targets and report what they found; everything else (reads of the directory,
server state, ending sessions, and reflection when it is on) is the admin's.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager

from rdbroker_broker import callers
from rdbroker_broker.config import BrokerSettings
from rdbroker_common import rpc_authz, tls
from rdbroker_proto.v1 import broker_pb2

SERVICE = broker_pb2.DESCRIPTOR.services_by_name["Broker"].full_name

_ROLES = {
    callers.PROXY: (
        "Route",
        "RouteStream",
        "ConnectionOpened",
        "ConnectionClosed",
        "ReportConnections",
        "ProxyHeartbeat",
    ),
    callers.HEALTH: ("ClaimProbeTargets", "ReportProbeResults", "ReportServerSessions"),
    callers.ADMIN: ("LookupUserSessions", "ListServers", "SetServerState", "EndSession"),
}
METHOD_ROLES: Mapping[str, str] = {
    f"/{SERVICE}/{name}": role for role, names in _ROLES.items() for name in names
}


def policy(settings: BrokerSettings) -> rpc_authz.Policy:
    """Raises ValueError on a partial TLS setting (as the server credentials would)."""
    return rpc_authz.Policy(
        methods=METHOD_ROLES,
        tokens=settings.grpc_tokens,
        mtls=tls.is_enabled(settings.tls_ca, settings.tls_cert, settings.tls_key),
        trust_domain=settings.grpc_trust_domain,
        default_role=callers.ADMIN,
        server="the broker",
    )


def _bind(identity: rpc_authz.Identity) -> AbstractContextManager[object]:
    # The use cases read `callers.current` for the audit trail.
    return callers.use_caller(
        callers.Caller(actor=identity.actor, client=identity.client, role=identity.role)
    )


def interceptor(settings: BrokerSettings) -> rpc_authz.AuthzInterceptor:
    return rpc_authz.AuthzInterceptor(policy(settings), bind=_bind)


def exposure_refusal(settings: BrokerSettings) -> str | None:
    """Why the broker may not serve gRPC as configured (open on a non-loopback address), or None."""
    return rpc_authz.exposure_refusal(
        settings.grpc_listen,
        policy(settings),
        insecure=settings.insecure_grpc,
        token_names="RDBROKER_GRPC_PROXY_TOKEN, RDBROKER_GRPC_HEALTH_TOKEN and RDBROKER_GRPC_ADMIN_TOKEN",
    )
