"""OpenTelemetry set-up shared by every service: traces, metrics, and their way across gRPC.

`setup()` runs once per process (a second call returns the same providers, so `rdbroker up`, which runs
several services in one process, and tests that do the same share one pipeline). Traces and metrics go
out by OTLP when an endpoint is set (`RDBROKER_OTLP_ENDPOINT` or the standard
`OTEL_EXPORTER_OTLP_ENDPOINT`); metrics are also served for Prometheus when `metrics_listen` is set.
Trace context crosses gRPC in the request metadata (W3C `traceparent`), through the interceptors below.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind, Status, StatusCode, TraceState
from opentelemetry.util.types import Attributes

from rdbroker_common.settings import split_host_port

log = logging.getLogger(__name__)

T = TypeVar("T")
# Resolved once: `trace.get_tracer` per call costs more than the span (it builds an InstrumentationScope).
_grpc_tracer = trace.get_tracer("rdbroker.grpc")


class RecordWhenExported(Sampler):
    """Sample with `inner` (the SDK's default, or OTEL_TRACES_SAMPLER) once an exporter is attached;
    until then drop every span, so a process that exports nothing does not pay to record spans.
    Trace context still crosses gRPC either way (dropped spans keep valid, unsampled contexts)."""

    def __init__(self, inner: Sampler) -> None:
        self.inner = inner
        self.exporting = False

    def should_sample(
        self,
        parent_context: otel_context.Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        if not self.exporting:
            return SamplingResult(Decision.DROP)
        return self.inner.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"RecordWhenExported{{{self.inner.get_description()}}}"


@dataclass
class Telemetry:
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    metrics_port: int | None = None
    sampler: RecordWhenExported | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_span_exporter(self, exporter: SpanExporter, *, batch: bool = False) -> None:
        """Add an exporter (tests use an in-memory one, synchronously); spans are recorded from now on."""
        processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
        self.tracer_provider.add_span_processor(processor)
        if self.sampler is not None:
            self.sampler.exporting = True

    def shutdown(self) -> None:
        with self._lock:
            self.tracer_provider.force_flush()
            self.meter_provider.force_flush()


_current: Telemetry | None = None
_setup_lock = threading.Lock()


def otlp_endpoint_from(setting: str) -> str:
    return setting or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")


def setup(
    service_name: str,
    *,
    otlp_endpoint: str = "",
    metrics_listen: str = "",
    extra_metric_readers: tuple[MetricReader, ...] = (),
) -> Telemetry:
    """Install the process's tracer and meter providers (once) and answer them."""
    global _current
    with _setup_lock:
        if _current is not None:
            return _current
        resource = Resource.create({"service.name": service_name})
        # The sampler the SDK would pick (OTEL_TRACES_SAMPLER, else parent-based always-on).
        sampler = RecordWhenExported(TracerProvider(shutdown_on_exit=False).sampler)
        tracer_provider = TracerProvider(resource=resource, sampler=sampler)
        readers: list[MetricReader] = list(extra_metric_readers)
        endpoint = otlp_endpoint_from(otlp_endpoint)
        if endpoint:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
            sampler.exporting = True
            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=endpoint)))
        metrics_port = None
        if metrics_listen:
            metrics_port = _start_prometheus(metrics_listen, readers)
        meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        trace.set_tracer_provider(tracer_provider)
        metrics.set_meter_provider(meter_provider)
        _current = Telemetry(tracer_provider, meter_provider, metrics_port, sampler)
        return _current


def current() -> Telemetry | None:
    return _current


def recording() -> bool:
    """Whether spans are recorded now. False until `setup()`'s pipeline has an exporter: then the gRPC
    helpers below skip their spans (which would be dropped) and only pass the trace context on."""
    handle = _current
    if handle is None or handle.sampler is None:
        return True  # a tracer provider we did not set up: trace as it says
    return handle.sampler.exporting


_ids = RandomIdGenerator()


def start_span(tracer: trace.Tracer, name: str, **options: Any) -> trace.Span:
    """`tracer.start_span(name, **options)`, or, while spans are not recorded, the unsampled span the
    SDK would give for it without asking the SDK: its sampler call and copies cost ~5% of the CPU of
    a set-up in `rdbroker up`. The span keeps the current trace (or starts one), so its context still
    crosses gRPC and names the trace in log lines."""
    if recording():
        return tracer.start_span(name, **options)
    parent = trace.get_current_span().get_span_context()
    trace_id = parent.trace_id if parent.is_valid else _ids.generate_trace_id()
    state = parent.trace_state if parent.is_valid else None
    return trace.NonRecordingSpan(
        trace.SpanContext(trace_id, _ids.generate_span_id(), is_remote=False, trace_state=state)
    )


