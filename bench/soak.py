"""The fault soak: thousands of simulated builds through real worker processes while a fault
injector kills, pauses and restarts what the fleet runs on; then it counts what went wrong.

    .venv/bin/python bench/soak.py --short                      # about 3 minutes (CI runs it)
    .venv/bin/python bench/soak.py --builds 20000 --fault-s 600  # the long form

A real redis-server (append-only file) and worker processes (`buildfleet worker`, simulate
backend: builds of log-normal durations, 0.2-5 s, on 3 daemons with a few slots each) kept
running by a supervisor that restarts a dead worker like Kubernetes would. First a run
without faults (the baseline throughput), then one with the fault injector cycling through:

    worker_kill     SIGKILL a random worker (the supervisor starts another)
    worker_pause    SIGSTOP a random worker for longer than the lease, then SIGCONT
    redis_restart   Redis shut down cleanly (SIGTERM: SHUTDOWN, AOF written), back 2 s later
    redis_kill      Redis SIGKILLed with `appendfsync always`, back 2 s later from its AOF
    daemon_away     a daemon's builds fail and its probe says it is down, back 5 s later

Then it prints builds accepted, faults by kind, lost builds (no terminal event), duplicate
terminal events, overlapping runs of one build and capacity violations (both from the
simulate backend's journal), recovery times, and throughput with faults against without.
It exits 1 unless lost, duplicates, overlaps and violations are all 0. Its work directory
(worker logs, journal, Redis AOF) is removed after a clean run unless `--keep`; a failed
run keeps it for a look.

Recovery time of a fault: for a worker or daemon fault, how long until each build it
interrupted was back in line (a Retrying event: the attempt failed and was rescheduled) or
running again elsewhere (Started; a build taken from a dead or paused worker keeps its place
at the head of the queue, so this includes no wait behind the backlog), or ended; for a
Redis fault, how long after Redis was back until the fleet started a build again. A
rescheduled build then waits its backoff and its turn like any build (figures by fault kind
are printed too).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from buildfleet import services
from buildfleet.processes import Service
from producer.client import BuildfleetClient
from producer.contract import (
    BuildEvent,
    BuildRequest,
    LocalSource,
    Retrying,
    Started,
    decode_event,
    is_terminal,
)
from producer.keys import ACTIVE_BUILDS, EVENT_FIELD, EVENTS_STREAM, build_key, events_key
from worker.backends.journal import overlapping_runs, peak_concurrency, read_journal
from worker.subprocesses import die_with_this_process

DAEMONS = ("tcp://soak-a:1234", "tcp://soak-b:1234", "tcp://soak-c:1234")
SLOTS = 8
WORKERS = 3
CONCURRENCY = 10
LEASE_TTL_S = 4.0
SCHEDULING = {
    "LEASE_TTL_S": LEASE_TTL_S,
    "SLOT_TTL_S": 5.0,
    "REAP_INTERVAL_S": 1.0,
    "HEALTH_INTERVAL_S": 1.0,
    "WATCHDOG_INTERVAL_S": 5.0,
    "SPILL_AFTER_S": 0.2,
}
FAULTS = ("worker_kill", "worker_pause", "redis_restart", "redis_kill", "daemon_away")


def durations(count: int, rng: random.Random) -> list[float]:
    """Log-normal build durations between 0.2 and 5 s (median about 0.6 s)."""
    return [min(5.0, max(0.2, rng.lognormvariate(-0.5, 0.8))) for _ in range(count)]


# --- the fleet under test ------------------------------------------------------------------


class SoakRedis:
    """redis-server on a fixed port with an append-only file, restartable in place."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = services.free_port()
        self.password = os.urandom(12).hex()
        self.service: Service | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.service = services.start_redis(
            self.workdir, port=self.port, password=self.password, timeout=60
        )

    def stop(self, *, kill: bool) -> None:
        assert self.service is not None
        if kill:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.service.process.pid, signal.SIGKILL)
        self.service.stop(grace=30)
        self.service = None


