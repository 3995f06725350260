"""OpenTelemetry traces and metrics of builds.

One trace per build. Its root is the producer's span (the gateway's, or any caller's W3C
trace context carried on the request); under it the worker adds:

    queue wait       submitted -> first attempt started (first attempt only)
    build attempt    one per attempt, siblings under the root; a retried attempt ends with
                     a `retry` event and status ERROR, its successor is the next sibling
      capacity wait  waiting for a builder slot (when slots are leased)
      <step>         one span per build step, from the backend's Step events with the
                     backend's own timestamps: any backend that reports Steps gets them
      build          BuildKit's own spans: `TRACEPARENT` handed to buildctl makes them
                     children of the attempt when buildkitd exports to the same receiver

Steps are merged per vertex while the attempt runs (BuildKit re-sends a vertex, and may
reopen one, e.g. "exporting to image" before and after the push) and become spans once, when
the attempt ends. Metrics count builds by outcome and record where time went. Exporters
follow the standard `OTEL_*` variables (`configure_from_environment`); without them the
API's no-op providers make all of this free.
"""

from __future__ import annotations

import os
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Final

import msgspec
from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from producer.contract import BuildRequest, BuildResult, Step, TraceContext

_propagator: Final = TraceContextTextMapPropagator()
_SECONDS: Final = "s"
_NS: Final = 1_000_000_000
SECONDS_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0, 1800.0, 3600.0,
)  # fmt: skip
"""Histogram buckets for every duration: a cached step takes milliseconds, a build an hour."""


def unsampled_traceparent() -> str:
    """A W3C trace context that says "do not record": given to `buildctl` health probes so
    that neither buildctl nor buildkitd turns each probe into a trace."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-00"


def _parent_context(request: BuildRequest) -> Context | None:
    """The producer's span as the parent context (None: the attempt starts a trace)."""
    if not request.trace.traceparent:
        return None
    carrier = {"traceparent": request.trace.traceparent}
    if request.trace.tracestate:
        carrier["tracestate"] = request.trace.tracestate
    return _propagator.extract(carrier)


