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
from producer.contract import BuildRequest, LocalSource, TraceContext
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