@dataclass
class Supervisor:
    """Keeps `count` worker processes running, restarting any that dies."""

    env: dict[str, str]
    logs: Path
    count: int
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    started: int = 0

    def spawn(self) -> subprocess.Popen[bytes]:
        self.started += 1
        log = (self.logs / f"worker-{self.started}.log").open("ab")
        return subprocess.Popen(
            [sys.executable, "-m", "buildfleet.cli", "worker"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_this_process(),  # noqa: PLW1509 - prctl only
        )

    async def run(self) -> None:
        self.processes = [self.spawn() for _ in range(self.count)]
        while True:
            await asyncio.sleep(0.5)
            for index, process in enumerate(self.processes):
                if process.poll() is not None:
                    self.processes[index] = self.spawn()

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGCONT)
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def worker_env(redis_url: str, journal: Path, outages: Path) -> dict[str, str]:
    daemons = [{"address": address, "max_builds": SLOTS} for address in DAEMONS]
    env = {
        **os.environ,
        "BUILDFLEET_REDIS_URL": redis_url,
        "BUILDFLEET_WORKER_BACKEND": "simulate",
        "BUILDFLEET_WORKER_CONCURRENCY": str(CONCURRENCY),
        "BUILDFLEET_WORKER_POLL_DELAY_S": "0.01",
        "BUILDFLEET_WORKER_DRAIN_GRACE_S": "0",
        "BUILDFLEET_BUILDKIT_DAEMONS": json.dumps(daemons),
        "BUILDFLEET_SIMULATE_JOURNAL": str(journal),
        "BUILDFLEET_SIMULATE_OUTAGE_FILE": str(outages),
        "BUILDFLEET_RETRY_BASE_DELAY_S": "0.2",
        "BUILDFLEET_RETRY_MAX_DELAY_S": "2",
        "BUILDFLEET_QUEUE_EVENTS_MAXLEN": "5000000",
    }
    env.update({f"BUILDFLEET_SCHEDULING_{name}": str(value) for name, value in SCHEDULING.items()})
    return env


# --- the faults --------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    kind: str
    began: float
    ended: float
    target: str
    """The worker's pid, the daemon, or "redis"."""


@dataclass
class Injector:
    redis: SoakRedis
    supervisor: Supervisor
    outages: Path
    rng: random.Random
    every_s: float
    faults: list[Fault] = field(default_factory=list)

    async def run(self, until: float) -> None:
        kinds = list(FAULTS)
        while time.monotonic() < until:
            await asyncio.sleep(self.every_s * self.rng.uniform(0.7, 1.3))
            kind = kinds[len(self.faults) % len(kinds)]
            if len(self.faults) % len(kinds) == 0:
                self.rng.shuffle(kinds)
            self.faults.append(await getattr(self, kind)())
            print(f"  fault: {self.faults[-1].kind} {self.faults[-1].target}", flush=True)

    def _victim(self) -> subprocess.Popen[bytes]:
        alive = [p for p in self.supervisor.processes if p.poll() is None]
        return self.rng.choice(alive)

    async def worker_kill(self) -> Fault:
        victim = self._victim()
        began = time.time()
        victim.send_signal(signal.SIGKILL)
        return Fault("worker_kill", began, began, str(victim.pid))

    async def worker_pause(self) -> Fault:
        victim = self._victim()
        began = time.time()
        victim.send_signal(signal.SIGSTOP)
        await asyncio.sleep(LEASE_TTL_S + 3.0)
        victim.send_signal(signal.SIGCONT)
        return Fault("worker_pause", began, time.time(), str(victim.pid))

    async def redis_restart(self, *, kill: bool = False) -> Fault:
        began = time.time()
        if kill:
            async with aioredis.Redis.from_url(self.redis.url) as client:
                await client.config_set("appendfsync", "always")
        await asyncio.to_thread(self.redis.stop, kill=kill)
        await asyncio.sleep(2.0)
        await asyncio.to_thread(self.redis.start)
        return Fault("redis_kill" if kill else "redis_restart", began, time.time(), "redis")

    async def redis_kill(self) -> Fault:
        return await self.redis_restart(kill=True)

    async def daemon_away(self) -> Fault:
        daemon = self.rng.choice(DAEMONS)
        began = time.time()
        self.outages.write_text(daemon + "\n")
        await asyncio.sleep(5.0)
        self.outages.write_text("")
        return Fault("daemon_away", began, time.time(), daemon)


# --- a phase -----------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    build_ids: list[str]
    began: float
    ended: float = 0.0

    @property
    def throughput(self) -> float:
        return len(self.build_ids) / max(1e-9, self.ended - self.began)