def current_trace_context() -> TraceContext | None:
    """The current span's W3C context, for a request a producer is about to submit (None
    when no span is recording: tracing is off)."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    if "traceparent" not in carrier:
        return None
    return TraceContext(traceparent=carrier["traceparent"], tracestate=carrier.get("tracestate"))


@dataclass(slots=True)
class AttemptTrace:
    """The span of one attempt: its context for child spans, its traceparent for buildctl,
    and the steps seen so far (merged per vertex, emitted when the attempt ends)."""

    span: Span
    context: Context
    traceparent: str | None
    steps: dict[str, Step] = field(default_factory=dict)


def _merge(previous: Step | None, step: Step) -> Step:
    """One step from its reports: first start, last completion, cached if ever so."""
    if previous is None:
        return step
    started = min((t for t in (previous.started, step.started) if t is not None), default=None)
    return msgspec.structs.replace(
        step,
        started=started,
        completed=step.completed or previous.completed,
        cached=step.cached or previous.cached,
        error=step.error or previous.error,
    )


class Telemetry:
    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        self.tracer = trace.get_tracer("buildfleet.worker", tracer_provider=tracer_provider)
        meter = metrics.get_meter("buildfleet.worker", meter_provider=meter_provider)

        def seconds(name: str, description: str) -> metrics.Histogram:
            return meter.create_histogram(
                name,
                unit=_SECONDS,
                description=description,
                explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
            )

        self.builds = meter.create_counter(
            "buildfleet_builds", description="Builds that ended, by status and error class"
        )
        self.queue_wait = seconds("buildfleet_build_queue_wait", "Submit to start")
        self.capacity_wait = seconds("buildfleet_build_capacity_wait", "Waiting for a slot")
        self.duration = seconds("buildfleet_build_duration", "Building, per attempt")
        self.step_duration = seconds("buildfleet_build_step_duration", "Per build step")
        self.retries = meter.create_counter(
            "buildfleet_build_retries", description="Attempts that failed and were retried"
        )
        self.failures = meter.create_counter(
            "buildfleet_build_failures", description="Builds that did not succeed, by class"
        )
        # Gauges are read when metrics are collected, not written per build: the hot path
        # only counts.
        self.in_flight: Counter[str] = Counter()
        """Builds holding a slot, per daemon ("" without capacity accounting)."""
        meter.create_observable_gauge(
            "buildfleet_builds_in_flight",
            callbacks=[self._observe_in_flight],
            description="Builds holding a slot, per daemon",
        )
        self.queue_depth = 0
        meter.create_observable_gauge(
            "buildfleet_queue_depth",
            callbacks=[lambda _options: [metrics.Observation(self.queue_depth)]],
            description="Builds in the queue (waiting, running or waiting to retry)",
        )

    def _observe_in_flight(self, _options: metrics.CallbackOptions) -> list[metrics.Observation]:
        return [metrics.Observation(n, {"daemon": d}) for d, n in self.in_flight.items()]

    @contextmanager
    def attempt(self, request: BuildRequest, attempt: int, worker: str) -> Iterator[AttemptTrace]:
        parent = _parent_context(request)
        if attempt == 1 and request.submitted_at:
            self.tracer.start_span(
                "queue wait",
                context=parent,
                start_time=int(request.submitted_at * _NS),
                attributes={"buildfleet.build_id": request.id},
            ).end()
        # Not made the current span: its children are given its context explicitly, which
        # spares the dispatch path a context switch in and out per build.
        span = self.tracer.start_span(
            "build attempt",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={
                "buildfleet.build_id": request.id,
                "buildfleet.attempt": attempt,
                "buildfleet.worker": worker,
                "buildfleet.priority": request.priority,
            },
        )
        context = trace.set_span_in_context(span)
        outgoing: dict[str, str] = {}
        _propagator.inject(outgoing, context=context)
        traced = AttemptTrace(span, context, outgoing.get("traceparent"))
        try:
            yield traced
        finally:
            self._emit_steps(traced)
            span.end()

    def step(self, attempt: AttemptTrace, step: Step) -> None:
        """Note a step's progress; it becomes a span when the attempt ends."""
        attempt.steps[step.vertex] = _merge(attempt.steps.get(step.vertex), step)

    def _emit_steps(self, attempt: AttemptTrace) -> None:
        for step in attempt.steps.values():
            if step.started is None:
                continue  # never ran: BuildKit skipped it, or the attempt stopped first
            completed = step.completed if step.completed is not None else time.time()
            span = self.tracer.start_span(
                step.name,
                context=attempt.context,
                start_time=int(step.started * _NS),
                attributes={"buildfleet.step": step.vertex, "buildfleet.cached": step.cached},
            )
            if step.error:
                span.set_status(Status(StatusCode.ERROR, step.error))
            elif step.completed is None:
                span.set_status(Status(StatusCode.ERROR, "did not complete"))
            span.end(end_time=int(completed * _NS))
            self.step_duration.record(
                max(0.0, completed - step.started), {"cached": str(step.cached).lower()}
            )

    @contextmanager
    def holding_slot(
        self, daemon: str | None, attempt: AttemptTrace | None = None, waited_s: float = 0.0
    ) -> Iterator[None]:
        """While a build holds its slot on `daemon`; `waited_s` (how long the slot took)
        becomes the attempt's `capacity wait` span, ending now. No daemon, no slot (the
        worker has no capacity accounting): no span."""
        if attempt is not None and daemon:
            now = time.time_ns()
            self.tracer.start_span(
                "capacity wait",
                context=attempt.context,
                start_time=now - int(waited_s * _NS),
                attributes={"buildfleet.daemon": daemon},
            ).end(end_time=now)
        self.in_flight[daemon or ""] += 1
        try:
            yield
        finally:
            self.in_flight[daemon or ""] -= 1

    def retried(self, attempt: AttemptTrace, error_class: str) -> None:
        attempt.span.add_event("retry", {"buildfleet.error_class": error_class})
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
        if result.daemon:  # no slots leased, no capacity wait to speak of
            self.capacity_wait.record(result.capacity_wait_s, {"daemon": result.daemon})
        self.duration.record(
            result.build_s, {"status": result.status, "backend": result.backend or ""}
        )


def configure_from_environment(*, prometheus: bool = False) -> None:
    """Install SDK providers: OTLP/HTTP exporters when `OTEL_*` asks for them, and with
    `prometheus` a reader that serves the metrics on prometheus_client's default registry
    (what `worker.metrics_server` renders).

    `OTEL_EXPORTER_OTLP_ENDPOINT` (or the per-signal endpoints) turns exporting on; the
    exporters read every other standard variable themselves. `OTEL_SDK_DISABLED=true` wins.
    """
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    traces_endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    metrics_endpoint = os.environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
    if not (endpoint or traces_endpoint or metrics_endpoint or prometheus):
        return
    from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "buildfleet")})
    if endpoint or traces_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        tracer_provider = TracerProvider(resource=resource)
        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(tracer_provider)
    readers: list[MetricReader] = []
    if endpoint or metrics_endpoint:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    if prometheus:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader

        readers.append(PrometheusMetricReader(scope_info_enabled=False))
    if readers:
        # Exemplars cost a reservoir update per measurement (a third of the metrics' cost on
        # the dispatch path, bench/bench_telemetry.py) and Prometheus text drops them: off
        # unless OTEL_METRICS_EXEMPLAR_FILTER asks for them.
        exemplars = (
            None if os.environ.get("OTEL_METRICS_EXEMPLAR_FILTER") else AlwaysOffExemplarFilter()
        )
        metrics.set_meter_provider(
            MeterProvider(resource=resource, metric_readers=readers, exemplar_filter=exemplars)
        )
