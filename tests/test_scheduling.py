"""Fleet scheduling against real Redis (and real buildkitd): capacity, routing, priorities,
recovery after SIGKILL, SIGTERM drain, dead letters and replay."""

from __future__ import annotations

import asyncio
import collections
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from buildfleet import services
from producer.client import BuildfleetClient
from producer.contract import (
    BuildRequest,
    LocalSource,
    Retrying,
    Started,
    Succeeded,
    decode_event,
    is_terminal,
)
from producer.keys import EVENT_FIELD, EVENTS_STREAM
from producer.settings import QueueSettings
from worker.backends.journal import peak_concurrency, read_journal
from worker.capacity import Capacity
from worker.routing import rank
from worker.scheduling import DaemonHealth, LeasedPlacer
from worker.settings import DaemonSettings, SimulateSettings, WorkerConfig

from fleet import QUICK_RECOVERY, worker_config, worker_in_task, worker_processes

pytestmark = pytest.mark.timeout(600)

DAEMONS = ["tcp://daemon-a:1234", "tcp://daemon-b:1234"]


def simulated(tmp_path: Path, repo: str = "repo", **labels: str) -> BuildRequest:
    return BuildRequest(
        source=LocalSource(path=str(tmp_path / repo)), push=False, labels=dict(labels)
    )


async def terminal_counts(redis: aioredis.Redis) -> collections.Counter[str]:
    return collections.Counter(
        event.build_id
        for _, fields in await redis.xrange(EVENTS_STREAM)
        if is_terminal(event := decode_event(fields[EVENT_FIELD]))
    )


def max_overlap(journal: Path) -> dict[str, int]:
    """The most builds that ran at once on each daemon, from the simulate backend's journal."""
    return peak_concurrency(read_journal(journal))


def placer(redis: aioredis.Redis, max_builds: int) -> tuple[LeasedPlacer, DaemonHealth]:
    daemons = [DaemonSettings(address=a, max_builds=max_builds) for a in DAEMONS]
    health = DaemonHealth(DAEMONS, QUICK_RECOVERY)
    capacity = Capacity(redis, QUICK_RECOVERY)
    return LeasedPlacer(daemons, capacity, health, QUICK_RECOVERY), health


@asynccontextmanager
async def placed(
    leased: LeasedPlacer, request: BuildRequest, avoid: Sequence[str] = ()
) -> AsyncIterator[str | None]:
    """A slot for `request` (waiting for one), freed on leaving the block."""
    placement = await leased.wait(request, request.id, avoid, since=time.monotonic())
    try:
        yield placement.daemon
    finally:
        await leased.release(placement, request.id)


async def test_a_cache_key_stays_on_its_daemon_while_it_has_room_then_spills(
    redis: aioredis.Redis, tmp_path: Path
) -> None:
    leased, _ = placer(redis, max_builds=1)
    first = simulated(tmp_path)
    preferred, other = rank(first.cache_key, DAEMONS)
    async with placed(leased, first) as a:
        assert a == preferred
        async with placed(leased, simulated(tmp_path)) as b:
            assert b == other  # the preferred daemon is full: spill to the next in rank
            waiting = asyncio.create_task(_enter_and_leave(leased, simulated(tmp_path)))
            await asyncio.sleep(0.3)
            assert not waiting.done()  # both daemons full: the third build waits
        assert await waiting == other  # ...and takes the slot the second one freed
    async with placed(leased, simulated(tmp_path)) as again:
        assert again == preferred


async def _enter_and_leave(leased: LeasedPlacer, request: BuildRequest) -> str | None:
    async with placed(leased, request) as daemon:
        return daemon


async def test_a_daemon_taken_out_gets_nothing_and_the_avoided_one_comes_last(
    redis: aioredis.Redis, tmp_path: Path
) -> None:
    leased, health = placer(redis, max_builds=5)
    requests = [simulated(tmp_path, repo=f"repo-{n}") for n in range(12)]
    health.mark_down(DAEMONS[0])
    for request in requests:
        async with placed(leased, request) as daemon:
            assert daemon == DAEMONS[1]
    leased_again, _ = placer(redis, max_builds=5)
    for request in requests:
        async with placed(leased_again, request, avoid=[rank(request.cache_key, DAEMONS)[0]]) as d:
            assert d == rank(request.cache_key, DAEMONS)[1]


