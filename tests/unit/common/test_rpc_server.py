"""Every rdbroker gRPC server answers grpc.health.v1; server reflection only when asked."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from rdbroker_common.rpc_server import add_standard_services, mark_serving

NAME = "rdbroker.v1.Broker"


async def test_health_and_reflection_are_served() -> None:
    server = grpc.aio.server()
    servicer = add_standard_services(server, [NAME], reflection=True)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            # Not serving until the service says so (readiness follows start-up).
            before = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert before.status != health_pb2.HealthCheckResponse.SERVING
            await mark_serving(servicer, [NAME])
            for name in ("", NAME):
                answer = await health.Check(health_pb2.HealthCheckRequest(service=name))
                assert answer.status == health_pb2.HealthCheckResponse.SERVING

            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = reflect.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            names = set()
            async for reply in replies:
                names |= {s.name for s in reply.list_services_response.service}
            assert {NAME, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names

            await servicer.enter_graceful_shutdown()
            after = await health.Check(health_pb2.HealthCheckRequest(service=NAME))
            assert after.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await server.stop(None)


async def test_reflection_is_off_by_default() -> None:
    server = grpc.aio.server()
    add_standard_services(server, [NAME])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in replies:
                    pass
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(None)
