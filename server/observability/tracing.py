"""OpenTelemetry tracing of inference requests, exported over OTLP/gRPC.

Imported only when `--trace-config mode=opentelemetry` turns tracing on (server.py), so
that a server without it never imports OpenTelemetry; its requests carry no Trace, and
each stage pays one None check.

The spans, all built from the request's timeline stamps where one exists:
- the request (kind SERVER), from `received` to `sent`, a child of the caller's W3C
  `traceparent` when it sent one; attributes model, version, status, protocol, request id;
- `decode`: the data plane's part of taking the request in: resolving its model version,
  checking it and decoding its tensors (as views of the message), handing it to the
  scheduler (the protobuf parse itself runs in gRPC's deserializer, before any span);
- `queue`: from `queued` to its batch's start;
- `batch`: one per batch execution, parented on the first traced request it served and
  linked to every traced request it served;
- `compute`: the backend's call, a child of the batch. For a worker instance it runs in the
  worker process, which is told the batch's traceparent with the batch and sends back when
  the call began and ended; the span is recorded here, so that one exporter in one process
  sends every span (a worker holds no OTLP connection, and a worker that crashes or is
  killed loses nothing already recorded);
- `encode`: the response's encoding, in the front door;
- `step N`: each step of a pipeline, a child of the pipeline's request; the step's own
  request carries it, so the step model's batch span links to it.

Which requests are traced: those whose `traceparent` says sampled; none whose
`traceparent` says not sampled; of the others, one in `rate` (Triton's `rate=N`).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from tiffin.scheduler.context import BatchTrace, RequestContext, Timeline

from .trace_config import TraceConfig

T = TypeVar("T")

TRACED_OPERATIONS = ("infer", "stream_infer")
# traceparent flags (two lower-case hex digits) whose sampled bit, 0x01, is clear.
_UNSAMPLED = frozenset(f"{flags:02x}" for flags in range(0, 256, 2))


class Tracing:
    """The tracer provider and its exporter; `intercept` goes in the chain's "tracing" slot,
    `shutdown()` flushes what is not yet exported."""

    def __init__(self, config: TraceConfig) -> None:
        resource = Resource.create(config.resource)
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            # Neither OTEL_SERVICE_NAME nor OTEL_RESOURCE_ATTRIBUTES named it.
            resource = resource.merge(Resource({SERVICE_NAME: "tiffin"}))
        # Which requests are traced is decided in `intercept`, before OpenTelemetry is
        # called at all: an untraced request then costs a counter, not a dropped span.
        self._provider = TracerProvider(resource=resource, sampler=ALWAYS_ON)
        self._rate = config.rate
        self._count = itertools.count()  # next() on it is atomic under the GIL
        # The endpoint, TLS, headers and timeout not given by --trace-config come from the
        # standard OTEL_EXPORTER_OTLP_(TRACES_)* variables, which the exporter reads.
        exporter = OTLPSpanExporter(endpoint=config.url or None)
        self._provider.add_span_processor(
            BatchSpanProcessor(
                exporter,
                max_queue_size=config.max_queue_size,
                schedule_delay_millis=config.schedule_delay_ms,
                max_export_batch_size=min(config.max_export_batch_size, config.max_queue_size),
            )
        )
        self.tracer = self._provider.get_tracer("tiffin")
        self._propagator = TraceContextTextMapPropagator()
        # Timeline stamps are monotonic; spans want the wall clock.
        self._offset = time.time_ns() - time.monotonic_ns()
        self.description = (
            f"tracing one request in {config.rate} (and those whose traceparent is sampled) "
            f"to {config.url or 'the OTEL_EXPORTER_OTLP_* endpoint'}"
        )

    def wall(self, monotonic_ns: int) -> int:
        """A time.monotonic_ns() instant in the wall clock's nanoseconds."""
        return monotonic_ns + self._offset

    def intercept(self, context: RequestContext, proceed: Callable[[], T]) -> T:
        """The "tracing" interceptor: starts the span of an inference request that is
        sampled, and ends it when the request is answered."""
        if context.operation not in TRACED_OPERATIONS:
            return proceed()
        parent = self._parent(context.metadata)
        if parent is None:
            return proceed()
        span = self.tracer.start_span(
            context.operation,
            parent,
            kind=SpanKind.SERVER,
            start_time=self.wall(context.timeline.received),
            attributes={"tiffin.protocol": context.front_door},
        )
        request = RequestTrace(self, span)
        context.timeline.trace = request
        context.on_finish.append(request.finished)
        began = time.monotonic_ns()
        try:
            return proceed()
        finally:
            request.record("decode", began, time.monotonic_ns())

    def _parent(self, metadata: Mapping[str, str]) -> Context | None:
        """The context a traced request's span starts in (the caller's span, or a new
        trace), or None when the request is not traced: the caller's traceparent says
        sampled or not; without a valid one, one request in `rate` is."""
        header = metadata.get("traceparent")
        if header is not None:
            if header.strip().rpartition("-")[2] in _UNSAMPLED:
                return None  # the caller decided; no need to parse the rest
            parent = self._propagator.extract(metadata)
            if trace.get_current_span(parent).get_span_context().is_valid:
                return parent
        return Context() if next(self._count) % self._rate == 0 else None

    def shutdown(self) -> None:
        """Exports the spans still queued, then stops the exporter."""
        self._provider.shutdown()


