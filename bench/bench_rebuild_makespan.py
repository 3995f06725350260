"""Makespan of a batch: N simulated builds on 3 daemons with a few slots each, against the
lower bound max(longest build, total work / total slots).

Durations are log-normal (median 30 s, sigma 0.8, clipped to 3 s - 5 min: a few seconds to
a few minutes) scaled down by `--scale`; each entry is its own recipe. The batch runs three
times on the same fleet: twice knowing no durations, in the manifest's order (a random one,
then one listing the longest builds last, as a manifest that grew by appending big images
does), then knowing every recipe's duration from the run before and starting the longest
first. Makespan is read from the simulate backend's journal (first start to last end).
The workers take as many builds as there are slots, and a build takes the first daemon
with room (`spill_after_s = 0`): what is measured is the order, not cache affinity.

    .venv/bin/python bench/bench_rebuild_makespan.py [--builds 500 --scale 100 --slots 4]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from redis import Redis

from buildfleet import services
from producer.keys import DURATIONS_KEY

DAEMONS = 3
WORKERS = 2


def durations(count: int, scale: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [min(300.0, max(3.0, rng.lognormvariate(3.4, 0.8))) / scale for _ in range(count)]


def write_manifest(path: Path, seconds: list[float], order: list[int]) -> Path:
    parts = ["[defaults]\npush = false\n"]
    for n in order:
        duration = seconds[n]
        parts.append(
            f'[[build]]\nsource = {{ type = "local", path = "/src/app-{n}" }}\n'
            f'labels = {{ "simulate.duration_s" = "{duration:.4f}" }}\n'
        )
    path.write_text("\n".join(parts))
    return path


def start_workers(url: str, slots: int, journal: Path, logs: Path) -> list[subprocess.Popen[bytes]]:
    daemons = [{"address": f"tcp://daemon-{n}:1234", "max_builds": slots} for n in range(DAEMONS)]
    env = {
        **os.environ,
        "BUILDFLEET_REDIS_URL": url,
        "BUILDFLEET_WORKER_BACKEND": "simulate",
        "BUILDFLEET_WORKER_CONCURRENCY": str(DAEMONS * slots // WORKERS),
        "BUILDFLEET_WORKER_POLL_DELAY_S": "0.005",
        "BUILDFLEET_BUILDKIT_DAEMONS": json.dumps(daemons),
        "BUILDFLEET_SIMULATE_JOURNAL": str(journal),
        "BUILDFLEET_SCHEDULING_SPILL_AFTER_S": "0",
    }
    return [
        subprocess.Popen(
            [sys.executable, "-m", "buildfleet.cli", "worker"],
            env=env,
            stdout=(logs / f"worker-{n}.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        for n in range(WORKERS)
    ]


def forget_durations(url: str) -> None:
    redis = Redis.from_url(url)
    redis.delete(DURATIONS_KEY)
    redis.close()


def night(url: str, manifest: Path, batch: str, journal: Path, log: Path) -> float:
    """Run the batch to its end; its makespan from the journal."""
    journal.write_bytes(b"")
    env = {**os.environ, "BUILDFLEET_REDIS_URL": url}
    argv = [sys.executable, "-m", "buildfleet.cli", "rebuild", str(manifest), "--batch", batch,
            "--rate", "1e9", "--wait"]  # fmt: skip
    with log.open("wb") as output:
        done = subprocess.run(argv, env=env, stdout=output, stderr=output, check=False)
    if done.returncode != 0:
        raise SystemExit(f"rebuild failed ({done.returncode}); see {log}")
    spans = [json.loads(line) for line in journal.read_text().splitlines()]
    return max(s["ended"] for s in spans) - min(s["began"] for s in spans)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--builds", type=int, default=500)
    parser.add_argument("--scale", type=float, default=100.0, help="durations divided by this")
    parser.add_argument("--slots", type=int, default=4, help="builds at once per daemon")
    parser.add_argument("--seed", type=int, default=12)
    options = parser.parse_args()
    seconds = durations(options.builds, options.scale, options.seed)
    total_slots = DAEMONS * options.slots
    longest, work = max(seconds), sum(seconds)
    bound = max(longest, work / total_slots)
    with tempfile.TemporaryDirectory(prefix="bench-makespan-") as tmp:
        workdir = Path(tmp)
        shuffled = list(range(options.builds))
        random.Random(options.seed + 1).shuffle(shuffled)
        random_order = write_manifest(workdir / "random.toml", seconds, shuffled)
        longest_last = sorted(range(options.builds), key=seconds.__getitem__)
        appended = write_manifest(workdir / "appended.toml", seconds, longest_last)
        journal = workdir / "journal.jsonl"
        redis = services.start_redis(workdir)
        workers = start_workers(redis.address, options.slots, journal, workdir)
        try:
            time.sleep(1.0)  # the workers connect
            url = redis.address
            first = night(url, random_order, "random", journal, workdir / "random.log")
            forget_durations(url)
            worst = night(url, appended, "appended", journal, workdir / "appended.log")
            second = night(url, appended, "known", journal, workdir / "known.log")
        finally:
            for worker in workers:
                worker.terminate()
            for worker in workers:
                worker.wait(timeout=30)
            redis.stop()
    print(
        f"{options.builds} builds, {DAEMONS} daemons x {options.slots} slots, durations "
        f"{min(seconds):.2f}-{max(seconds):.2f} s (median {sorted(seconds)[len(seconds) // 2]:.2f} s"
        f", scaled 1/{options.scale:g}), total work {sum(seconds):.1f} s"
    )
    print(f"lower bound max(longest, work/slots):     {bound:7.2f} s")
    print(f"no durations known, random order:       {first:7.2f} s  ({first / bound:.3f}x)")
    print(f"no durations known, longest listed last: {worst:7.2f} s  ({worst / bound:.3f}x)")
    print(
        f"durations known, longest first:          {second:7.2f} s  ({second / bound:.3f}x,"
        " goal <= 1.15x)"
    )
    print(
        f"reproduce: .venv/bin/python bench/bench_rebuild_makespan.py --builds {options.builds}"
        f" --scale {options.scale:g} --slots {options.slots} --seed {options.seed}"
    )


if __name__ == "__main__":
    main()
