"""A worker's spans go straight to the SDK's processors (worker.spans): what arrives is what
the SDK's own spans would have been, sampling included."""

from __future__ import annotations

import re

import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, Sampler
from opentelemetry.trace import SpanKind

from producer.contract import BuildRequest, LocalSource, TraceContext
from worker.telemetry import Telemetry

PRODUCER_TRACE = "0af7651916cd43dd8448eb211c80319c"
PRODUCER_SPAN = "b7ad6b7169203331"


def _traced(sampler: Sampler | None = None) -> tuple[Telemetry, InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    provider = TracerProvider(
        resource=Resource.create({"service.name": "worker-under-test"}), sampler=sampler
    )
    provider.add_span_processor(SimpleSpanProcessor(spans))
    return Telemetry(provider, MeterProvider()), spans


def _request(flags: str) -> BuildRequest:
    traceparent = f"00-{PRODUCER_TRACE}-{PRODUCER_SPAN}-{flags}"
    return BuildRequest(
        source=LocalSource(path="/src"),
        push=False,
        trace=TraceContext(traceparent=traceparent),
        submitted_at=1_700_000_000.0,
    )


def test_an_attempt_is_recorded_as_the_sdk_would_with_its_resource_scope_and_kind() -> None:
    telemetry, spans = _traced()
    with telemetry.attempt(_request("01"), 1, "w1") as attempt:
        assert attempt.traceparent is not None
        assert attempt.traceparent.startswith(f"00-{PRODUCER_TRACE}-")
        assert attempt.traceparent.endswith("-01")
        assert spans.get_finished_spans()[0].name == "queue wait"  # over before the attempt
    queue_wait, attempt_span = spans.get_finished_spans()
    assert attempt_span.name == "build attempt"
    assert attempt_span.kind is SpanKind.CONSUMER
    assert attempt_span.resource.attributes["service.name"] == "worker-under-test"
    assert attempt_span.instrumentation_scope is not None
    assert attempt_span.instrumentation_scope.name == "buildfleet.worker"
    assert attempt_span.context is not None and attempt_span.parent is not None
    assert attempt.traceparent == f"00-{PRODUCER_TRACE}-{attempt_span.context.span_id:016x}-01"
    assert attempt_span.parent.is_remote  # the producer's span, from another process
    assert f"{attempt_span.parent.span_id:016x}" == PRODUCER_SPAN
    assert queue_wait.start_time == 1_700_000_000 * 10**9
    assert queue_wait.end_time is not None and attempt_span.start_time is not None
    assert queue_wait.end_time <= attempt_span.start_time


def test_a_trace_the_producer_did_not_sample_gets_no_spans_and_buildctl_is_told_so() -> None:
    telemetry, spans = _traced()  # the default sampler follows the parent's decision
    with telemetry.attempt(_request("00"), 1, "w1") as attempt:
        with telemetry.holding_slot("d1", attempt, waited_s=0.5):  # a capacity wait span
            pass
        assert attempt.traceparent is not None
        assert attempt.traceparent.startswith(f"00-{PRODUCER_TRACE}-")
        assert attempt.traceparent.endswith("-00")
    assert spans.get_finished_spans() == ()


def test_a_sampler_that_records_nothing_is_obeyed() -> None:
    telemetry, spans = _traced(ALWAYS_OFF)
    request = BuildRequest(source=LocalSource(path="/src"), push=False, submitted_at=1.0)
    with telemetry.attempt(request, 1, "w1") as attempt:
        assert attempt.traceparent is not None and attempt.traceparent.endswith("-00")
    assert spans.get_finished_spans() == ()


def test_without_the_sdk_there_is_no_trace_and_no_traceparent() -> None:
    telemetry = Telemetry(trace.NoOpTracerProvider(), MeterProvider())
    with telemetry.attempt(_request("01"), 1, "w1") as attempt:
        assert attempt.traceparent is None


@pytest.mark.parametrize(
    "hostile",
    [
        "not a traceparent",
        f"00-{PRODUCER_TRACE}-{PRODUCER_SPAN}-01\nTRACEPARENT=injected",
        f"ff-{PRODUCER_TRACE}-{PRODUCER_SPAN}-01",  # version ff is forbidden
        f"00-{'0' * 32}-{PRODUCER_SPAN}-01",  # an all-zero trace id is invalid
        "00-" + "a" * 5000,
    ],
)
def test_a_hostile_traceparent_starts_a_fresh_trace_and_never_reaches_buildctl(
    hostile: str,
) -> None:
    telemetry, spans = _traced()
    request = BuildRequest(
        source=LocalSource(path="/src"), push=False, trace=TraceContext(traceparent=hostile)
    )
    with telemetry.attempt(request, 1, "w1") as attempt:
        traceparent = attempt.traceparent
    assert traceparent is not None
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", traceparent)
    assert PRODUCER_TRACE not in traceparent
    [attempt_span] = spans.get_finished_spans()
    assert attempt_span.parent is None  # a root: nothing of the request's context was taken