def _status(span: Span, status: str) -> None:
    if status != "OK":
        span.set_status(Status(StatusCode.ERROR, status))
    span.set_attribute("tiffin.status", status)


class RequestTrace:
    """A sampled request's span (the scheduler's `Trace`)."""

    __slots__ = ("_tracing", "span", "_context")

    def __init__(self, tracing: Tracing, span: Span) -> None:
        self._tracing = tracing
        self.span = span
        self._context = trace.set_span_in_context(span)

    def record(self, name: str, start: int, end: int) -> None:
        wall = self._tracing.wall
        child = self._tracing.tracer.start_span(name, self._context, start_time=wall(start))
        child.end(end_time=wall(end))

    def step(self, name: str, model: str) -> RequestTrace:
        span = self._tracing.tracer.start_span(
            name, self._context, attributes={"tiffin.model": model}
        )
        return RequestTrace(self._tracing, span)

    def batch(self, served: list[Any], start: int, attributes: dict[str, str | int]) -> BatchTrace:
        links = [Link(r.span.get_span_context()) for r in served]
        span = self._tracing.tracer.start_span(
            "batch",
            self._context,
            links=links,
            start_time=self._tracing.wall(start),
            attributes=attributes,
        )
        return _Batch(self._tracing, span)

    def end(self, timeline: Timeline, status: str) -> None:
        if timeline.queued and timeline.batch_start:
            self.record("queue", timeline.queued, timeline.batch_start)
        _status(self.span, status)
        self.span.end(end_time=self._tracing.wall(timeline.sent) if timeline.sent else None)

    def finished(self, context: RequestContext) -> None:
        """The request's on_finish callback: what it was, then the end of its span."""
        self.span.set_attributes(
            {
                "tiffin.model": context.model,
                "tiffin.version": context.version,
                "tiffin.request_id": context.id,
            }
        )
        self.end(context.timeline, context.status)


class _Batch:
    """A batch execution's span (the scheduler's `BatchTrace`)."""

    __slots__ = ("_tracing", "_span", "traceparent")

    def __init__(self, tracing: Tracing, span: Span) -> None:
        self._tracing = tracing
        self._span = span
        ids = span.get_span_context()
        self.traceparent = f"00-{ids.trace_id:032x}-{ids.span_id:016x}-01"  # W3C, sampled

    def end(self, end: int, status: str, compute: tuple[int, int] | None) -> None:
        wall = self._tracing.wall
        if compute is not None:
            child = self._tracing.tracer.start_span(
                "compute", trace.set_span_in_context(self._span), start_time=wall(compute[0])
            )
            child.end(end_time=wall(compute[1]))
        _status(self._span, status)
        self._span.end(end_time=wall(end))
