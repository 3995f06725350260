"""A batch as operators drive it, against real Redis and real worker processes (simulate
backend): resume, Ctrl-C, --max-in-flight and --rate measured from the fleet's events,
interactive builds going first, --cancel, and bad input that fails alone."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis import Redis as SyncRedis
from redis.exceptions import RedisError

from buildfleet import services
from producer.contract import Queued, Started, decode_event, is_terminal
from producer.keys import DEFAULT_QUEUE, EVENT_FIELD, EVENTS_STREAM
from worker.settings import SimulateSettings

from fleet import cli, cli_process, worker_config, worker_processes
from gitrepos import GitServer

pytestmark = pytest.mark.timeout(300)


def manifest(path: Path, count: int, duration_s: float = 0.2, **outcomes: str) -> Path:
    """`count` local builds, `app-N`; `outcomes` maps `app-N` to a simulated outcome."""
    entries = [f'[defaults]\npush = false\nlabels = {{ "simulate.duration_s" = "{duration_s}" }}\n']
    for n in range(count):
        outcome = outcomes.get(f"app_{n}", "succeeded")
        entries.append(
            f'[[build]]\nsource = {{ type = "local", path = "/src/app-{n}" }}\n'
            f'labels = {{ "simulate.duration_s" = "{duration_s}", '
            f'"simulate.outcome" = "{outcome}" }}\n'
        )
    path.write_text("\n".join(entries))
    return path


class Timeline:
    """When each build of a batch was queued, started and ended, from the fleet's events."""

    def __init__(self) -> None:
        self.queued: dict[str, float] = {}
        self.started: dict[str, float] = {}
        self.ended: dict[str, float] = {}

    @classmethod
    async def read(cls, redis: aioredis.Redis, prefix: str = "") -> Timeline:
        timeline = cls()
        for _entry, fields in await redis.xrange(EVENTS_STREAM):
            event = decode_event(fields[EVENT_FIELD])
            if not event.build_id.startswith(prefix):
                continue
            if isinstance(event, Queued):
                timeline.queued[event.build_id] = event.at
            elif isinstance(event, Started):
                timeline.started.setdefault(event.build_id, event.at)
            elif is_terminal(event):
                timeline.ended[event.build_id] = event.at
        return timeline

    def most_in_flight(self) -> int:
        """The most builds queued or running at once."""
        changes = sorted(
            [(at, 1) for at in self.queued.values()] + [(at, -1) for at in self.ended.values()]
        )
        peak = current = 0
        for _at, change in changes:  # an end sorts before a start at the same instant
            current += change
            peak = max(peak, current)
        return peak


def most_in_any_window(times: Iterable[float], window_s: float) -> int:
    ordered = sorted(times)
    peak = first = 0
    for last, at in enumerate(ordered):
        while at - ordered[first] > window_s:
            first += 1
        peak = max(peak, last - first + 1)
    return peak


