"""The core pipeline against real services: submit -> Redis -> worker -> buildkitd -> registry."""

from __future__ import annotations

import asyncio
import collections
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis

from producer.client import BuildfleetClient
from producer.contract import (
    BuildRequest,
    Cancelled,
    DeadLettered,
    Failed,
    GitSource,
    LocalSource,
    Log,
    Retrying,
    Started,
    Step,
    Succeeded,
    decode_event,
    is_terminal,
)
from producer.keys import (
    DEAD_LETTER_STREAM,
    DEFAULT_QUEUE,
    EVENT_FIELD,
    EVENTS_STREAM,
    build_key,
    job_key,
)
from producer.store import CancelNotice
from worker.settings import SimulateSettings

from fleet import worker_config, worker_in_task, worker_processes
from gitrepos import GitServer
from registry import served_digest

pytestmark = pytest.mark.timeout(600)


def dockerfile(base_image: str, *run: str) -> str:
    return "\n".join([f"FROM {base_image}", *(f"RUN {command}" for command in run), ""])


async def events_of(fleet: BuildfleetClient, build_id: str) -> list[object]:
    return [event async for event in fleet.watch(build_id)]


async def test_a_git_repository_is_built_and_pushed(
    fleet: BuildfleetClient,
    redis_url: str,
    buildkitd: str,
    registry: str,
    base_image: str,
    git_server: GitServer,
) -> None:
    repo = git_server.create_repo(
        "pipeline-git",
        {"app/Dockerfile": dockerfile(base_image, "echo built > /built.txt"), "app/x": "x"},
    )
    request = BuildRequest(
        source=GitSource(url=repo.url, ref="main", commit=repo.head),
        context="app",
        images=(f"{registry}/pipeline/git:1", f"{registry}/pipeline/git:latest"),
    )
    async with worker_in_task(worker_config(redis_url, daemons=[buildkitd])):
        build_id = await fleet.submit(request)
        events = await events_of(fleet, build_id)

    final = events[-1]
    assert isinstance(final, Succeeded), msgspec.json.encode(final)
    assert final.result.digest is not None
    assert served_digest(registry, "pipeline/git", "1") == final.result.digest
    assert served_digest(registry, "pipeline/git", "latest") == final.result.digest
    kinds = [type(event).__name__ for event in events]
    assert kinds[:2] == ["Queued", "Started"]
    steps = [event for event in events if isinstance(event, Step)]
    assert any("RUN echo built" in step.name and step.completed for step in steps)
    state = await fleet.get(build_id)
    assert state.status == "succeeded" and state.result == final.result


async def test_a_local_directory_is_built_and_build_args_reach_the_dockerfile(
    fleet: BuildfleetClient,
    redis_url: str,
    buildkitd: str,
    registry: str,
    base_image: str,
    tmp_path: Path,
) -> None:
    (tmp_path / "Dockerfile").write_text(
        f'FROM {base_image}\nARG GREETING\nRUN echo "$GREETING" > /greeting && cat /greeting\n'
    )
    request = BuildRequest(
        source=LocalSource(path=str(tmp_path)),
        images=(f"{registry}/pipeline/local:1",),
        build_args={"GREETING": "hello-from-build-arg"},
    )
    async with worker_in_task(worker_config(redis_url, daemons=[buildkitd])):
        build_id = await fleet.submit(request)
        events = await events_of(fleet, build_id)
    final = events[-1]
    assert isinstance(final, Succeeded), msgspec.json.encode(final)
    assert served_digest(registry, "pipeline/local", "1") == final.result.digest
    logs = "".join(event.text for event in events if isinstance(event, Log))
    assert "hello-from-build-arg" in logs


async def test_a_failing_run_step_fails_permanently_with_its_log_tail(
    fleet: BuildfleetClient,
    redis_url: str,
    buildkitd: str,
    registry: str,
    base_image: str,
    tmp_path: Path,
) -> None:
    (tmp_path / "Dockerfile").write_text(
        dockerfile(base_image, "echo about to fail; echo last words >&2; exit 3")
    )
    request = BuildRequest(
        source=LocalSource(path=str(tmp_path)), images=(f"{registry}/pipeline/fails:1",)
    )
    async with worker_in_task(worker_config(redis_url, daemons=[buildkitd])):
        build_id = await fleet.submit(request)
        events = await events_of(fleet, build_id)
    final = events[-1]
    assert isinstance(final, Failed), final
    result = final.result
    assert result.error_class == "run_failed"
    assert result.failed_step is not None and "exit 3" in result.failed_step
    assert "last words" in result.log_tail
    assert result.attempts == 1
    assert not any(isinstance(event, Retrying) for event in events)
    assert served_digest(registry, "pipeline/fails", "1") is None


