"""The fault soak's short form (bench/soak.py --short): about 3,300 simulated builds through
three supervised worker processes and a real redis-server while workers are SIGKILLed and
SIGSTOPped past their lease, Redis is shut down and SIGKILLed, and a daemon goes away.

Nothing may be lost, end twice, run twice at once, or exceed a daemon's capacity. Timings
(recovery, throughput) are printed by the soak and recorded in docs/reliability.md, never
asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(900)


def test_the_short_soak_loses_nothing_and_runs_nothing_twice() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "soak.py"), "--short", "--json"],
        capture_output=True,
        text=True,
        timeout=840,
        cwd=REPO,
    )
    figures = json.loads(proc.stdout.splitlines()[-1]) if proc.stdout.strip() else {}
    report = f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert figures, report
    assert figures["builds"] == 3300, report
    assert figures["lost"] == 0, report
    assert figures["duplicates"] == 0, report
    assert figures["overlapping_runs"] == 0, report
    assert figures["capacity_violations"] == 0, report
    assert figures["outcomes"] == {"succeeded": 3300}, report
    # Every kind of fault was injected at least once.
    assert set(figures["faults"]) == {
        "worker_kill",
        "worker_pause",
        "redis_restart",
        "redis_kill",
        "daemon_away",
    }, report
    assert proc.returncode == 0, report
