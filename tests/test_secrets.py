"""Build secrets against real services: a worker, Redis, buildkitd and the registry.

A secret's value lives on the worker only (a file or a variable of `[[worker.secrets]]`);
a RUN step that mounts it proves it got the right bytes (it compares their SHA-256), and
then the value is looked for everywhere the fleet writes: every event, the build's state,
the worker's log records, its spans and metrics, the services' logs, every Redis key and
value (each type read out, and DUMPed), and the argv of every process that ran during the
build, buildctl's included. Also when the build fails. Refusals: an id the worker lacks, a
missing file, an unset variable (backends that cannot mount secrets: test_conformance.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from buildfleet.cli import make_parser, request_from_args
from producer.client import BuildfleetClient
from producer.contract import BuildRequest, Failed, LocalSource, Succeeded, encode
from producer.store import BuildStore
from worker.backends.factory import make_backend
from worker.capacity import Capacity
from worker.runner import BuildRunner
from worker.scheduling import FixedPlacer
from worker.settings import SecretSource
from worker.telemetry import Telemetry

from fleet import worker_config, worker_in_task
from registry import served_digest

pytestmark = pytest.mark.timeout(300)


def secret_value() -> bytes:
    return f"s3cr3t-{secrets.token_hex(16)}".encode()


class ArgvWatch:
    """Every distinct command line of every process, read from /proc every few ms while
    the watch runs (a thread: the event loop is busy with the build)."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for entry in os.scandir("/proc"):
                if entry.name.isdigit():
                    try:
                        with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                            self.seen.add(f.read())
                    except OSError:
                        continue
            self._stop.wait(0.005)

    @contextmanager
    def running(self) -> Iterator[ArgvWatch]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()

    def commands(self, program: str) -> list[list[bytes]]:
        return [
            argv.split(b"\0")
            for argv in self.seen
            if argv.split(b"\0")[0].endswith(program.encode())
        ]


async def redis_contents(redis: aioredis.Redis) -> list[bytes]:
    """Every key, and every value of every type, read out and DUMPed."""
    found: list[bytes] = []
    async for key in redis.scan_iter(count=1000):
        found.append(key)
        dumped = await redis.dump(key)
        if dumped is not None:
            found.append(dumped)
        match (await redis.type(key)).decode():
            case "string":
                found.append(await redis.get(key) or b"")
            case "hash":
                for field, value in (await redis.hgetall(key)).items():
                    found += [field, value]
            case "list":
                found += await redis.lrange(key, 0, -1)
            case "set":
                found += list(await redis.smembers(key))
            case "zset":
                found += [member for member, _ in await redis.zrange(key, 0, -1, withscores=True)]
            case "stream":
                for _id, fields in await redis.xrange(key):
                    for field, value in fields.items():
                        found += [field, value]
    return found


def service_logs(services_dir: Path) -> list[tuple[Path, bytes]]:
    return [(path, path.read_bytes()) for path in services_dir.rglob("*.log") if path.is_file()]


async def assert_found_nowhere(
    value: bytes,
    *,
    fleet: BuildfleetClient,
    redis: aioredis.Redis,
    build_id: str,
    events: list[object],
    watch: ArgvWatch,
    records: list[logging.LogRecord],
    services_dir: Path,
) -> None:
    text = value.decode()
    for event in events:
        assert value not in encode(event), event  # type: ignore[arg-type]
    assert value not in encode(await fleet.get(build_id))
    for record in records:
        assert text not in record.getMessage() and text not in str(record.__dict__), record
    for path, content in service_logs(services_dir):
        assert value not in content, path
    contents = await redis_contents(redis)
    assert len(contents) > 10  # the build's record, its events and the queue were read
    for item in contents:
        assert value not in item
    for argv in watch.seen:
        assert value not in argv, argv
    # not vacuous: buildctl was seen, mounting the secret by where it is
    assert any(b"--secret" in argv for argv in watch.commands("buildctl")), watch.commands(
        "buildctl"
    )


def project(tmp_path: Path, base_image: str, *lines: str) -> LocalSource:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "Dockerfile").write_text("\n".join([f"FROM {base_image}", *lines, ""]))
    return LocalSource(path=str(tmp_path / "src"))


def checks(value: bytes, target: str = "/run/secrets/npm") -> str:
    """A shell test that `target` holds `value`, naming only its hash."""
    digest = hashlib.sha256(value).hexdigest()
    return f'test "$(sha256sum {target} | cut -c1-64)" = "{digest}"'


