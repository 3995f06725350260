"""Traces and metrics of build attempts, read back from the SDK's in-memory exporters."""

from __future__ import annotations

import msgspec
import redis.asyncio as aioredis
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from producer.client import BuildfleetClient
from producer.contract import BuildRequest, LocalSource, Step, TraceContext
from producer.store import BuildStore
from worker.backends.factory import make_backend
from worker.capacity import Capacity
from worker.runner import BuildRunner
from worker.scheduling import FixedPlacer
from worker.settings import SimulateSettings
from worker.telemetry import Telemetry

from fleet import worker_config

PRODUCER_TRACE = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{PRODUCER_TRACE}-b7ad6b7169203331-01"


async def test_an_attempt_is_a_span_in_the_producers_trace_with_a_span_per_step(
    redis: aioredis.Redis, redis_url: str, tmp_path: object
) -> None:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    telemetry = Telemetry(tracer_provider, MeterProvider(metric_readers=[reader]))

    config = worker_config(redis_url, backend="simulate", simulate=SimulateSettings(steps=2))
    runner = BuildRunner(
        store=BuildStore(redis, config.queue),
        backend=make_backend(config),
        placer=FixedPlacer(None),
        capacity=Capacity(redis, config.scheduling),
        settings=config.worker,
        retry=config.retry,
        scheduling=config.scheduling,
        telemetry=telemetry,
    )
    request = BuildRequest(
        source=LocalSource(path="/src"), push=False, trace=TraceContext(traceparent=TRACEPARENT)
    )
    fleet = BuildfleetClient(redis)  # borrows the fixture's connection: not closed here
    await fleet.submit(request)
    await runner.run({"job_id": request.id}, msgspec.json.encode(request))
    assert (await fleet.wait(request.id)).ok

    by_name = {span.name: span for span in spans.get_finished_spans()}
    attempt = by_name["build attempt"]
    assert attempt.context is not None and attempt.parent is not None
    assert f"{attempt.context.trace_id:032x}" == PRODUCER_TRACE
    assert attempt.attributes is not None
    assert attempt.attributes["buildfleet.build_id"] == request.id
    assert attempt.attributes["buildfleet.status"] == "succeeded"
    assert attempt.status.status_code is not StatusCode.ERROR
    steps = [span for span in spans.get_finished_spans() if "simulated step" in span.name]
    assert len(steps) == 2
    assert all(step.parent is not None for step in steps)
    assert {step.parent.span_id for step in steps if step.parent} == {attempt.context.span_id}

    data = reader.get_metrics_data()
    assert data is not None
    points = {
        metric.name: metric.data.data_points
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    }
    [builds] = points["buildfleet_builds"]
    assert builds.attributes == {"status": "succeeded", "error_class": ""}
    assert builds.value == 1  # type: ignore[attr-defined]
    assert "buildfleet_build_duration" in points


