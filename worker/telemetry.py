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
the attempt ends. Spans go through `worker.spans` (what the SDK's span costs a busy worker
is why). Metrics count builds by outcome and record where time went; counts are kept here
and read when metrics are collected, so the hot path only adds to a Counter. Exporters
follow the standard `OTEL_*` variables (`configure_from_environment`, which must run before
a `Telemetry` is made); without them the API's no-op providers make all of this free.
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
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from producer.contract import BuildRequest, BuildResult, Step, TraceContext
from worker.spans import OpenSpan, SpanRecorder

_propagator: Final = TraceContextTextMapPropagator()
_SCOPE: Final = "buildfleet.worker"
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

    span: OpenSpan
    context: Context
    steps: dict[str, Step] = field(default_factory=dict)

    @property
    def traceparent(self) -> str | None:
        return self.span.traceparent


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
        self.spans = SpanRecorder(
            trace.get_tracer(_SCOPE, tracer_provider=tracer_provider), scope=_SCOPE
        )
        meter = metrics.get_meter(_SCOPE, meter_provider=meter_provider)

        def seconds(name: str, description: str) -> metrics.Histogram:
            return meter.create_histogram(
                name,
                unit=_SECONDS,
                description=description,
                explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
            )

        self.ended_builds: Counter[tuple[str, str]] = Counter()
        """Builds that ended, per (status, error class)."""
        meter.create_observable_counter(
            "buildfleet_builds",
            callbacks=[self._observe_builds],
            description="Builds that ended, by status and error class",
        )
        meter.create_observable_counter(
            "buildfleet_build_failures",
            callbacks=[self._observe_failures],
            description="Builds that did not succeed, by class",
        )
        self.queue_wait = seconds("buildfleet_build_queue_wait", "Submit to start")
        self.capacity_wait = seconds("buildfleet_build_capacity_wait", "Waiting for a slot")
        self.duration = seconds("buildfleet_build_duration", "Building, per attempt")
        self.step_duration = seconds("buildfleet_build_step_duration", "Per build step")
        self.retries = meter.create_counter(
            "buildfleet_build_retries", description="Attempts that failed and were retried"
        )
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

    def _observe_builds(self, _options: metrics.CallbackOptions) -> list[metrics.Observation]:
        return [
            metrics.Observation(n, {"status": status, "error_class": error_class})
            for (status, error_class), n in self.ended_builds.items()
        ]

    def _observe_failures(self, _options: metrics.CallbackOptions) -> list[metrics.Observation]:
        return [
            metrics.Observation(n, {"error_class": error_class, "kind": status})
            for (status, error_class), n in self.ended_builds.items()
            if status != "succeeded"
        ]

    def _observe_in_flight(self, _options: metrics.CallbackOptions) -> list[metrics.Observation]:
        return [metrics.Observation(n, {"daemon": d}) for d, n in self.in_flight.items()]

    @contextmanager
    def attempt(self, request: BuildRequest, attempt: int, worker: str) -> Iterator[AttemptTrace]:
        parent = _parent_context(request)
        now = time.time_ns()
        if attempt == 1 and request.submitted_at:
            self.spans.record(
                "queue wait",
                parent,
                {"buildfleet.build_id": request.id},
                start_ns=int(request.submitted_at * _NS),
                end_ns=now,
            )
        span = self.spans.start(
            "build attempt",
            parent,
            {
                "buildfleet.build_id": request.id,
                "buildfleet.attempt": attempt,
                "buildfleet.worker": worker,
                "buildfleet.priority": request.priority,
            },
            kind=SpanKind.CONSUMER,
            start_ns=now,
        )
        traced = AttemptTrace(span, span.as_parent)
        try:
            yield traced
        finally:
            self._emit_steps(traced)
            self.spans.end(span)

    def step(self, attempt: AttemptTrace, step: Step) -> None:
        """Note a step's progress; it becomes a span when the attempt ends."""
        attempt.steps[step.vertex] = _merge(attempt.steps.get(step.vertex), step)

    def _emit_steps(self, attempt: AttemptTrace) -> None:
        for step in attempt.steps.values():
            if step.started is None:
                continue  # never ran: BuildKit skipped it, or the attempt stopped first
            completed = step.completed if step.completed is not None else time.time()
            if step.error:
                status = Status(StatusCode.ERROR, step.error)
            elif step.completed is None:
                status = Status(StatusCode.ERROR, "did not complete")
            else:
                status = Status()
            self.spans.record(
                step.name,
                attempt.context,
                {"buildfleet.step": step.vertex, "buildfleet.cached": step.cached},
                start_ns=int(step.started * _NS),
                end_ns=int(completed * _NS),
                status=status,
            )
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
            self.spans.record(
                "capacity wait",
                attempt.context,
                {"buildfleet.daemon": daemon},
                start_ns=now - int(waited_s * _NS),
                end_ns=now,
            )
        self.in_flight[daemon or ""] += 1
        try:
            yield
        finally:
            self.in_flight[daemon or ""] -= 1

    def retried(self, attempt: AttemptTrace, error_class: str) -> None:
        span = attempt.span
        span.add_event("retry", {"buildfleet.error_class": error_class})
        span.attributes["buildfleet.error_class"] = error_class
        span.status = Status(StatusCode.ERROR, f"retrying: {error_class}")
        self.retries.add(1, {"error_class": error_class})

    def ended(self, attempt: AttemptTrace, result: BuildResult) -> None:
        span = attempt.span
        span.attributes["buildfleet.status"] = result.status
        if result.daemon:
            span.attributes["buildfleet.daemon"] = result.daemon
        if result.digest:
            span.attributes["buildfleet.digest"] = result.digest
        if not result.ok:
            span.attributes["buildfleet.error_class"] = result.error_class or ""
            span.status = Status(StatusCode.ERROR, result.error or result.status)
        self.ended_builds[result.status, result.error_class or ""] += 1
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