async def test_a_missing_base_image_and_a_syntax_error_are_permanent(
    fleet: BuildfleetClient, redis_url: str, buildkitd: str, registry: str, tmp_path: Path
) -> None:
    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "Dockerfile").write_text(f"FROM {registry}/base/no-such-image\nRUN true\n")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "Dockerfile").write_text("FROM scratch\nRUNN true\n")
    async with worker_in_task(worker_config(redis_url, daemons=[buildkitd])):
        ids = [
            await fleet.submit(BuildRequest(source=LocalSource(path=str(path)), push=False))
            for path in (missing, broken)
        ]
        results = [await fleet.wait(build_id) for build_id in ids]
    assert [r.status for r in results] == ["failed", "failed"]
    assert [r.error_class for r in results] == ["base_image_not_found", "dockerfile"]
    assert all(r.attempts == 1 for r in results)


async def test_a_build_is_cancelled_mid_build_and_buildctl_is_stopped(
    fleet: BuildfleetClient,
    redis_url: str,
    buildkitd: str,
    base_image: str,
    tmp_path: Path,
) -> None:
    (tmp_path / "Dockerfile").write_text(dockerfile(base_image, "echo sleeping; sleep 120"))
    request = BuildRequest(source=LocalSource(path=str(tmp_path)), push=False)
    async with worker_in_task(worker_config(redis_url, daemons=[buildkitd])):
        build_id = await fleet.submit(request)
        async for event in fleet.watch(build_id):
            if isinstance(event, Log) and "sleeping" in event.text:
                break
        await fleet.cancel(build_id, reason="changed my mind")
        result = await fleet.wait(build_id)
        assert result.status == "cancelled"
        assert result.error == "changed my mind"
        assert not _buildctl_running_for(tmp_path)
    events = await events_of(fleet, build_id)
    assert sum(is_terminal(e) for e in events) == 1  # type: ignore[arg-type]


def _buildctl_running_for(context: Path) -> bool:
    found = subprocess.run(["pgrep", "-f", f"buildctl.*{context}"], capture_output=True)
    return found.returncode == 0


async def test_a_queued_build_is_cancelled_without_running(
    fleet: BuildfleetClient, redis: aioredis.Redis, tmp_path: Path
) -> None:
    build_id = await fleet.submit(BuildRequest(source=LocalSource(path=str(tmp_path)), push=False))
    await fleet.cancel(build_id)
    events = await events_of(fleet, build_id)
    assert [type(e) for e in events] == [type(events[0]), Cancelled]
    assert await redis.zcard(DEFAULT_QUEUE) == 0
    assert not await redis.exists(job_key(build_id))


async def test_a_build_that_exceeds_its_timeout_fails_as_timeout(
    fleet: BuildfleetClient, redis_url: str, buildkitd: str, base_image: str, tmp_path: Path
) -> None:
    (tmp_path / "Dockerfile").write_text(dockerfile(base_image, "sleep 120"))
    request = BuildRequest(source=LocalSource(path=str(tmp_path)), push=False, timeout_s=3)
    async with worker_in_task(worker_config(redis_url, daemons=[buildkitd])):
        result = await fleet.wait(await fleet.submit(request))
    assert (result.status, result.error_class) == ("failed", "timeout")
    assert not _buildctl_running_for(tmp_path)


async def test_a_daemon_that_is_down_is_a_temporary_failure_and_the_build_is_not_lost(
    fleet: BuildfleetClient, redis_url: str, tmp_path: Path
) -> None:
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    request = BuildRequest(source=LocalSource(path=str(tmp_path)), push=False)
    down = "tcp://127.0.0.1:9"  # discard port: nothing listens
    async with worker_in_task(worker_config(redis_url, daemons=[down])):
        build_id = await fleet.submit(request)
        events = await events_of(fleet, build_id)
    retries = [event for event in events if isinstance(event, Retrying)]
    final = events[-1]
    assert len(retries) == 2  # FAST_RETRIES: 3 attempts
    assert all(r.error_class == "daemon_unreachable" for r in retries)
    assert isinstance(final, DeadLettered)
    assert final.result.attempts == 3
    assert [e.attempt for e in events if isinstance(e, Started)] == [1, 2, 3]


