"""`buildfleet rebuild`: a manifest of many builds, validated first, followed to a summary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import redis.asyncio as aioredis

from producer.client import BuildfleetClient

from fleet import worker_config, worker_processes


def rebuild(redis_url: str, manifest: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "buildfleet.cli", "rebuild", str(manifest), *args],
        cwd=manifest.parent,
        capture_output=True,
        text=True,
        env={"BUILDFLEET_REDIS_URL": redis_url, "PATH": "/usr/bin:/bin"},
        timeout=120,
    )


def write_manifest(path: Path, entries: list[str]) -> Path:
    manifest = path / "nightly.toml"
    manifest.write_text(
        '[defaults]\npush = false\nlabels = { "simulate.duration_s" = "0.1" }\n\n'
        + "\n".join(entries)
    )
    return manifest


def entry(n: int, outcome: str = "succeeded") -> str:
    return (
        f'[[build]]\nsource = {{ type = "local", path = "/src/app-{n}" }}\n'
        f'labels = {{ "simulate.outcome" = "{outcome}" }}\n'
    )


async def test_a_manifest_is_built_at_batch_priority_and_summarized(
    redis: aioredis.Redis, redis_url: str, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path, [entry(n) for n in range(11)] + [entry(11, "failed")])
    config = worker_config(redis_url, backend="simulate", concurrency=4)
    with worker_processes(config, count=2, logs=tmp_path):
        done = rebuild(redis_url, manifest, "--rate", "50", "--wait", "--json")
    assert done.returncode == 1, done.stderr  # one build failed
    report = json.loads(done.stdout)
    assert sorted(r["status"] for r in report["builds"]) == ["failed"] + ["succeeded"] * 11
    assert "11 succeeded" in done.stderr and "1 failed" in done.stderr
    fleet = BuildfleetClient(redis)  # borrows the fixture's connection
    state = await fleet.get(report["builds"][0]["build_id"])
    assert state.request is not None
    assert state.request.priority == "batch"


async def test_a_bad_entry_stops_the_batch_before_anything_is_submitted(
    redis: aioredis.Redis, redis_url: str, tmp_path: Path
) -> None:
    bad = '[[build]]\nsource = { type = "local", path = "/src/x" }\nimages = ["NOT A NAME"]\n'
    manifest = write_manifest(tmp_path, [entry(0), entry(1), bad])
    done = rebuild(redis_url, manifest)
    assert done.returncode == 2
    assert "nightly.toml:" in done.stderr
    assert "build #3" in done.stderr and "$.images[0]" in done.stderr
    assert await redis.zcard("buildfleet:queue") == 0
