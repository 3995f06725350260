"""Enqueueing a large batch: `buildfleet rebuild` of an N-entry manifest, against the Python
client submitting the same requests, on one fresh Redis each.

The manifest's entries are git sources pinned to commits (so no repository is asked which
commit a ref names), 50 repositories, a build arg from [defaults]. No worker runs: this
measures putting builds in. The command's rate is taken from its builds' Queued events
(first to last), its peak memory from the kernel (ru_maxrss of the process); the baseline is
`BuildfleetClient.submit_many` in chunks of 500, the store's own path.

    .venv/bin/python bench/bench_rebuild_enqueue.py [--entries 10000 --rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis

from buildfleet import services
from buildfleet.rebuild.manifest import load_manifest
from producer.client import BuildfleetClient
from producer.contract import Queued, decode_event
from producer.keys import DEFAULT_QUEUE, EVENT_FIELD, EVENTS_STREAM

CHUNK = 500


def write_manifest(path: Path, entries: int) -> Path:
    parts = ['[defaults]\nbuild_args = { BASE = "registry.local/base/debian:12" }\n']
    for n in range(entries):
        repo = f"repo-{n % 50}"
        parts.append(
            "[[build]]\n"
            f'source = {{ type = "git", url = "https://forge.local/acme/{repo}.git", '
            f'ref = "main", commit = "{n:040x}" }}\n'
            f'context = "svc-{n % 7}"\n'
            f'images = ["registry.local/acme/{repo}-svc-{n}:nightly"]\n'
        )
    path.write_text("\n".join(parts))
    return path


async def queued_span(url: str) -> tuple[int, float]:
    redis = aioredis.Redis.from_url(url)
    try:
        times = [
            event.at
            for _, fields in await redis.xrange(EVENTS_STREAM)
            if isinstance(event := decode_event(fields[EVENT_FIELD]), Queued)
        ]
        depth = int(await redis.zcard(DEFAULT_QUEUE))
    finally:
        await redis.aclose()
    return depth, max(times) - min(times)


async def flush(url: str) -> None:
    redis = aioredis.Redis.from_url(url)
    await redis.flushall()
    await redis.aclose()


def run_cli(url: str, manifest: Path, log: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one `buildfleet rebuild`."""
    env = {**os.environ, "BUILDFLEET_REDIS_URL": url}
    argv = [sys.executable, "-m", "buildfleet.cli", "rebuild", str(manifest), "--rate", "1e9"]
    with log.open("wb") as output:
        began = time.perf_counter()
        process = subprocess.Popen(argv, env=env, stdout=output, stderr=output)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - began
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"rebuild failed ({process.returncode}); see {log}")
    return wall, usage.ru_maxrss / 1024


async def client_rate(url: str, manifest: Path) -> float:
    requests = [entry.request for entry in load_manifest(manifest)]
    async with BuildfleetClient.from_url(url) as fleet:
        began = time.perf_counter()
        for start in range(0, len(requests), CHUNK):
            await fleet.submit_many(requests[start : start + CHUNK])
        return len(requests) / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-rebuild-") as tmp:
        workdir = Path(tmp)
        manifest = write_manifest(workdir / "nightly.toml", options.entries)
        redis = services.start_redis(workdir)
        try:
            cli_rates, walls, peaks, client_rates = [], [], [], []
            for round_ in range(options.rounds):
                asyncio.run(flush(redis.address))
                wall, peak = run_cli(redis.address, manifest, workdir / f"cli-{round_}.log")
                depth, span = asyncio.run(queued_span(redis.address))
                assert depth == options.entries, depth
                cli_rates.append(options.entries / span)
                walls.append(wall)
                peaks.append(peak)
                asyncio.run(flush(redis.address))
                client_rates.append(asyncio.run(client_rate(redis.address, manifest)))
        finally:
            redis.stop()
    cli_rate, client = statistics.median(cli_rates), statistics.median(client_rates)
    print(f"entries: {options.entries}, rounds: {options.rounds} (medians)")
    print(f"rebuild, submissions:       {cli_rate:8.0f} /s  (goal >= 5000 /s)")
    print(
        f"rebuild, whole command:     {statistics.median(walls):8.2f} s  "
        f"({options.entries / statistics.median(walls):.0f} entries/s with start-up and parsing)"
    )
    print(f"rebuild, peak memory:       {statistics.median(peaks):8.1f} MiB")
    print(f"client submit_many (base):  {client:8.0f} /s")
    print(f"ratio rebuild / client:     {cli_rate / client:8.2f}")
    print(
        f"reproduce: .venv/bin/python bench/bench_rebuild_enqueue.py --entries {options.entries}"
        f" --rounds {options.rounds}"
    )


if __name__ == "__main__":
    main()