async def test_a_dead_holders_slot_frees_itself(redis: aioredis.Redis, tmp_path: Path) -> None:
    settings = QUICK_RECOVERY
    capacity = Capacity(redis, settings)
    assert await capacity.acquire("dead-holder", [(DAEMONS[0], 1)]) == DAEMONS[0]
    assert await Capacity(redis, settings).acquire("other", [(DAEMONS[0], 1)]) is None
    # The holder never renews (its heartbeat died with it); the slot expires.
    await asyncio.sleep(settings.slot_ttl_s + 0.2)
    taken = await Capacity(redis, settings).acquire("other", [(DAEMONS[0], 1)])
    assert taken == DAEMONS[0]


def _fleet_config(redis_url: str, journal: Path, duration: float = 0.3) -> WorkerConfig:
    return worker_config(
        redis_url,
        backend="simulate",
        daemons=DAEMONS,
        max_builds=2,
        concurrency=4,
        simulate=SimulateSettings(duration_s=duration, journal=str(journal)),
    )


async def test_three_workers_never_put_more_than_two_builds_on_a_daemon(
    fleet: BuildfleetClient, redis: aioredis.Redis, redis_url: str, tmp_path: Path
) -> None:
    journal = tmp_path / "journal.jsonl"
    requests = [simulated(tmp_path, repo=f"repo-{n % 6}") for n in range(60)]
    with worker_processes(_fleet_config(redis_url, journal), count=3, logs=tmp_path):
        await fleet.submit_many(requests)
        results = await asyncio.gather(*(fleet.wait(r.id) for r in requests))
    assert all(result.status == "succeeded" for result in results)
    assert await terminal_counts(redis) == {r.id: 1 for r in requests}
    peaks = max_overlap(journal)
    assert set(peaks) == set(DAEMONS)
    assert all(peak == 2 for peak in peaks.values()), peaks  # the cap held and was reached


async def test_a_sigkilled_worker_s_builds_are_rerun_and_end_exactly_once(
    fleet: BuildfleetClient, redis: aioredis.Redis, redis_url: str, tmp_path: Path
) -> None:
    journal = tmp_path / "journal.jsonl"
    requests = [simulated(tmp_path, repo=f"repo-{n % 6}") for n in range(60)]
    config = _fleet_config(redis_url, journal, duration=0.5)
    with worker_processes(config, count=3, logs=tmp_path) as workers:
        await fleet.submit_many(requests)
        victim = workers[0]
        await _wait_until_running_on(redis, victim.pid)
        victim.send_signal(signal.SIGKILL)
        results = await asyncio.gather(*(fleet.wait(r.id) for r in requests))
    assert all(result.status == "succeeded" for result in results)
    assert await terminal_counts(redis) == {r.id: 1 for r in requests}
    assert all(peak <= 2 for peak in max_overlap(journal).values())
    started_by = collections.defaultdict(list)
    for _, fields in await redis.xrange(EVENTS_STREAM):
        if isinstance(event := decode_event(fields[EVENT_FIELD]), Started):
            started_by[event.build_id].append(event.worker)
    rerun = [b for b, workers_seen in started_by.items() if len(workers_seen) > 1]
    assert rerun, "the killed worker had builds in flight; they must have been re-run"
    assert all(started_by[b][0].endswith(f"-{victim.pid}") for b in rerun)


async def _wait_until_running_on(redis: aioredis.Redis, pid: int) -> None:
    while True:
        for _, fields in await redis.xrange(EVENTS_STREAM):
            event = decode_event(fields[EVENT_FIELD])
            if isinstance(event, Started) and event.worker.endswith(f"-{pid}"):
                return
        await asyncio.sleep(0.05)


