"""Trace context crosses gRPC; metrics reach the Prometheus endpoint; JSON logs carry the trace id."""

from __future__ import annotations

import json
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry import metrics, trace

from rdbroker_common import logs
from rdbroker_common import telemetry as tel
from tests.support import prom


async def test_one_trace_spans_client_and_server(telemetry) -> None:
    _, exporter = telemetry
    exporter.clear()
    server = grpc.aio.server(interceptors=tel.server_interceptors())
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", interceptors=tel.client_interceptors()
        ) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            with trace.get_tracer("test").start_as_current_span("connection") as root:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""))
    finally:
        await server.stop(None)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    spans = {s.name: s for s in exporter.get_finished_spans()}
    name = "grpc.health.v1.Health/Check"
    assert {"connection", name} <= set(spans)
    trace_id = root.get_span_context().trace_id
    server_span = [
        s for s in exporter.get_finished_spans() if s.name == name and s.kind == trace.SpanKind.SERVER
    ]
    client_span = [
        s for s in exporter.get_finished_spans() if s.name == name and s.kind == trace.SpanKind.CLIENT
    ]
    assert len(server_span) == 1
    assert len(client_span) == 1
    assert server_span[0].context.trace_id == trace_id
    assert client_span[0].context.trace_id == trace_id
    assert server_span[0].parent is not None
    assert server_span[0].parent.span_id == client_span[0].context.span_id


def test_prometheus_endpoint_serves_counters(telemetry) -> None:
    handle, _ = telemetry
    assert handle.metrics_port
    counter = metrics.get_meter("test").create_counter("rdbroker_test_events", description="test")
    counter.add(3, {"kind": "a"})

    assert prom.sample(prom.scrape(handle.metrics_port), "rdbroker_test_events_total", kind="a") == 3
    counter.add(2, {"kind": "a"})
    assert prom.sample(prom.scrape(handle.metrics_port), "rdbroker_test_events_total", kind="a") == 5
    assert prom.sample(prom.scrape(handle.metrics_port), "rdbroker_test_events_total", kind="b") is None


def test_json_log_lines_carry_the_trace_id(telemetry) -> None:
    formatter = logs.JsonFormatter()
    with trace.get_tracer("test").start_as_current_span("work") as span:
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello %s", ("you",), None)
        record.peer = "127.0.0.1:5"
        line = json.loads(formatter.format(record))
    assert line["msg"] == "hello you"
    assert line["peer"] == "127.0.0.1:5"
    assert line["trace_id"] == format(span.get_span_context().trace_id, "032x")


def test_setup_is_once_per_process(telemetry) -> None:
    handle, _ = telemetry
    assert tel.setup("another-name") is handle


def test_spans_are_recorded_only_once_something_exports_them() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON

    sampler = tel.RecordWhenExported(ALWAYS_ON)
    provider = TracerProvider(sampler=sampler, shutdown_on_exit=False)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("dropped") as dropped:
        assert not dropped.is_recording()
        assert dropped.get_span_context().is_valid  # context still crosses gRPC, unsampled
        assert not dropped.get_span_context().trace_flags.sampled
    sampler.exporting = True
    with tracer.start_as_current_span("kept") as kept:
        assert kept.is_recording()
    assert [s.name for s in exporter.get_finished_spans()] == ["kept"]
    assert sampler.get_description() == "RecordWhenExported{AlwaysOnSampler}"


def test_the_session_telemetry_records_because_it_exports(telemetry) -> None:
    handle, _ = telemetry
    assert handle.sampler is not None
    assert handle.sampler.exporting