def context_metadata() -> grpc.aio.Metadata:
    """The current trace context as gRPC metadata (W3C `traceparent`, through the configured propagator).

    A Metadata object, not a tuple: grpc.aio converts a tuple after a slow `typing.Sequence` check."""
    return grpc.aio.Metadata(*context_carrier().items())


def context_carrier() -> dict[str, str]:
    """The current trace context as a dict (`traceparent`, `tracestate`), for a message field."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


async def traced_unary(method: str, call: Callable[[grpc.aio.Metadata], Awaitable[T]]) -> T:
    """Run `call(metadata)`, a unary gRPC call, as the client interceptor would: in a client span when
    spans are recorded, its context in the metadata. For hot paths: grpc.aio's interceptor machinery
    costs about 100 us of CPU per call even when it does nothing."""
    return await traced_call(method, lambda carrier: call(grpc.aio.Metadata(*carrier.items())))


async def traced_call(method: str, call: Callable[[dict[str, str]], Awaitable[T]]) -> T:
    """Run `call(carrier)` in a client span when spans are recorded, the span's context in `carrier`: for a
    call that carries its trace context itself (a Route call inside a RouteStream message). A failure
    that is a gRPC status (AioRpcError) is the span's status."""
    if not recording():
        return await call(context_carrier())
    with _grpc_tracer.start_as_current_span(
        method, kind=SpanKind.CLIENT, record_exception=False, set_status_on_exception=False
    ) as span:
        try:
            result = await call(context_carrier())
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            span.set_status(Status(StatusCode.ERROR, code.name))
            raise
        span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.OK.value[0])
        return result


@contextlib.contextmanager
def server_span(method: str, carrier: Mapping[str, str]) -> Iterator[None]:
    """Continue the caller's trace from `carrier` in a server span (when spans are recorded), as the
    server interceptor does for a unary call: for calls carried inside a stream's messages."""
    token = otel_context.attach(propagate.extract(carrier))
    try:
        if not recording():  # the caller's context stays current, for the log lines' trace id
            yield
            return
        with _grpc_tracer.start_as_current_span(method, kind=SpanKind.SERVER):
            yield
    finally:
        otel_context.detach(token)


def _start_prometheus(listen: str, readers: list[MetricReader]) -> int:
    """Serve /metrics for Prometheus on `listen` (host:port; port 0 picks one). Answers the bound port."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import start_http_server

    host, port = split_host_port(listen)
    readers.append(PrometheusMetricReader())
    server, _thread = start_http_server(port, addr=host)
    bound = int(server.server_address[1])
    log.info("prometheus metrics on http://%s:%d/metrics", host, bound)
    return bound


# --- gRPC: trace context in metadata ------------------------------------------------------------


class _ClientTracing(grpc.aio.UnaryUnaryClientInterceptor):
    """A client span per call, its context injected into the call's metadata."""

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        if not recording():  # no span to make: only carry the context on
            return await continuation(_with_context(client_call_details), request)
        method = _method_name(client_call_details.method)
        with _grpc_tracer.start_as_current_span(method, kind=SpanKind.CLIENT) as span:
            call = await continuation(_with_context(client_call_details), request)
            code = await call.code()
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code != grpc.StatusCode.OK:
                span.set_status(Status(StatusCode.ERROR, code.name))
            return call


def _with_context(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    carrier = context_metadata()
    if not carrier:
        return details
    return grpc.aio.ClientCallDetails(
        details.method,
        details.timeout,
        grpc.aio.Metadata(*(details.metadata or ()), *carrier),
        details.credentials,
        details.wait_for_ready,
    )


class _ServerTracing(grpc.aio.ServerInterceptor):
    """Continue the caller's trace in a server span around each unary call."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        method = _method_name(handler_call_details.method)
        carrier = {
            key: value
            for key, value in (handler_call_details.invocation_metadata or ())
            if isinstance(value, str)
        }

        async def behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            with server_span(method, carrier):
                return await inner(request, context)  # type: ignore[arg-type]

        return grpc.unary_unary_rpc_method_handler(
            behavior,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _method_name(method: str | bytes) -> str:
    text = method.decode() if isinstance(method, bytes) else method
    return text.lstrip("/")


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Pass as `interceptors=` to `grpc.aio.insecure_channel` / `secure_channel`."""
    return [_ClientTracing()]


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """Pass as `interceptors=` to `grpc.aio.server`."""
    return [_ServerTracing()]