async def test_sigterm_drains_finishing_builds_and_requeues_the_rest_without_an_attempt(
    fleet: BuildfleetClient, redis: aioredis.Redis, redis_url: str, tmp_path: Path
) -> None:
    config = worker_config(redis_url, backend="simulate", concurrency=2, drain_grace_s=4.0)
    short = simulated(tmp_path, **{"simulate.duration_s": "0.5"})
    long = simulated(tmp_path, **{"simulate.duration_s": "8"})
    late = simulated(tmp_path)
    with worker_processes(config, count=1, logs=tmp_path) as [draining]:
        await fleet.submit_many([short, long])
        await _wait_until_running_on(redis, draining.pid)
        while (await fleet.get(long.id)).status != "running":
            await asyncio.sleep(0.05)
        draining.send_signal(signal.SIGTERM)
        while "allow_pick_jobs" not in (tmp_path / "worker-0.log").read_text():
            await asyncio.sleep(0.05)  # the worker has heard it
        await fleet.submit(late)  # there is room, but a draining worker takes nothing new
        assert draining.wait(timeout=30) == 0
    assert (await fleet.get(short.id)).status == "succeeded"
    assert (await fleet.get(long.id)).status == "running"  # handed back, not ended
    assert (await fleet.get(late.id)).status == "queued"
    with worker_processes(config, count=1, logs=tmp_path):
        result = await fleet.wait(long.id)
        assert (await fleet.wait(late.id)).status == "succeeded"
    assert result.status == "succeeded"
    events = [event async for event in fleet.watch(long.id)]
    assert [e.attempt for e in events if isinstance(e, Started)] == [1, 1]  # no attempt spent
    assert not any(isinstance(e, Retrying) for e in events)
    assert sum(is_terminal(e) for e in events) == 1


async def test_interactive_builds_go_first_and_old_batch_builds_are_not_starved(
    redis: aioredis.Redis, redis_url: str, tmp_path: Path
) -> None:
    head_start = QueueSettings(interactive_head_start_s=1.0)
    async with BuildfleetClient.from_url(redis_url, head_start) as fleet:
        batch = [
            BuildRequest(source=LocalSource(path=str(tmp_path)), push=False, priority="batch")
            for _ in range(3)
        ]
        await fleet.submit_many(batch[:1])
        await asyncio.sleep(1.5)  # older than the head start: it has aged past new arrivals
        await fleet.submit_many(batch[1:])
        urgent = BuildRequest(source=LocalSource(path=str(tmp_path)), push=False)
        await fleet.submit(urgent)
        config = worker_config(redis_url, backend="simulate", concurrency=1)
        async with worker_in_task(config):
            await asyncio.gather(*(fleet.wait(r.id) for r in [*batch, urgent]))
    order = [
        event.build_id
        for _, fields in await redis.xrange(EVENTS_STREAM)
        if isinstance(event := decode_event(fields[EVENT_FIELD]), Started)
    ]
    assert order[:2] == [batch[0].id, urgent.id]
    assert set(order[2:]) == {batch[1].id, batch[2].id}  # submitted together: either order


async def test_a_real_daemon_killed_mid_build_sends_the_build_to_the_other_daemon(
    fleet: BuildfleetClient,
    redis_url: str,
    registry: str,
    buildkitd: str,
    base_image: str,
    services_dir: Path,
    tmp_path: Path,
) -> None:
    doomed = services.start_buildkitd(services_dir, [registry], name="buildkitd-doomed")
    try:
        context = _context_ranking_first(tmp_path, doomed.address, [doomed.address, buildkitd])
        (context / "Dockerfile").write_text(
            f"FROM {base_image}\nRUN echo started on attempt; sleep 8; echo done\n"
        )
        config = worker_config(redis_url, daemons=[doomed.address, buildkitd])
        request = BuildRequest(source=LocalSource(path=str(context)), push=False)
        async with worker_in_task(config):
            build_id = await fleet.submit(request)
            async for event in fleet.watch(build_id):
                if isinstance(event, Started):
                    assert event.attempt == 1
                if getattr(event, "text", "").startswith("started on attempt"):
                    doomed.stop(grace=0)
                    break
            result = await fleet.wait(build_id)
    finally:
        doomed.stop(grace=0)
    events = [event async for event in fleet.watch(build_id)]
    assert result.status == "succeeded", result
    retries = [(e.error_class, e.reason) for e in events if isinstance(e, Retrying)]
    assert (result.attempts, result.daemon) == (2, buildkitd), retries
    [retrying] = [e for e in events if isinstance(e, Retrying)]
    assert retrying.error_class in {"daemon_unreachable", "connection_lost"}
    assert isinstance(events[-1], Succeeded)


