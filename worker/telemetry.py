"""OpenTelemetry traces and metrics of build attempts.

Each attempt is a span, child of the producer's trace when the request carries a W3C trace
context; each BuildKit vertex becomes a child span with BuildKit's own start and end times,
and `TRACEPARENT` handed to buildctl nests BuildKit's spans (when buildkitd exports them)
under the attempt. Metrics count builds by outcome and record where time went. Exporters
follow the standard `OTEL_*` variables (see `configure_from_environment`); without them
the API's no-op providers make all of this free.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final

from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from producer.contract import BuildRequest, BuildResult, Step

_propagator: Final = TraceContextTextMapPropagator()
_SECONDS: Final = "s"


@dataclass(frozen=True, slots=True)
class AttemptTrace:
    """The span of one attempt: its context for child spans, its traceparent for buildctl."""

    span: Span
    context: Context
    traceparent: str | None


class Telemetry:
    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        self.tracer = trace.get_tracer("buildfleet.worker", tracer_provider=tracer_provider)
        meter = metrics.get_meter("buildfleet.worker", meter_provider=meter_provider)
        self.builds = meter.create_counter(
            "buildfleet_builds", description="Builds that ended, by status and error class"
        )
        self.queue_wait = meter.create_histogram(
            "buildfleet_build_queue_wait", unit=_SECONDS, description="Submit to start"
        )
        self.capacity_wait = meter.create_histogram(
            "buildfleet_build_capacity_wait", unit=_SECONDS, description="Waiting for a slot"
        )
        self.duration = meter.create_histogram(
            "buildfleet_build_duration", unit=_SECONDS, description="Building, per attempt"
        )
        self.step_duration = meter.create_histogram(
            "buildfleet_build_step_duration", unit=_SECONDS, description="Per BuildKit vertex"
        )
        self.retries = meter.create_counter(
            "buildfleet_build_retries", description="Attempts that failed and were retried"
        )
        self.failures = meter.create_counter(
            "buildfleet_build_failures", description="Builds that did not succeed, by class"
        )
        self.in_flight = meter.create_up_down_counter(
            "buildfleet_builds_in_flight", description="Builds holding a slot, per daemon"
        )
        self.queue_depth = 0
        meter.create_observable_gauge(
            "buildfleet_queue_depth",
            callbacks=[lambda _options: [metrics.Observation(self.queue_depth)]],
            description="Builds in the queue (waiting, running or waiting to retry)",
        )

    @contextmanager
    def attempt(self, request: BuildRequest, attempt: int, worker: str) -> Iterator[AttemptTrace]:
        carrier = {"traceparent": request.trace.traceparent or ""}
        if request.trace.tracestate:
            carrier["tracestate"] = request.trace.tracestate
        parent = _propagator.extract(carrier)
        with self.tracer.start_as_current_span(
            "build attempt",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={
                "buildfleet.build_id": request.id,
                "buildfleet.attempt": attempt,
                "buildfleet.worker": worker,
                "buildfleet.priority": request.priority,
            },
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            context = trace.set_span_in_context(span)
            outgoing: dict[str, str] = {}
            _propagator.inject(outgoing, context=context)
            yield AttemptTrace(span, context, outgoing.get("traceparent"))

    def step(self, attempt: AttemptTrace, step: Step) -> None:
        """A finished vertex becomes a span with BuildKit's own timestamps."""
        if step.started is None or step.completed is None:
            return
        span = self.tracer.start_span(
            step.name,
            context=attempt.context,
            start_time=int(step.started * 1e9),
            attributes={"buildkit.vertex": step.vertex, "buildkit.cached": step.cached},
        )
        if step.error:
            span.set_status(Status(StatusCode.ERROR, step.error))
        span.end(end_time=int(step.completed * 1e9))
        self.step_duration.record(step.completed - step.started, {"cached": step.cached})

    @contextmanager
    def holding_slot(self, daemon: str | None) -> Iterator[None]:
        labels = {"daemon": daemon or ""}
        self.in_flight.add(1, labels)
        try:
            yield
        finally:
            self.in_flight.add(-1, labels)

    def retried(self, attempt: AttemptTrace, error_class: str) -> None:
        attempt.span.set_attribute("buildfleet.error_class", error_class)
        attempt.span.set_status(Status(StatusCode.ERROR, f"retrying: {error_class}"))
        self.retries.add(1, {"error_class": error_class})

    def ended(self, attempt: AttemptTrace, result: BuildResult) -> None:
        span = attempt.span
        span.set_attribute("buildfleet.status", result.status)
        if result.daemon:
            span.set_attribute("buildfleet.daemon", result.daemon)
        if result.digest:
            span.set_attribute("buildfleet.digest", result.digest)
        if not result.ok:
            span.set_attribute("buildfleet.error_class", result.error_class or "")
            span.set_status(Status(StatusCode.ERROR, result.error or result.status))
        labels = {"status": result.status, "error_class": result.error_class or ""}
        self.builds.add(1, labels)
        if not result.ok:
            self.failures.add(1, {"error_class": result.error_class or "", "kind": result.status})
        self.queue_wait.record(result.queue_wait_s)
        self.capacity_wait.record(result.capacity_wait_s, {"daemon": result.daemon or ""})
        self.duration.record(
            result.build_s, {"status": result.status, "backend": result.backend or ""}
        )


def configure_from_environment() -> None:
    """Install SDK providers with OTLP/HTTP exporters when `OTEL_*` asks for them.

    `OTEL_EXPORTER_OTLP_ENDPOINT` (or the per-signal endpoints) turns exporting on; the
    exporters read every other standard variable themselves. `OTEL_SDK_DISABLED=true` wins.
    """
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    traces_endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    metrics_endpoint = os.environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
    if not (endpoint or traces_endpoint or metrics_endpoint):
        return
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "buildfleet")})
    if endpoint or traces_endpoint:
        tracer_provider = TracerProvider(resource=resource)
        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(tracer_provider)
    if endpoint or metrics_endpoint:
        reader = PeriodicExportingMetricReader(OTLPMetricExporter())
        metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=[reader]))
