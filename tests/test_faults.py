"""Faults injected for real: Redis restarted, killed, starved of memory and failed over; a
worker paused past its lease; a build's job lost. Each build still ends exactly once."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis
from faults import OwnRedis, events, started_by, terminal_counts, until

from buildfleet import services
from producer.client import BuildfleetClient, BuildNotFound
from producer.contract import (
    TERMINAL_STATUSES,
    BuildRequest,
    ContractError,
    LocalSource,
    Retrying,
    Started,
    is_terminal,
)
from producer.keys import CANCEL_CHANNEL, DEFAULT_QUEUE, in_progress_key, job_key, lease_key
from producer.settings import QueueSettings
from producer.store import Begun, BuildStore
from producer.workers import WorkerBeat
from worker.backends.journal import overlapping_runs, peak_concurrency, read_journal
from worker.capacity import Capacity
from worker.recovery import Reaper, Watchdog
from worker.retry import RetrySettings
from worker.settings import SchedulingSettings, SimulateSettings

from fleet import QUICK_RECOVERY, worker_config, worker_in_task, worker_processes
from registry import served_digest

pytestmark = pytest.mark.timeout(300)

DAEMON = "tcp://daemon-a:1234"


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path)
    try:
        yield server
    finally:
        server.close()


def simulated(tmp_path: Path, **labels: str) -> BuildRequest:
    return BuildRequest(source=LocalSource(path=str(tmp_path)), push=False, labels=labels)


def log_text(logs: Path) -> str:
    return "\n".join(path.read_text(errors="replace") for path in sorted(logs.glob("worker-*")))


async def test_a_real_build_survives_a_redis_restart_in_its_middle(
    own_redis: OwnRedis, tmp_path: Path, buildkitd: str, registry: str, base_image: str
) -> None:
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(f"FROM {base_image}\nRUN sleep 4 && echo built\n")
    request = BuildRequest(
        source=LocalSource(path=str(context)),
        images=(f"{registry}/faults/redis-restart:1",),
    )
    config = worker_config(own_redis.url, daemons=[buildkitd])
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    with worker_processes(config, count=1, logs=logs) as [worker]:
        async with BuildfleetClient.from_url(own_redis.url) as fleet:
            await fleet.submit(request)
            await until(lambda: started_by(fleet.redis, request.id))
            await own_redis.restart(down_s=2.0)
            result = await fleet.wait(request.id)
            counts = await terminal_counts(fleet.redis)
        assert worker.poll() is None, "the worker process must ride out the restart"
    assert result.ok, result
    assert counts == {request.id: 1}
    assert served_digest(registry, "faults/redis-restart", "1") == result.digest
    text = log_text(logs)
    assert text.count("Redis unreachable") == 1, text[-3000:]
    assert "Redis is back" in text
    assert "Traceback" not in text


# (outcome of the build, the fault, what the build ends as, the path its end takes)
ERROR_PATHS = [
    ("succeeded", "oom", "succeeded"),
    ("succeeded", "restart", "succeeded"),
    ("temporary", "oom", "dead_lettered"),
    ("temporary", "restart", "dead_lettered"),
    ("failed", "kill", "failed"),
]


@pytest.mark.parametrize(("outcome", "fault", "ends_as"), ERROR_PATHS)
async def test_a_fault_at_the_moment_a_build_ends_still_gives_one_terminal_event(
    own_redis: OwnRedis, tmp_path: Path, outcome: str, fault: str, ends_as: str
) -> None:
    """The build ends (publishing its end, rescheduling, dead-lettering) while Redis is
    refusing writes, restarting, or killed and restarted from its AOF."""
    budget = RetrySettings(budget_s=4.0, base_delay_s=0.2, max_delay_s=0.5)
    config = worker_config(
        own_redis.url,
        backend="simulate",
        retry=budget,
        simulate=SimulateSettings(duration_s=1.5, outcome=outcome),  # type: ignore[arg-type]
    )
    request = simulated(tmp_path)
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    with worker_processes(config, count=1, logs=logs) as [worker]:
        async with BuildfleetClient.from_url(own_redis.url) as fleet:
            await fleet.submit(request)
            await until(lambda: started_by(fleet.redis, request.id))
            await asyncio.sleep(1.0)  # the build ends 0.5 s into the fault
            match fault:
                case "oom":
                    async with own_redis.refusing_writes():
                        await asyncio.sleep(2.5)
                case "restart":
                    await own_redis.restart(down_s=2.5)
                case "kill":
                    await own_redis.restart(down_s=2.5, kill=True)
            result = await fleet.wait(request.id)
            seen = await events(fleet.redis)
        assert worker.poll() is None
    assert result.status == ends_as, result
    assert [e.build_id for e in seen if is_terminal(e)] == [request.id]
    if outcome == "temporary":
        assert any(isinstance(e, Retrying) for e in seen)
    assert "Traceback" not in log_text(logs)


async def test_a_worker_paused_past_its_lease_stops_its_build_and_changes_nothing(
    redis: aioredis.Redis, fleet: BuildfleetClient, redis_url: str, tmp_path: Path
) -> None:
    journal = tmp_path / "journal.jsonl"
    config = worker_config(
        redis_url,
        backend="simulate",
        daemons=[DAEMON],
        max_builds=1,
        simulate=SimulateSettings(duration_s=6.0, journal=str(journal), steps=1),
    )
    request = simulated(tmp_path)
    with worker_processes(config, count=2, logs=tmp_path) as workers:
        await fleet.submit(request)
        await until(lambda: started_by(redis, request.id))
        [first] = await started_by(redis, request.id)
        paused = next(w for w in workers if first.endswith(f"-{w.pid}"))
        paused.send_signal(signal.SIGSTOP)
        try:
            await until(lambda: _started_twice(redis, request.id))
        finally:
            paused.send_signal(signal.SIGCONT)
        result = await fleet.wait(request.id)
        await asyncio.sleep(2 * QUICK_RECOVERY.lease_ttl_s / 3)  # a heartbeat after the end
        status = await fleet.status()
        alive = [w.poll() is None for w in workers]
    assert result.ok
    assert await terminal_counts(redis) == {request.id: 1}
    entries = read_journal(journal)
    assert overlapping_runs(entries) == [], "the paused worker's run went on beside the new one"
    assert peak_concurrency(entries) == {DAEMON: 1}
    assert all(alive)
    assert sorted(w.name.rsplit("-", 1)[1] for w in status.workers) == sorted(
        str(w.pid) for w in workers
    )
    assert all(not w.builds for w in status.workers), "both idle once the build has ended"
    log = (tmp_path / "worker-0.log").read_text() + (tmp_path / "worker-1.log").read_text()
    assert "stopped: another attempt took over its lease" in log


async def _started_twice(redis: aioredis.Redis, build_id: str) -> bool:
    return len(await started_by(redis, build_id)) >= 2


class _Heard:
    """A heartbeat listener that notes what it hears."""

    def __init__(self) -> None:
        self.taken_over: list[tuple[str, str]] = []

    def lost(self, build_id: str, why: str) -> None:
        self.taken_over.append((build_id, why))

    def cancel(self, build_id: str, reason: str) -> bool:
        return False


async def test_a_reaped_attempt_cannot_renew_its_lapsed_lease_and_build_on(
    redis: aioredis.Redis, fleet: BuildfleetClient, tmp_path: Path
) -> None:
    """A worker cut off past its lease (paused, or Redis away) whose build the reaper
    handed on, and whose heartbeat comes back before another worker starts the build,
    hears that it lost the build: it does not re-create the lease and build on beside
    the re-run (the soak saw exactly that once, as an overlap and a daemon over capacity)."""
    request = simulated(tmp_path)
    await fleet.submit(request)
    settings = SchedulingSettings(lease_ttl_s=0.2, slot_ttl_s=0.2, reap_interval_s=0.1)
    await redis.set(in_progress_key(request.id), b"worker-a", px=60_000)  # arq's claim
    begun = await BuildStore(redis, QueueSettings()).start(
        Started(build_id=request.id, attempt=1, worker="worker-a"),
        "interactive",
        lease_s=settings.lease_ttl_s,
    )
    assert isinstance(begun, Begun)
    capacity = Capacity(redis, settings, worker="worker-a")
    capacity.hold(begun.token)
    reaper = Reaper(redis, settings, claim_ttl_s=60.0)
    await until(reaper.gate.open)
    await until(reaper.scan)  # the lease lapsed: seen leaseless twice, then handed on
    heard = _Heard()
    await capacity.renew(heard, WorkerBeat(name="worker-a", at=time.time()))
    assert heard.taken_over == [(request.id, "another attempt took over its lease")]
    assert not await redis.exists(lease_key(request.id))


async def test_a_sentinel_failover_while_builds_run_loses_nothing(tmp_path: Path) -> None:
    primary = OwnRedis(tmp_path, name="primary", min_replicas_to_write=1)
    replica = services.start_redis(
        tmp_path, name="replica", replica_of=primary.port, password=primary.password
    )
    await until(lambda: _takes_writes(primary.url))
    sentinel = services.start_sentinel(tmp_path, primary.port, password=primary.password)
    try:
        url = f"redis+sentinel://:{primary.password}@{sentinel.address}/buildfleet/0"
        config = worker_config(
            url,
            backend="simulate",
            daemons=[DAEMON],
            max_builds=4,
            simulate=SimulateSettings(duration_s=0.4),
        )
        requests = [simulated(tmp_path) for _ in range(60)]
        with worker_processes(config, count=2, logs=tmp_path) as workers:
            async with BuildfleetClient.connect(config.redis) as fleet:
                await fleet.submit_many(requests)
                await until(lambda: _ended_at_least(fleet, requests, 10))
                watcher = aioredis.Redis.from_url(f"redis://{sentinel.address}")
                await watcher.execute_command("SENTINEL", "FAILOVER", "buildfleet")
                await until(lambda: _primary_moved(watcher, primary.port))
                await watcher.aclose()
                results = await asyncio.gather(*(fleet.wait(r.id) for r in requests))
                counts = await terminal_counts(fleet.redis)
            assert all(w.poll() is None for w in workers)
        assert all(r.ok for r in results)
        assert counts == {r.id: 1 for r in requests}
    finally:
        sentinel.stop()
        replica.stop()
        primary.close()


async def test_a_wait_on_a_build_redis_lost_ends_instead_of_hanging(
    redis: aioredis.Redis, fleet: BuildfleetClient, tmp_path: Path
) -> None:
    # What a replica promoted before the build's writes reached it looks like: nothing.
    request = simulated(tmp_path)
    await fleet.submit(request)
    waiting = asyncio.create_task(fleet.wait(request.id))
    await asyncio.sleep(0.5)
    assert not waiting.done()
    await redis.flushall()
    with pytest.raises(BuildNotFound):
        await asyncio.wait_for(waiting, timeout=30)


async def _takes_writes(url: str) -> bool:
    """The primary has a replica in sync, so `min-replicas-to-write` lets writes through."""
    async with aioredis.Redis.from_url(url) as client:
        try:
            return bool(await client.set("buildfleet:test:probe", "1", px=1000))
        except aioredis.ResponseError:
            return False


async def _all_ended(fleet: BuildfleetClient, requests: list[BuildRequest]) -> bool:
    states = [await fleet.get(r.id) for r in requests]
    return all(state.status in TERMINAL_STATUSES for state in states)


async def _ended_at_least(fleet: BuildfleetClient, requests: list[BuildRequest], n: int) -> bool:
    counts = await terminal_counts(fleet.redis)
    return len(counts) >= n


async def _primary_moved(sentinel: aioredis.Redis, old_port: int) -> bool:
    _host, port = await sentinel.execute_command(
        "SENTINEL", "GET-MASTER-ADDR-BY-NAME", "buildfleet"
    )
    return int(port) != old_port


async def test_a_wait_rides_out_redis_going_away_in_the_middle_of_its_existence_check(
    own_redis: OwnRedis, tmp_path: Path
) -> None:
    """Redis goes away while a wait's first read (does the build exist?) is in flight, as
    a failover's CLIENT KILL or a crash does it: the wait retries once Redis is back
    instead of failing with FleetUnavailable."""
    request = simulated(tmp_path)
    async with BuildfleetClient.from_url(own_redis.url) as fleet:
        async with worker_in_task(worker_config(own_redis.url, backend="simulate")):
            await fleet.wait(await fleet.submit(request))
        await asyncio.sleep(1.5)  # on disk (appendfsync everysec)
        async with aioredis.Redis.from_url(own_redis.url) as admin:
            await admin.execute_command("CLIENT", "PAUSE", "10000", "ALL")
        waits = [asyncio.create_task(fleet.wait(request.id)) for _ in range(4)]
        await asyncio.sleep(0.3)  # each is now waiting for its EXISTS on the paused server
        assert not any(wait.done() for wait in waits)
        await own_redis.restart(down_s=0.5, kill=True)
        results = await asyncio.gather(*waits)
    assert all(result.ok for result in results)


async def test_a_build_whose_job_was_lost_is_requeued_and_then_built(
    redis: aioredis.Redis, fleet: BuildfleetClient, redis_url: str, tmp_path: Path
) -> None:
    """arq drops a job after a failure the worker could not record (its timeout while
    Redis was away): the watchdog finds the build and puts it back."""
    request = simulated(tmp_path)
    await fleet.submit(request)
    await redis.delete(job_key(request.id))  # what arq's failure bookkeeping does
    await redis.zrem(DEFAULT_QUEUE, request.id)
    settings = SchedulingSettings(watchdog_interval_s=0.2, lease_ttl_s=0.1)
    watchdog = Watchdog(BuildStore(redis, QueueSettings()), settings)
    await until(watchdog.gate.open)  # it waits for Redis to have been up a lease period
    assert await watchdog.scan() == {}  # seen once: only a suspect
    await asyncio.sleep(settings.watchdog_interval_s)
    assert await watchdog.scan() == {request.id: "requeued"}
    async with worker_in_task(worker_config(redis_url, backend="simulate")):
        result = await fleet.wait(request.id)
    assert result.ok
    lost = [e for e in await events(redis) if isinstance(e, Retrying)]
    assert [e.error_class for e in lost] == ["lost"]


async def test_a_build_lost_again_and_again_is_dead_lettered(
    redis: aioredis.Redis, fleet: BuildfleetClient, tmp_path: Path
) -> None:
    request = simulated(tmp_path)
    await fleet.submit(request)
    store = BuildStore(redis, QueueSettings())
    outcomes = []
    for _ in range(3):
        await redis.delete(job_key(request.id))
        await redis.zrem(DEFAULT_QUEUE, request.id)
        outcomes.append(await store.requeue_lost(request.id, max_requeues=2))
    assert outcomes == ["requeued", "requeued", "dead_lettered"]
    assert (await fleet.wait(request.id)).status == "dead_lettered"
    assert [letter.build_id for letter in await fleet.dead_letters()] == [request.id]


async def test_a_malformed_cancel_notice_does_not_stop_the_cancel_listener(
    redis: aioredis.Redis, fleet: BuildfleetClient, redis_url: str, tmp_path: Path
) -> None:
    config = worker_config(
        redis_url,
        backend="simulate",
        simulate=SimulateSettings(duration_s=30.0),
    )
    request = simulated(tmp_path)
    async with worker_in_task(config):
        await fleet.submit(request)
        await until(lambda: started_by(redis, request.id))
        await redis.publish(CANCEL_CHANNEL, b"\x00 not a notice")
        await redis.publish(CANCEL_CHANNEL, b'{"build_id": 7}')
        began = time.monotonic()
        await fleet.cancel(request.id, "changed my mind")
        result = await fleet.wait(request.id)
    assert result.status == "cancelled" and result.error == "changed my mind"
    assert time.monotonic() - began < QUICK_RECOVERY.lease_ttl_s, "heard on the channel"


async def test_status_lists_every_live_worker_and_each_daemon_against_its_capacity(
    fleet: BuildfleetClient, redis_url: str, tmp_path: Path
) -> None:
    config = worker_config(
        redis_url,
        backend="simulate",
        daemons=[DAEMON],
        max_builds=3,
        simulate=SimulateSettings(duration_s=20.0),
    )
    requests = [simulated(tmp_path) for _ in range(2)]
    with worker_processes(config, count=2, logs=tmp_path) as workers:
        await fleet.submit_many(requests)
        await until(lambda: _running(fleet, 2))
        status = await fleet.status()
        for request in requests:
            await fleet.cancel(request.id)
    assert sorted(w.name.rsplit("-", 1)[1] for w in status.workers) == sorted(
        str(w.pid) for w in workers
    )
    assert sum(len(w.builds) for w in status.workers) == 2
    [daemon] = status.daemons
    assert (daemon.address, daemon.in_flight, daemon.capacity) == (DAEMON, 2, 3)
    assert status.waiting == {"interactive": 0, "batch": 0}


async def _running(fleet: BuildfleetClient, n: int) -> bool:
    status = await fleet.status()
    return status.running >= n and all(d.in_flight for d in status.daemons)


async def test_a_timeout_beyond_the_fleet_s_maximum_is_refused_at_submit(
    fleet: BuildfleetClient, redis: aioredis.Redis, tmp_path: Path
) -> None:
    request = msgspec.structs.replace(simulated(tmp_path), timeout_s=7 * 24 * 3600.0)
    with pytest.raises(ContractError, match=r"timeout_s .* above the fleet's maximum"):
        await fleet.submit(request)
    assert await redis.zcard(DEFAULT_QUEUE) == 0