async def run_phase(
    fleet: BuildfleetClient, name: str, count: int, rng: random.Random, deadline_s: float
) -> Phase:
    requests = [
        BuildRequest(
            source=LocalSource(path=f"/soak/repo-{n % 40}"),
            push=False,
            priority="batch" if n % 3 else "interactive",
            labels={"simulate.duration_s": f"{duration:.3f}"},
        )
        for n, duration in enumerate(durations(count, rng))
    ]
    phase = Phase(name, [r.id for r in requests], time.time())
    for start in range(0, len(requests), 500):
        await _submit_patiently(fleet, requests[start : start + 500])
    give_up = time.monotonic() + deadline_s
    while time.monotonic() < give_up:
        with contextlib.suppress(Exception):
            if await _ended(fleet, phase.build_ids):
                break
        await asyncio.sleep(0.5)
    phase.ended = time.time()
    return phase


async def _submit_patiently(fleet: BuildfleetClient, requests: list[BuildRequest]) -> None:
    while True:
        try:
            await fleet.submit_many(requests)
            return
        except Exception:
            await asyncio.sleep(0.5)


async def _ended(fleet: BuildfleetClient, build_ids: list[str]) -> bool:
    if await fleet.redis.zcard(ACTIVE_BUILDS):
        return False
    statuses = await _statuses(fleet.redis, build_ids)
    return all(status in _TERMINAL for status in statuses.values())


_TERMINAL = {"succeeded", "failed", "cancelled", "dead_lettered"}