async def wait_for(predicate: object, timeout: float = 60.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_a_bad_entry_stops_the_batch_before_anything_is_submitted(
    redis: aioredis.Redis, redis_url: str, tmp_path: Path
) -> None:
    path = manifest(tmp_path / "nightly.toml", 2)
    path.write_text(path.read_text() + '\n[[build]]\nsource = { type = "local", path = "/x" }\n'
                    'images = ["NOT A NAME"]\n')  # fmt: skip
    done = cli(redis_url, "rebuild", str(path))
    assert done.returncode == 2
    assert f"{path}:15: build #3: $.images[0]:" in done.stderr
    assert await redis.zcard(DEFAULT_QUEUE) == 0


async def test_an_interrupted_batch_keeps_running_and_resuming_skips_what_succeeded(
    redis: aioredis.Redis, redis_url: str, tmp_path: Path
) -> None:
    first = manifest(tmp_path / "first.toml", 30, app_0="failed")
    config = worker_config(redis_url, backend="simulate", concurrency=4)
    with worker_processes(config, count=1, logs=tmp_path):
        with cli_process(redis_url, "rebuild", str(first), "--batch", "b1", "--rate", "5",
                         "--wait") as run:  # fmt: skip

            async def some_submitted() -> bool:
                return len((await Timeline.read(redis, "b1.r1.")).queued) >= 6

            await wait_for(some_submitted)
            run.send_signal(signal.SIGINT)
            _, stderr = run.communicate(timeout=30)
        assert run.returncode == 130, stderr
        assert "interrupted:" in stderr and "keep running" in stderr
        assert "buildfleet rebuild --follow b1" in stderr
        assert f"buildfleet rebuild {first} --rate 5 --wait --batch b1" in " ".join(stderr.split())

        # The submitted builds went on without the command; --follow waits for them.
        followed = cli(redis_url, "rebuild", "--follow", "b1", "--json")
        statuses = [b["status"] for b in json.loads(followed.stdout)["builds"]]
        assert followed.returncode == 1  # app-0 failed
        submitted_first = len((await Timeline.read(redis, "b1.r1.")).queued)
        assert 6 <= submitted_first < 30
        assert statuses.count("failed") == 1
        assert statuses.count("succeeded") == submitted_first - 1

        # Resume: the same batch id, app-0 fixed (labels are not what an image is made of).
        again = manifest(tmp_path / "first.toml", 30)
        done = cli(redis_url, "rebuild", str(again), "--batch", "b1", "--rate", "50", "--json",
                   "--wait")  # fmt: skip
    assert done.returncode == 0, done.stderr
    builds = json.loads(done.stdout)["builds"]
    assert [b["status"] for b in builds] == ["succeeded"] * 30
    reused = [b for b in builds if b.get("reused")]
    assert len(reused) == submitted_first - 1
    assert all(b["build_id"].startswith("b1.r1.") for b in reused)
    rebuilt = [b for b in builds if not b.get("reused")]
    assert all(b["build_id"].startswith("b1.r2.") for b in rebuilt)
    second = await Timeline.read(redis, "b1.r2.")
    assert len(second.queued) == 30 - (submitted_first - 1)  # nothing built twice


async def test_max_in_flight_and_rate_hold_as_the_events_tell(
    redis: aioredis.Redis, redis_url: str, tmp_path: Path
) -> None:
    config = worker_config(redis_url, backend="simulate", concurrency=8)
    with worker_processes(config, count=2, logs=tmp_path):
        capped = cli(redis_url, "rebuild", str(manifest(tmp_path / "a.toml", 30, 0.3)),
                     "--batch", "capped", "--max-in-flight", "4", "--rate", "1000",
                     "--wait")  # fmt: skip
        paced = cli(redis_url, "rebuild", str(manifest(tmp_path / "b.toml", 30, 0.05)),
                    "--batch", "paced", "--rate", "10/s", "--wait")  # fmt: skip
    assert capped.returncode == 0, capped.stderr
    assert paced.returncode == 0, paced.stderr
    cap = await Timeline.read(redis, "capped.")
    assert len(cap.ended) == 30
    assert cap.most_in_flight() == 4  # reached, never passed
    pace = await Timeline.read(redis, "paced.")
    assert len(pace.ended) == 30
    assert most_in_any_window(pace.queued.values(), 1.0) <= 10 + 1  # rate + burst of one
    span = max(pace.queued.values()) - min(pace.queued.values())
    assert span >= 29 / 10 - 0.05


async def test_an_interactive_build_submitted_during_a_batch_starts_before_its_queued_builds(
    redis: aioredis.Redis, redis_url: str, tmp_path: Path
) -> None:
    config = worker_config(redis_url, backend="simulate", concurrency=2)
    with worker_processes(config, count=1, logs=tmp_path):
        batch = cli(redis_url, "rebuild", str(manifest(tmp_path / "m.toml", 16, 0.4)),
                    "--batch", "night", "--rate", "1000")  # fmt: skip
        assert batch.returncode == 0, batch.stderr
        push = cli(redis_url, "submit", str(tmp_path), "--no-push", "--label",
                   "simulate.duration_s=0.1", "--wait", "--json")  # fmt: skip
        assert push.returncode == 0, push.stderr
        interactive = json.loads(push.stdout)["build_id"]

        async def all_ended() -> bool:
            return len((await Timeline.read(redis, "night.")).ended) == 16

        await wait_for(all_ended)
    batch_times = await Timeline.read(redis, "night.")
    mine = await Timeline.read(redis, interactive)
    arrived, began = mine.queued[interactive], mine.started[interactive]
    waiting = [b for b, started in batch_times.started.items() if started > arrived]
    assert len(waiting) >= 8  # the batch was still mostly queued when it arrived
    assert all(batch_times.started[b] > began for b in waiting)


async def test_cancel_stops_a_running_batch_and_its_builds(
    redis: aioredis.Redis, redis_url: str, tmp_path: Path
) -> None:
    config = worker_config(redis_url, backend="simulate", concurrency=4)
    doomed = ("rebuild", str(manifest(tmp_path / "m.toml", 20, 30.0)), "--batch", "doomed",
              "--max-in-flight", "3", "--wait", "--json")  # fmt: skip
    with worker_processes(config, count=1, logs=tmp_path), cli_process(redis_url, *doomed) as run:

        async def three_running() -> bool:
            return len((await Timeline.read(redis, "doomed.")).started) == 3

        await wait_for(three_running)
        cancelled = cli(redis_url, "rebuild", "--cancel", "doomed")
        assert cancelled.returncode == 0, cancelled.stderr
        said = " ".join((cancelled.stdout + cancelled.stderr).split())
        assert "batch doomed cancelled: 3 stopped while running" in said
        stdout, stderr = run.communicate(timeout=60)
    assert run.returncode == 1, stderr
    assert "was cancelled" in stderr
    counts = json.loads(stdout)["counts"]
    assert counts == {"cancelled": 3, "not_submitted": 17}
    assert await redis.zcard(DEFAULT_QUEUE) == 0
    assert len((await Timeline.read(redis, "doomed.")).queued) == 3
    assert cli(redis_url, "rebuild", "--cancel", "no-such-batch").returncode == 2


async def test_entries_whose_repository_or_ref_is_missing_fail_alone_and_hostile_urls_are_refused(
    redis: aioredis.Redis, redis_url: str, git_server: GitServer, tmp_path: Path
) -> None:
    repo = git_server.create_repo("present", {"Dockerfile": "FROM scratch\n"})
    marker = tmp_path / "pwned"
    sources = {
        "good": f'{{ type = "git", url = "{repo.url}", ref = "main" }}',
        "no-repo": f'{{ type = "git", url = "{git_server.url}absent.git", ref = "main" }}',
        "no-ref": f'{{ type = "git", url = "{repo.url}", ref = "no-such-branch" }}',
        "ext": f'{{ type = "git", url = "ext::sh -c touch% {marker}", ref = "main" }}',
        "option": f'{{ type = "git", url = "--upload-pack=touch {marker}", ref = "main" }}',
    }
    path = tmp_path / "m.toml"
    path.write_text(
        "[defaults]\npush = false\n\n"
        + "\n".join(
            f'[[build]]\nsource = {source}\nlabels = {{ name = "{name}" }}\n'
            f'images = ["registry.local/{name}:1"]\n'
            for name, source in sources.items()
        )
    )
    config = worker_config(redis_url, backend="simulate", concurrency=2)
    with worker_processes(config, count=1, logs=tmp_path):
        done = cli(redis_url, "rebuild", str(path), "--wait", "--json", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["counts"] == {"failed": 4, "succeeded": 1}
    why = {b["name"].split("/")[1].split(":")[0]: b.get("error", "") for b in report["builds"]}
    assert why["good"] == ""
    assert "absent.git: remote error: no such repository" in why["no-repo"]
    assert "no branch or tag named 'no-such-branch'" in why["no-ref"]
    assert "remote helpers" in why["ext"]
    assert "is not a repository URL" in why["option"]
    assert not marker.exists()


async def test_the_summary_names_every_outcome_at_batch_priority(
    redis: aioredis.Redis, redis_url: str, tmp_path: Path
) -> None:
    config = worker_config(
        redis_url, backend="simulate", concurrency=4, simulate=SimulateSettings(duration_s=0.05)
    )
    with worker_processes(config, count=1, logs=tmp_path):
        done = cli(redis_url, "rebuild", str(manifest(tmp_path / "m.toml", 12, app_11="failed")),
                   "--wait")  # fmt: skip
    assert done.returncode == 1
    assert "11 succeeded" in done.stderr and "1 failed" in done.stderr
    queued = [decode_event(fields[EVENT_FIELD]) for _, fields in await redis.xrange(EVENTS_STREAM)]
    priorities = {e.priority for e in queued if isinstance(e, Queued)}
    assert priorities == {"batch"}


class DurableRedis:
    """A redis-server of this test's own that keeps every write (AOF, fsync always), so it
    can be SIGKILLed and started again on the same port with its data."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = services.free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [services.find_tool("redis-server"), "--port", str(self.port),
                "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
                "--appendfsync", "always", "--dir", str(self.workdir)]  # fmt: skip
        log = (self.workdir / "redis.log").open("ab")
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while True:
            with contextlib.suppress(RedisError), SyncRedis(port=self.port) as probe:
                if probe.ping():
                    return
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()


async def test_a_batch_rides_out_redis_killed_and_restarted_mid_submission(
    tmp_path: Path,
) -> None:
    durable = DurableRedis(tmp_path)
    durable.start()
    redis = aioredis.Redis.from_url(durable.url)
    try:
        with cli_process(durable.url, "rebuild", str(manifest(tmp_path / "m.toml", 40)),
                         "--batch", "outage", "--rate", "20") as run:  # fmt: skip

            async def some_submitted() -> bool:
                return len((await Timeline.read(redis, "outage.")).queued) >= 10

            await wait_for(some_submitted)
            durable.kill()
            await asyncio.sleep(1.5)  # the command finds Redis gone and keeps trying
            durable.start()
            _, stderr = run.communicate(timeout=120)
        assert run.returncode == 0, stderr
        assert "Redis unreachable" in stderr
        timeline = await Timeline.read(redis, "outage.")
        assert len(timeline.queued) == 40  # every build once: none lost, none doubled
        assert await redis.zcard(DEFAULT_QUEUE) == 40
    finally:
        await redis.aclose()
        durable.kill()
