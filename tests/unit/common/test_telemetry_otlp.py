"""OTLP export, end to end: `telemetry.setup` runs once per process, so a child process sets it up
against a tiny OTLP/gRPC collector served here (127.0.0.1:0), and the collector must receive its span."""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

CHILD = textwrap.dedent(
    """
    import sys
    from opentelemetry import trace
    from rdbroker_common import telemetry

    handle = telemetry.setup("rdbroker-otlp-check", otlp_endpoint=sys.argv[1])
    with trace.get_tracer("check").start_as_current_span("otlp-check") as span:
        span.set_attribute("check.value", 42)
    handle.shutdown()  # flushes the batch processor: the span is exported before the exit
    """
)


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    async def Export(self, request, context):
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> dict[str, tuple[str, dict[str, object]]]:
        """Span name -> (service.name, attributes), over everything received."""
        found: dict[str, tuple[str, dict[str, object]]] = {}
        for request in self.requests:
            for resource_spans in request.resource_spans:
                resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        attributes = {a.key: a.value.int_value for a in span.attributes}
                        found[span.name] = (resource.get("service.name", ""), attributes)
        return found


@pytest.mark.parametrize("how", ["setting", "environment"])
async def test_spans_reach_an_otlp_collector(how: str) -> None:
    collector = Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    if how == "environment":  # setup("", ...) falls back to the standard variable
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
        endpoint = ""
    try:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CHILD,
            endpoint,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            _, err = await asyncio.wait_for(child.communicate(), 60)
        except TimeoutError:
            child.kill()
            await child.wait()
            raise
    finally:
        await server.stop(0)
    assert child.returncode == 0, err.decode(errors="replace")
    spans = collector.spans()
    assert "otlp-check" in spans, (spans, err.decode(errors="replace"))
    assert spans["otlp-check"] == ("rdbroker-otlp-check", {"check.value": 42})