@pytest.mark.parametrize(
    ("options", "field"),
    [
        (["--image", "Upper/Case:1"], "$.images[0]"),
        (["--no-push", "--cache-to", "c,type=local,dest=/tmp/x"], "$.cache.export_ref"),
        (["--no-push", "--timeout", "61"], "$.timeout_s"),  # the queue's max_timeout_s: 60
    ],
)
async def test_a_bad_request_is_refused_at_submit_and_nothing_is_enqueued(
    redis: aioredis.Redis, redis_url: str, tmp_path: Path, options: list[str], field: str
) -> None:
    cli = [sys.executable, "-m", "buildfleet.cli", "submit", str(tmp_path)]
    refused = subprocess.run(
        [*cli, *options],
        capture_output=True,
        text=True,
        env={
            "BUILDFLEET_REDIS_URL": redis_url,
            "BUILDFLEET_QUEUE_MAX_TIMEOUT_S": "60",
            "PATH": "/usr/bin:/bin",
        },
    )
    assert refused.returncode == 2, refused.stderr
    assert field in refused.stderr
    assert await redis.zcard(DEFAULT_QUEUE) == 0


async def test_garbage_on_the_queue_is_dead_lettered_and_the_worker_keeps_going(
    fleet: BuildfleetClient, redis: aioredis.Redis, redis_url: str, tmp_path: Path
) -> None:
    await redis.set(job_key("garbage-1"), b"\x80\x04\x95not msgpack at all")
    await redis.zadd(DEFAULT_QUEUE, {"garbage-1": 1})
    config = worker_config(redis_url, backend="simulate")
    async with worker_in_task(config):
        good = await fleet.submit(BuildRequest(source=LocalSource(path=str(tmp_path)), push=False))
        assert (await fleet.wait(good)).status == "succeeded"
        garbage = await fleet.wait("garbage-1")
    assert garbage.status == "dead_lettered"
    assert garbage.error is not None and "invalid build request" in garbage.error
    [(_, fields)] = await redis.xrange(DEAD_LETTER_STREAM)
    assert fields[b"build_id"] == b"garbage-1"


async def test_submitting_the_same_id_twice_builds_once(
    fleet: BuildfleetClient, redis: aioredis.Redis, redis_url: str, tmp_path: Path
) -> None:
    request = BuildRequest(id="same-id", source=LocalSource(path=str(tmp_path)), push=False)
    submissions = await fleet.submit_many([request, request])
    assert [s.created for s in submissions] == [True, False]
    async with worker_in_task(worker_config(redis_url, backend="simulate")):
        await fleet.wait("same-id")
    events = await events_of(fleet, "same-id")  # a build that has ended replays its events
    assert [type(e).__name__ for e in events] == ["Queued", "Started", "Succeeded"]


async def test_twenty_builds_on_two_worker_processes_end_exactly_once(
    fleet: BuildfleetClient, redis: aioredis.Redis, redis_url: str, tmp_path: Path
) -> None:
    config = worker_config(
        redis_url, backend="simulate", simulate=SimulateSettings(duration_s=0.2), concurrency=3
    )
    requests = [BuildRequest(source=LocalSource(path=str(tmp_path)), push=False) for _ in range(20)]
    with worker_processes(config, count=2, logs=tmp_path):
        await fleet.submit_many(requests)
        results = await asyncio.gather(*(fleet.wait(r.id) for r in requests))
    assert all(result.status == "succeeded" for result in results)
    entries = await redis.xrange(EVENTS_STREAM)
    terminal = collections.Counter(
        event.build_id
        for _, fields in entries
        if is_terminal(event := decode_event(fields[EVENT_FIELD]))
    )
    assert terminal == {request.id: 1 for request in requests}
    workers = {
        event.worker
        for _, fields in entries
        if isinstance(event := decode_event(fields[EVENT_FIELD]), Started)
    }
    assert len(workers) == 2  # each process took builds


async def test_a_cancel_whose_notice_was_missed_still_stops_the_build(
    fleet: BuildfleetClient, redis: aioredis.Redis, redis_url: str, tmp_path: Path
) -> None:
    request = BuildRequest(
        source=LocalSource(path=str(tmp_path)), push=False, labels={"simulate.duration_s": "60"}
    )
    async with worker_in_task(worker_config(redis_url, backend="simulate")):
        await fleet.submit(request)
        while (await fleet.get(request.id)).status != "running":
            await asyncio.sleep(0.05)
        # What the cancel script records, without the pub/sub notice (as if the worker's
        # channel had been down when it was sent).
        notice = msgspec.json.encode(CancelNotice(build_id=request.id, reason="missed notice"))
        await redis.hset(build_key(request.id), "cancel", notice)
        result = await fleet.wait(request.id)
    assert (result.status, result.error) == ("cancelled", "missed notice")
