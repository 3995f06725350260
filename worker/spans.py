"""Spans recorded straight into the OpenTelemetry SDK's span processors.

Invariants:
- A span reaches the processors as the SDK's own `start_span(...).end()` would have
  handed it on: the tracer's sampler decides when the span starts, its id generator names
  it, its resource and this module's instrumentation scope are stamped on it, and a span
  the sampler does not record is never handed on.
- A span's context is fixed when it starts, so its children and the builder (through
  `traceparent`) can join it while it is still open.
- Without the SDK (tracing off) every context is invalid and nothing is recorded.

Why not the SDK's `Span`: it is made to be shared across threads while work runs (a lock,
attribute limits, processors' `on_start`, a copy into a `ReadableSpan` at the end). A
worker's spans live on one event loop and their attributes are the fleet's own few, and
in a worker dispatching hundreds of builds a second the SDK's span was most of what
tracing cost (docs/benchmarks.md, bench/bench_telemetry.py). Processors' `on_start` is not
called: the SDK's batch and simple processors do nothing there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Final

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, TraceFlags
from opentelemetry.util.types import AttributeValue

Attributes = dict[str, AttributeValue]
_UNSET: Final = Status()


@dataclass(slots=True)
class OpenSpan:
    """A span that has started: what it will be recorded as when it ends."""

    name: str
    context: SpanContext
    parent: SpanContext | None
    kind: SpanKind
    start_ns: int
    recording: bool
    attributes: Attributes
    events: list[sdk_trace.Event] = field(default_factory=list)
    status: Status = _UNSET

    @property
    def as_parent(self) -> Context:
        """A context whose current span is this one, for its children."""
        return trace.set_span_in_context(NonRecordingSpan(self.context))

    @property
    def traceparent(self) -> str | None:
        """This span as a W3C `traceparent` (None when tracing is off)."""
        if not self.context.is_valid:
            return None
        ids = f"{self.context.trace_id:032x}-{self.context.span_id:016x}"
        return f"00-{ids}-{self.context.trace_flags:02x}"

    def add_event(self, name: str, attributes: Attributes) -> None:
        self.events.append(sdk_trace.Event(name, attributes, time.time_ns()))


class SpanRecorder:
    """Starts and ends `OpenSpan`s with the SDK tracer's sampler, ids and processors."""

    def __init__(self, tracer: trace.Tracer, scope: str) -> None:
        self._tracer = tracer if isinstance(tracer, sdk_trace.Tracer) else None
        self._scope = InstrumentationScope(scope)

    def start(
        self,
        name: str,
        parent: Context | None,
        attributes: Attributes,
        *,
        kind: SpanKind = SpanKind.INTERNAL,
        start_ns: int | None = None,
    ) -> OpenSpan:
        start_ns = time.time_ns() if start_ns is None else start_ns
        parent_context = trace.get_current_span(parent).get_span_context()
        parent_span = parent_context if parent_context.is_valid else None
        tracer = self._tracer
        if tracer is None:
            invalid = trace.INVALID_SPAN_CONTEXT
            return OpenSpan(name, invalid, parent_span, kind, start_ns, False, attributes)
        trace_id = parent_span.trace_id if parent_span else tracer.id_generator.generate_trace_id()
        sampling = tracer.sampler.should_sample(parent, trace_id, name, kind, attributes)
        sampled = sampling.decision is Decision.RECORD_AND_SAMPLE
        flags = TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT
        context = SpanContext(
            trace_id,
            tracer.id_generator.generate_span_id(),
            is_remote=False,
            trace_flags=TraceFlags(flags),
            trace_state=sampling.trace_state,
        )
        recording = sampling.decision is not Decision.DROP
        if sampling.attributes:
            attributes = {**sampling.attributes, **attributes}
        return OpenSpan(name, context, parent_span, kind, start_ns, recording, attributes)

    def end(self, span: OpenSpan, end_ns: int | None = None) -> None:
        if self._tracer is None or not span.recording:
            return
        self._tracer.span_processor.on_end(
            sdk_trace.ReadableSpan(
                span.name,
                span.context,
                span.parent,
                resource=self._tracer.resource,
                attributes=span.attributes,
                events=span.events,
                kind=span.kind,
                status=span.status,
                start_time=span.start_ns,
                end_time=time.time_ns() if end_ns is None else end_ns,
                instrumentation_scope=self._scope,
            )
        )

    def record(
        self,
        name: str,
        parent: Context | None,
        attributes: Attributes,
        *,
        start_ns: int,
        end_ns: int,
        status: Status = _UNSET,
    ) -> None:
        """A span that is already over."""
        span = self.start(name, parent, attributes, start_ns=start_ns)
        span.status = status
        self.end(span, end_ns)
