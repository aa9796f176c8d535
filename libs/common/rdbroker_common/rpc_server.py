"""What every rdbroker gRPC server carries: the standard health service, and server reflection when asked."""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection as grpc_reflection


class _StartingHealthServicer(health.aio.HealthServicer):  # type: ignore[misc]  # untyped package
    """grpc's servicer answers SERVING for "" from birth; ours waits for `mark_serving`, so a
    Kubernetes readiness probe (which asks for "") does not pass before start-up is done."""

    def __init__(self) -> None:
        super().__init__()
        self._server_status[""] = health_pb2.HealthCheckResponse.NOT_SERVING


def add_standard_services(
    server: grpc.aio.Server, service_names: Iterable[str], *, reflection: bool = False
) -> health.aio.HealthServicer:
    """Register grpc.health.v1 (NOT_SERVING until `mark_serving`) and, with `reflection`
    (`--grpc-reflection`), server reflection: off by default, it describes every RPC to any caller.

    Returns the health servicer so the caller can `enter_graceful_shutdown()` on SIGTERM.
    """
    names = list(service_names)
    servicer = _StartingHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    if reflection:
        grpc_reflection.enable_server_reflection(
            [*names, health.SERVICE_NAME, grpc_reflection.SERVICE_NAME], server
        )
    return servicer


async def mark_serving(servicer: health.aio.HealthServicer, service_names: Iterable[str]) -> None:
    for name in ["", *service_names]:
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