def _in_memory() -> tuple[Telemetry, InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    return Telemetry(provider, MeterProvider(metric_readers=[InMemoryMetricReader()])), spans


async def test_a_retried_build_is_sibling_attempts_under_one_root_with_a_retry_event(
    redis: aioredis.Redis, redis_url: str
) -> None:
    telemetry, spans = _in_memory()
    config = worker_config(
        redis_url, backend="simulate", simulate=SimulateSettings(steps=1, outcome="temporary")
    )
    runner = BuildRunner(
        store=BuildStore(redis, config.queue),
        backend=make_backend(config),
        placer=FixedPlacer(None),
        capacity=Capacity(redis, config.scheduling),
        settings=config.worker,
        retry=config.retry,
        scheduling=config.scheduling,
        telemetry=telemetry,
    )
    request = BuildRequest(
        source=LocalSource(path="/src"), push=False, trace=TraceContext(traceparent=TRACEPARENT)
    )
    fleet = BuildfleetClient(redis)
    await fleet.submit(request)
    queued = (await fleet.get(request.id)).request  # as the queue holds it: submitted_at set
    assert queued is not None and queued.submitted_at
    raw = msgspec.json.encode(queued)
    for attempt in (1, 2):
        await runner.run({"job_id": request.id}, raw, attempt)
        assert runner.handled(request.id)  # Retrying deferred its job
    await runner.run({"job_id": request.id}, raw, 3)
    assert (await fleet.wait(request.id)).status == "dead_lettered"

    finished = spans.get_finished_spans()
    attempts = [span for span in finished if span.name == "build attempt"]
    assert [span.attributes["buildfleet.attempt"] for span in attempts if span.attributes] == [
        1,
        2,
        3,
    ]
    producer_span = int(TRACEPARENT.split("-")[2], 16)
    for span in attempts:  # siblings: each a child of the producer's span, in its trace
        assert span.parent is not None and span.parent.span_id == producer_span
        assert span.context is not None and f"{span.context.trace_id:032x}" == PRODUCER_TRACE
        assert span.status.status_code is StatusCode.ERROR
    retried = [[event.name for event in span.events] for span in attempts]
    assert retried == [["retry"], ["retry"], []]
    assert attempts[0].events[0].attributes == {"buildfleet.error_class": "daemon_unreachable"}
    [queue_wait] = [span for span in finished if span.name == "queue wait"]  # the first only
    assert queue_wait.parent is not None and queue_wait.parent.span_id == producer_span
    by_parent: dict[int, list[str]] = {}
    for span in finished:
        if span.parent is not None:
            by_parent.setdefault(span.parent.span_id, []).append(span.name)
    for span in attempts:
        assert span.context is not None
        assert by_parent[span.context.span_id] == ["[1/1] simulated step"]  # no slots: no wait


def _step(vertex: str, name: str, **fields: object) -> Step:
    return Step(build_id="b", attempt=1, vertex=vertex, name=name, **fields)  # type: ignore[arg-type]


def test_a_vertex_reported_many_times_is_one_span_from_first_start_to_last_completion() -> None:
    telemetry, spans = _in_memory()
    request = BuildRequest(source=LocalSource(path="/src"), push=False)
    with telemetry.attempt(request, 1, "w") as attempt:
        # BuildKit re-sends a vertex on every change and reopens "exporting to image"
        # around the push: one step, one span.
        telemetry.step(attempt, _step("v1", "exporting to image", started=10.0))
        telemetry.step(attempt, _step("v1", "exporting to image", started=10.0, completed=11.0))
        telemetry.step(attempt, _step("v1", "exporting to image", started=12.0))
        telemetry.step(attempt, _step("v1", "exporting to image", started=12.0, completed=13.0))
        telemetry.step(attempt, _step("v2", "[1/2] FROM base", cached=True, started=9.0))
        telemetry.step(attempt, _step("v2", "[1/2] FROM base", started=9.0, completed=9.5))
        telemetry.step(attempt, _step("v3", "[2/2] RUN false", started=9.5, error="exit 1"))
        telemetry.step(attempt, _step("v4", "never started"))
    finished = {span.name: span for span in spans.get_finished_spans()}
    assert set(finished) == {
        "build attempt",
        "exporting to image",
        "[1/2] FROM base",
        "[2/2] RUN false",
    }
    export = finished["exporting to image"]
    assert (export.start_time, export.end_time) == (10 * 10**9, 13 * 10**9)
    cached = finished["[1/2] FROM base"]
    assert cached.attributes is not None and cached.attributes["buildfleet.cached"] is True
    failed = finished["[2/2] RUN false"]  # never completed: ends with the attempt, an error
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description == "exit 1"
    attempt_span = finished["build attempt"]
    assert attempt_span.context is not None
    assert all(
        span.parent is not None and span.parent.span_id == attempt_span.context.span_id
        for name, span in finished.items()
        if name != "build attempt"
    )