def _context_ranking_first(tmp_path: Path, wanted: str, daemons: list[str]) -> Path:
    """A build context whose cache key ranks `wanted` first, so attempt 1 lands there."""
    for n in range(100):
        context = tmp_path / f"context-{n}"
        probe = BuildRequest(source=LocalSource(path=str(context)), push=False)
        if rank(probe.cache_key, daemons)[0] == wanted:
            context.mkdir()
            return context
    raise AssertionError("no context ranks the wanted daemon first")


async def test_dead_letters_are_listed_and_replayed(
    fleet: BuildfleetClient, redis_url: str, tmp_path: Path
) -> None:
    failing = simulated(tmp_path, **{"simulate.outcome": "temporary"})
    async with worker_in_task(worker_config(redis_url, backend="simulate")):
        result = await fleet.wait(await fleet.submit(failing))
    assert (result.status, result.attempts) == ("dead_lettered", 3)

    def cli(*args: str) -> str:
        env = {"BUILDFLEET_REDIS_URL": redis_url, "PATH": "/usr/bin:/bin"}
        done = subprocess.run(
            [sys.executable, "-m", "buildfleet.cli", "dlq", *args],
            capture_output=True, text=True, env=env, check=True,
        )  # fmt: skip
        return done.stdout

    assert failing.id in cli("list")
    replayed_id = cli("replay", failing.id).strip()
    assert replayed_id != failing.id
    replayed = await fleet.get(replayed_id)
    assert replayed.request is not None
    assert replayed.request.labels["replay-of"] == failing.id
    assert replayed.request.source == failing.source
    assert time.time() - (replayed.request.submitted_at or 0) < 60


async def test_no_buildctl_outlives_a_sigkilled_worker(
    fleet: BuildfleetClient, redis_url: str, buildkitd: str, base_image: str, tmp_path: Path
) -> None:
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(f"FROM {base_image}\nRUN echo sleeping; sleep 120\n")
    config = worker_config(redis_url, daemons=[buildkitd])
    request = BuildRequest(source=LocalSource(path=str(context)), push=False)
    with worker_processes(config, count=1, logs=tmp_path) as [victim]:
        await fleet.submit(request)
        async for event in fleet.watch(request.id):
            if getattr(event, "text", "").startswith("sleeping"):
                break
        assert _buildctl_pids(context)  # the build is running under this worker
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        for _ in range(100):  # parent-death signal, or its progress pipe breaking: prompt
            if not _buildctl_pids(context):
                break
            await asyncio.sleep(0.05)
        assert _buildctl_pids(context) == []
        await fleet.cancel(request.id)  # the build itself is re-run later; not this test's


def _buildctl_pids(context: Path) -> list[str]:
    found = subprocess.run(["pgrep", "-f", f"buildctl.*{context}"], capture_output=True, text=True)
    return found.stdout.split()


async def test_a_build_waiting_for_capacity_is_cancelled_at_once(
    fleet: BuildfleetClient, redis_url: str, tmp_path: Path
) -> None:
    config = worker_config(
        redis_url, backend="simulate", daemons=DAEMONS[:1], max_builds=1, concurrency=2
    )
    occupying = simulated(tmp_path, repo="a", **{"simulate.duration_s": "30"})
    waiting = simulated(tmp_path, repo="b")
    async with worker_in_task(config):
        await fleet.submit(occupying)
        while (await fleet.get(occupying.id)).status != "running":
            await asyncio.sleep(0.05)
        await fleet.submit(waiting)
        while (await fleet.get(waiting.id)).status != "running":  # started, no slot yet
            await asyncio.sleep(0.05)
        await fleet.cancel(waiting.id, reason="not needed")
        result = await fleet.wait(waiting.id)
        assert (await fleet.get(occupying.id)).status == "running"  # still holding the slot
        await fleet.cancel(occupying.id)
    assert (result.status, result.error, result.daemon) == ("cancelled", "not needed", None)
