"""A worker's /healthz and /readyz as the kubelet sees them: liveness never depends on Redis;
readiness says whether Redis and at least one BuildKit daemon answer, and which did not."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import msgspec
import pytest

from buildfleet import services
from buildfleet.services import free_port
from worker.app import running_worker
from worker.settings import WorkerConfig

from fleet import worker_config, worker_in_task

pytestmark = pytest.mark.timeout(120)

DEAD_DAEMON = "tcp://127.0.0.1:9"  # discard port: nothing listens


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        body, status = exc.read(), exc.code
    return status, json.loads(body) if body.startswith(b"{") else body.decode()


async def _aget(url: str) -> tuple[int, Any]:
    """The probe from another thread: the server runs on this test's event loop."""
    return await asyncio.to_thread(_get, url)


def _serving(config: WorkerConfig) -> tuple[WorkerConfig, str]:
    port = free_port()
    worker = msgspec.structs.replace(config.worker, metrics_port=port)
    return dataclasses.replace(config, worker=worker), f"http://127.0.0.1:{port}"


async def test_ready_while_one_daemon_answers_and_saying_which_does_not(
    redis_url: str, buildkitd: str
) -> None:
    config, url = _serving(worker_config(redis_url, daemons=[buildkitd, DEAD_DAEMON]))
    async with worker_in_task(config):
        assert await _aget(f"{url}/readyz") == (
            200,
            {"ready": True, "redis": "ok", "daemons": {buildkitd: True, DEAD_DAEMON: False}},
        )
        assert await _aget(f"{url}/healthz") == (200, {"status": "ok"})
        status, text = await _aget(f"{url}/metrics")
        assert status == 200 and "process_cpu_seconds_total" in text


async def test_not_ready_when_no_daemon_answers(redis_url: str) -> None:
    config, url = _serving(worker_config(redis_url, daemons=[DEAD_DAEMON]))
    async with worker_in_task(config):
        assert await _aget(f"{url}/readyz") == (
            503,
            {"ready": False, "redis": "ok", "daemons": {DEAD_DAEMON: False}},
        )


async def test_not_ready_but_alive_while_redis_is_down(tmp_path: Path) -> None:
    redis = services.start_redis(tmp_path)
    config, url = _serving(worker_config(redis.address, backend="simulate"))
    ready = (200, {"ready": True, "redis": "ok", "daemons": {}})
    try:
        # Not polling: arq's own loop ends when Redis goes away, which is not this test's
        # subject; the probes are served all the same.
        async with running_worker(config, handle_signals=False):
            assert await _aget(f"{url}/readyz") == ready
            redis.stop()
            status, state = await _aget(f"{url}/readyz")
            assert status == 503 and state["ready"] is False
            assert state["redis"].startswith("unreachable: ")
            assert await _aget(f"{url}/healthz") == (200, {"status": "ok"})
            # Back on the same port: ready again, nothing restarted.
            redis = services.spawn("redis", redis.process.args, redis.log_path, redis.address)  # type: ignore[arg-type]
            await asyncio.sleep(0.5)
            assert await _aget(f"{url}/readyz") == ready
    finally:
        redis.stop()
