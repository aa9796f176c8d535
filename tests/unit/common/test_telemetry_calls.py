"""Trace context on gRPC calls without interceptors (`traced_unary`), and the interceptors' fast path
when nothing exports: the context still crosses, with no client span in between."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry import trace

from rdbroker_common import telemetry as tel
from tests.support.postgres import free_port

CHECK = "grpc.health.v1.Health/Check"


class _Capture(grpc.aio.ServerInterceptor):
    """Keeps the traceparent of every call the server receives."""

    def __init__(self) -> None:
        self.traceparents: list[str] = []

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        metadata = dict(details.invocation_metadata or ())
        self.traceparents.append(str(metadata.get("traceparent", "")))
        return await continuation(details)


@asynccontextmanager
async def health_server() -> AsyncIterator[tuple[str, _Capture]]:
    capture = _Capture()
    server = grpc.aio.server(interceptors=[capture])
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", capture
    finally:
        await server.stop(None)


@contextmanager
def not_exporting(handle: tel.Telemetry) -> Iterator[None]:
    assert handle.sampler is not None
    handle.sampler.exporting = False
    try:
        yield
    finally:
        handle.sampler.exporting = True


def span_id_of(traceparent: str) -> tuple[int, int]:
    _, trace_id, span_id, _ = traceparent.split("-")
    return int(trace_id, 16), int(span_id, 16)


async def test_traced_unary_records_a_client_span_whose_context_the_server_receives(telemetry) -> None:
    _, exporter = telemetry
    exporter.clear()
    assert tel.recording()
    async with health_server() as (address, capture), grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        with trace.get_tracer("test").start_as_current_span("connection") as root:
            reply = await tel.traced_unary(
                CHECK, lambda metadata: stub.Check(health_pb2.HealthCheckRequest(), metadata=metadata)
            )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    [client] = [s for s in exporter.get_finished_spans() if s.name == CHECK]
    assert client.kind == trace.SpanKind.CLIENT
    assert client.parent is not None
    assert client.parent.span_id == root.get_span_context().span_id
    assert client.attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
    [sent] = capture.traceparents
    assert span_id_of(sent) == (client.context.trace_id, client.context.span_id)


async def test_traced_unary_marks_a_failed_call_and_raises(telemetry) -> None:
    _, exporter = telemetry
    exporter.clear()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{free_port()}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await tel.traced_unary(
                CHECK,
                lambda metadata: stub.Check(health_pb2.HealthCheckRequest(), timeout=5, metadata=metadata),
            )
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    [client] = [s for s in exporter.get_finished_spans() if s.name == CHECK]
    assert client.status.status_code == trace.StatusCode.ERROR
    assert client.status.description == "UNAVAILABLE"
    assert client.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]


async def test_without_an_exporter_the_context_crosses_with_no_client_span(telemetry) -> None:
    handle, _ = telemetry
    async with (
        health_server() as (address, capture),
        grpc.aio.insecure_channel(address) as plain,
        grpc.aio.insecure_channel(address, interceptors=tel.client_interceptors()) as intercepted,
    ):
        with not_exporting(handle), trace.get_tracer("test").start_as_current_span("connection") as root:
            assert not tel.recording()
            assert not root.is_recording()
            stub = health_pb2_grpc.HealthStub(plain)
            await tel.traced_unary(
                CHECK, lambda metadata: stub.Check(health_pb2.HealthCheckRequest(), metadata=metadata)
            )
            await health_pb2_grpc.HealthStub(intercepted).Check(health_pb2.HealthCheckRequest())
    context = root.get_span_context()
    assert context.is_valid
    # Both calls carry the current span itself: no (dropped) client span was made in between.
    assert [span_id_of(t) for t in capture.traceparents] == [(context.trace_id, context.span_id)] * 2
    assert all(int(t[-2:], 16) & 1 == 0 for t in capture.traceparents)  # flagged unsampled


async def test_the_server_interceptor_continues_the_callers_context_without_a_span(telemetry) -> None:
    handle, exporter = telemetry
    seen: list[trace.SpanContext] = []

    class Servicer(health.aio.HealthServicer):  # type: ignore[misc]
        async def Check(self, request: Any, context: Any) -> Any:
            seen.append(trace.get_current_span().get_span_context())
            return await super().Check(request, context)

    server = grpc.aio.server(interceptors=tel.server_interceptors())
    health_pb2_grpc.add_HealthServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    exporter.clear()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            with not_exporting(handle), trace.get_tracer("test").start_as_current_span("connection") as root:
                await tel.traced_unary(
                    CHECK, lambda metadata: stub.Check(health_pb2.HealthCheckRequest(), metadata=metadata)
                )
            await tel.traced_unary(
                CHECK, lambda metadata: stub.Check(health_pb2.HealthCheckRequest(), metadata=metadata)
            )
    finally:
        await server.stop(None)
    # Not exporting: the handler runs in the caller's context (log lines keep its trace id).
    assert seen[0].trace_id == root.get_span_context().trace_id
    assert seen[0].span_id == root.get_span_context().span_id
    # Exporting again: a server span of its own.
    [server_span] = [s for s in exporter.get_finished_spans() if s.kind == trace.SpanKind.SERVER]
    assert seen[1].span_id == server_span.context.span_id


def test_start_span_records_through_the_sdk_while_exporting(telemetry) -> None:
    _, exporter = telemetry
    exporter.clear()
    span = tel.start_span(trace.get_tracer("test"), "rdp.connection", kind=trace.SpanKind.SERVER)
    assert span.is_recording()
    span.end()
    [finished] = exporter.get_finished_spans()
    assert (finished.name, finished.kind) == ("rdp.connection", trace.SpanKind.SERVER)


def test_start_span_without_an_exporter_is_an_unsampled_span_of_a_new_or_current_trace(telemetry) -> None:
    handle, exporter = telemetry
    exporter.clear()
    tracer = trace.get_tracer("test")
    with not_exporting(handle):
        first, second = tel.start_span(tracer, "a"), tel.start_span(tracer, "b", attributes={"x": 1})
        with trace.use_span(first):
            child = tel.start_span(tracer, "c")
    spans = [first, second, child]
    assert not any(s.is_recording() for s in spans)
    contexts = [s.get_span_context() for s in spans]
    assert all(c.is_valid and not c.trace_flags.sampled for c in contexts)
    assert contexts[0].trace_id != contexts[1].trace_id  # each root starts its own trace
    assert contexts[2].trace_id == contexts[0].trace_id  # a child keeps the current one
    assert len({c.span_id for c in contexts}) == 3
    for span in spans:
        span.end()
    assert exporter.get_finished_spans() == ()