async def test_a_secret_reaches_its_run_step_and_is_found_nowhere_else(
    fleet: BuildfleetClient,
    redis: aioredis.Redis,
    redis_url: str,
    buildkitd: str,
    registry: str,
    base_image: str,
    services_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    value = secret_value()
    secret_file = tmp_path / "npmrc"
    secret_file.write_bytes(value)
    secret_file.chmod(0o600)
    source = project(
        tmp_path,
        base_image,
        f"RUN --mount=type=secret,id=npm {checks(value)} && sleep 1 && echo checked > /checked",
        "RUN test ! -e /run/secrets/npm && cat /checked",
    )
    request = BuildRequest(source=source, images=(f"{registry}/secrets/app:1",), secrets=("npm",))
    config = worker_config(
        redis_url, daemons=[buildkitd], secrets=[SecretSource(id="npm", file=str(secret_file))]
    )
    caplog.set_level(logging.DEBUG)
    with ArgvWatch().running() as watch:
        async with worker_in_task(config):
            build_id = await fleet.submit(request)
            events = [event async for event in fleet.watch(build_id)]
    final = events[-1]
    assert isinstance(final, Succeeded), msgspec.json.encode(final)
    assert served_digest(registry, "secrets/app", "1") == final.result.digest
    await assert_found_nowhere(
        value,
        fleet=fleet,
        redis=redis,
        build_id=build_id,
        events=events,
        watch=watch,
        records=caplog.records,
        services_dir=services_dir,
    )
    [buildctl] = [argv for argv in watch.commands("buildctl") if b"--secret" in argv]
    assert f"id=npm,src={secret_file}".encode() in buildctl


async def test_a_failing_build_leaks_its_secret_nowhere_either(
    fleet: BuildfleetClient,
    redis: aioredis.Redis,
    redis_url: str,
    buildkitd: str,
    registry: str,
    base_image: str,
    services_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    value = secret_value()
    monkeypatch.setenv("BUILDFLEET_TEST_TOKEN", value.decode())
    source = project(
        tmp_path,
        base_image,
        f"RUN --mount=type=secret,id=token {checks(value, '/run/secrets/token')} "
        "&& sleep 1 && echo read the secret, now failing && exit 3",
    )
    request = BuildRequest(
        source=source, images=(f"{registry}/secrets/failing:1",), secrets=("token",)
    )
    config = worker_config(
        redis_url,
        daemons=[buildkitd],
        secrets=[SecretSource(id="token", env="BUILDFLEET_TEST_TOKEN")],
    )
    caplog.set_level(logging.DEBUG)
    with ArgvWatch().running() as watch:
        async with worker_in_task(config):
            build_id = await fleet.submit(request)
            events = [event async for event in fleet.watch(build_id)]
    final = events[-1]
    assert isinstance(final, Failed), msgspec.json.encode(final)
    assert final.result.error_class == "run_failed"
    assert "now failing" in "\n".join(final.result.log_tail)  # the hash check passed
    await assert_found_nowhere(
        value,
        fleet=fleet,
        redis=redis,
        build_id=build_id,
        events=events,
        watch=watch,
        records=caplog.records,
        services_dir=services_dir,
    )
    [buildctl] = [argv for argv in watch.commands("buildctl") if b"--secret" in argv]
    assert b"id=token,env=BUILDFLEET_TEST_TOKEN" in buildctl


async def test_a_secret_the_worker_lacks_fails_at_once_naming_it(
    fleet: BuildfleetClient,
    redis: aioredis.Redis,
    redis_url: str,
    buildkitd: str,
    registry: str,
    base_image: str,
    tmp_path: Path,
) -> None:
    source = project(tmp_path, base_image, "RUN --mount=type=secret,id=aws true")
    config = worker_config(
        redis_url,
        daemons=[buildkitd],
        secrets=[
            SecretSource(id="npm", file=str(tmp_path / "npmrc")),
            SecretSource(id="gone", file=str(tmp_path / "missing")),
            SecretSource(id="unset", env="BUILDFLEET_TEST_UNSET_VARIABLE"),
        ],
    )
    (tmp_path / "npmrc").write_text("x")
    cases = {
        "aws": ("secret_not_configured", "secret 'aws' is not configured on this worker"),
        "gone": ("secret_unavailable", f"its file {tmp_path / 'missing'} is missing"),
        "unset": ("secret_unavailable", "no variable BUILDFLEET_TEST_UNSET_VARIABLE"),
    }
    async with worker_in_task(config):
        for secret, (error_class, message) in cases.items():
            request = BuildRequest(
                source=source, images=(f"{registry}/secrets/lacking:1",), secrets=("npm", secret)
            )
            build_id = await fleet.submit(request)
            events = [event async for event in fleet.watch(build_id)]
            final = events[-1]
            assert isinstance(final, Failed), msgspec.json.encode(final)
            assert final.result.attempts == 1  # permanent: not retried
            assert final.result.error_class == error_class
            assert message in (final.result.error or ""), final.result.error


def test_the_cli_names_secrets_by_id() -> None:
    args = make_parser().parse_args(
        ["submit", "/tmp", "--image", "r.io/a:1", "--secret", "npm", "--secret", "pip"]
    )
    assert request_from_args(args).secrets == ("npm", "pip")


async def test_the_workers_spans_and_metrics_carry_no_secret(
    redis: aioredis.Redis,
    redis_url: str,
    buildkitd: str,
    registry: str,
    base_image: str,
    tmp_path: Path,
) -> None:
    value = secret_value()
    (tmp_path / "token").write_bytes(value)
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    config = worker_config(
        redis_url,
        daemons=[buildkitd],
        secrets=[SecretSource(id="token", file=str(tmp_path / "token"))],
    )
    runner = BuildRunner(
        store=BuildStore(redis, config.queue),
        backend=make_backend(config),
        placer=FixedPlacer(buildkitd),
        capacity=Capacity(redis, config.scheduling),
        settings=config.worker,
        retry=config.retry,
        scheduling=config.scheduling,
        telemetry=Telemetry(tracer_provider, MeterProvider(metric_readers=[reader])),
    )
    source = project(
        tmp_path,
        base_image,
        f"RUN --mount=type=secret,id=token {checks(value, '/run/secrets/token')} && exit 7",
    )
    request = BuildRequest(
        source=source, images=(f"{registry}/secrets/traced:1",), secrets=("token",)
    )
    fleet = BuildfleetClient(redis)  # borrows the fixture's connection: not closed here
    await fleet.submit(request)
    await runner.run({"job_id": request.id}, msgspec.json.encode(request))
    result = await fleet.wait(request.id)
    assert result.status == "failed" and result.error_class == "run_failed", result
    finished = spans.get_finished_spans()
    assert any(span.name == "build attempt" for span in finished)
    for span in finished:
        assert value.decode() not in span.to_json(), span.name
    metrics = reader.get_metrics_data()
    assert metrics is not None and value.decode() not in metrics.to_json()