async def _statuses(redis: aioredis.Redis, build_ids: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for start in range(0, len(build_ids), 1000):
        chunk = build_ids[start : start + 1000]
        async with redis.pipeline(transaction=False) as pipe:
            for build_id in chunk:
                pipe.hget(build_key(build_id), "status")
            replies = await pipe.execute()
        out.update({b: r.decode() if r else None for b, r in zip(chunk, replies, strict=True)})
    return out


# --- what went wrong -----------------------------------------------------------------------


async def terminal_counts(redis: aioredis.Redis, build_ids: list[str]) -> Counter[str]:
    """Terminal events in each build's own stream (what `watch` replays)."""
    counts: Counter[str] = Counter()
    for start in range(0, len(build_ids), 500):
        chunk = build_ids[start : start + 500]
        async with redis.pipeline(transaction=False) as pipe:
            for build_id in chunk:
                pipe.xrange(events_key(build_id))
            replies = await pipe.execute()
        for build_id, entries in zip(chunk, replies, strict=True):
            counts[build_id] = sum(
                1 for _, fields in entries if is_terminal(decode_event(fields[EVENT_FIELD]))
            )
    return counts


async def all_events(redis: aioredis.Redis) -> list[BuildEvent]:
    events: list[BuildEvent] = []
    after = "-"
    while entries := await redis.xrange(EVENTS_STREAM, min=after, count=10_000):
        events += [decode_event(fields[EVENT_FIELD]) for _, fields in entries]
        after = "(" + entries[-1][0].decode()
    return events


def recovery_times(
    faults: list[Fault], events: list[BuildEvent], journal: list[Any]
) -> dict[str, list[float]]:
    """By kind of fault: per interrupted build (worker and daemon faults) or per Redis
    fault, how long until the fleet went on (see the module's docstring)."""
    runs: dict[str, list[Started | Retrying]] = defaultdict(list)
    ends: dict[str, float] = {}
    for event in events:
        if isinstance(event, Started | Retrying):
            runs[event.build_id].append(event)
        elif is_terminal(event):
            ends.setdefault(event.build_id, event.at)
    all_starts = sorted(
        e.at for history in runs.values() for e in history if isinstance(e, Started)
    )
    times: dict[str, list[float]] = defaultdict(list)
    for fault in faults:
        if fault.kind.startswith("redis"):
            after = [at for at in all_starts if at > fault.ended]
            if after:
                times[fault.kind].append(after[0] - fault.ended)
            continue
        for build_id in _interrupted(fault, runs, ends, journal):
            handled = [e.at for e in runs[build_id] if e.at > fault.began]
            resumed = min([*handled, ends.get(build_id, float("inf"))])
            if resumed != float("inf"):
                times[fault.kind].append(resumed - fault.began)
    return times


def _interrupted(
    fault: Fault,
    runs: dict[str, list[Started | Retrying]],
    ends: dict[str, float],
    journal: list[Any],
) -> set[str]:
    """The builds running where the fault struck: on the daemon (from the journal), or on
    the worker (its last Started or Retrying before the fault a Started by that worker)."""
    if fault.kind == "daemon_away":
        return {
            e.build_id
            for e in journal
            if e.placement == fault.target and e.began <= fault.began <= e.ended + 0.5
        }
    return {
        build_id
        for build_id, history in runs.items()
        if (before := [e for e in history if e.at <= fault.began])
        and isinstance(before[-1], Started)
        and before[-1].worker.endswith(f"-{fault.target}")
        and ends.get(build_id, float("inf")) > fault.began
    }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- the soak ------------------------------------------------------------------------------


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    (workdir / "logs").mkdir()
    journal, outages = workdir / "journal.jsonl", workdir / "outages"
    outages.write_text("")
    redis = SoakRedis(workdir)
    supervisor = Supervisor(worker_env(redis.url, journal, outages), workdir / "logs", WORKERS)
    supervising = asyncio.create_task(supervisor.run())
    injector = Injector(redis, supervisor, outages, rng, args.fault_every_s)
    try:
        async with BuildfleetClient.from_url(redis.url) as fleet:
            print(f"baseline: {args.baseline} builds, no faults", flush=True)
            baseline = await run_phase(fleet, "baseline", args.baseline, rng, args.deadline_s)
            print(f"with faults: {args.builds} builds, faults for {args.fault_s:.0f}s", flush=True)
            faulting = asyncio.create_task(injector.run(time.monotonic() + args.fault_s))
            faulted = await run_phase(fleet, "faults", args.builds, rng, args.deadline_s)
            await faulting
            # The phase may end before the last fault does; let the fleet settle after it.
            await run_phase(fleet, "settle", 0, rng, 60)
            ids = baseline.build_ids + faulted.build_ids
            statuses = await _statuses(fleet.redis, ids)
            terminals = await terminal_counts(fleet.redis, ids)
            events = await all_events(fleet.redis)
    finally:
        supervising.cancel()
        supervisor.stop()
        if redis.service is not None:
            redis.service.stop()
    entries = read_journal(journal)
    peaks = peak_concurrency(entries)
    recovery = recovery_times(injector.faults, events, entries)
    every_recovery = [t for times in recovery.values() for t in times]
    lost = [b for b in ids if statuses.get(b) not in _TERMINAL or terminals[b] == 0]
    return {
        "builds": len(ids),
        "outcomes": dict(Counter(statuses.values())),
        "faults": dict(Counter(f.kind for f in injector.faults)),
        "lost": len(lost),
        "duplicates": sum(1 for b in ids if terminals[b] > 1),
        "overlapping_runs": len(overlapping_runs(entries)),
        "capacity_violations": sum(1 for peak in peaks.values() if peak > SLOTS),
        "peak_per_daemon": peaks,
        "recovery_p50_s": round(percentile(every_recovery, 0.5), 2),
        "recovery_p99_s": round(percentile(every_recovery, 0.99), 2),
        "recoveries": len(every_recovery),
        "recovery_by_fault": {
            kind: {
                "p50_s": round(percentile(times, 0.5), 2),
                "p99_s": round(percentile(times, 0.99), 2),
                "max_s": round(max(times), 2),
                "count": len(times),
            }
            for kind, times in sorted(recovery.items())
        },
        "throughput_baseline": round(baseline.throughput, 1),
        "throughput_faults": round(faulted.throughput, 1),
        "throughput_ratio": round(faulted.throughput / baseline.throughput, 3),
        "workers_started": supervisor.started,
        "workdir": str(workdir),
        "lost_ids": lost[:20],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="the CI form: about 3 minutes")
    parser.add_argument("--builds", type=int, default=20_000)
    parser.add_argument("--baseline", type=int, default=5_000)
    parser.add_argument("--fault-s", type=float, default=600.0)
    parser.add_argument("--fault-every-s", type=float, default=8.0)
    parser.add_argument("--deadline-s", type=float, default=3600.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (logs, journal, AOF)"
    )
    args = parser.parse_args()
    if args.short:
        args.builds, args.baseline, args.fault_s, args.fault_every_s = 2500, 800, 75.0, 5.0
        args.deadline_s = 300.0
    figures = asyncio.run(soak(args))
    command = " ".join(["python", "bench/soak.py", *sys.argv[1:]])
    if args.json:
        print(json.dumps({**figures, "command": command}))
    else:
        for name, value in figures.items():
            print(f"{name:>20}: {value}")
        print(f"{'reproduce':>20}: {command}")
    ok = not (
        figures["lost"]
        or figures["duplicates"]
        or figures["overlapping_runs"]
        or figures["capacity_violations"]
    )
    if ok and not args.keep:
        shutil.rmtree(figures["workdir"], ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
