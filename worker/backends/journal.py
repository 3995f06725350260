"""Reading the simulate backend's journal: what ran where, and when. Pure.

Each line is one stretch of simulated work (worker.backends.simulate.JournalEntry). One
run of a build is a sequence of stretches that never overlap one another, so two stretches
of the same build that overlap in time are two runs at once; the most stretches overlapping
on one placement is the most builds it ever ran at once.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

import msgspec

from worker.backends.simulate import JournalEntry

_decoder: Final = msgspec.json.Decoder(JournalEntry)


def read_journal(path: Path) -> list[JournalEntry]:
    """Every complete line (a worker killed mid-write may leave a partial last one)."""
    entries = []
    for line in path.read_bytes().splitlines():
        try:
            entries.append(_decoder.decode(line))
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
    return entries


def overlapping_runs(entries: Iterable[JournalEntry]) -> list[str]:
    """Builds that ran twice at the same time (two stretches of theirs overlap)."""
    by_build: dict[str, list[JournalEntry]] = defaultdict(list)
    for entry in entries:
        by_build[entry.build_id].append(entry)
    overlapping = []
    for build_id, stretches in by_build.items():
        ordered = sorted(stretches, key=lambda e: e.began)
        if any(later.began < earlier.ended for earlier, later in itertools.pairwise(ordered)):
            overlapping.append(build_id)
    return sorted(overlapping)


def peak_concurrency(entries: Sequence[JournalEntry]) -> dict[str, int]:
    """The most builds that ran at once on each placement."""
    edges: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for entry in entries:
        edges[entry.placement or ""] += [(entry.began, 1), (entry.ended, -1)]
    peaks = {}
    for placement, points in edges.items():
        running = peak = 0
        for _, step in sorted(points):  # at equal times an end (-1) sorts before a start
            running += step
            peak = max(peak, running)
        peaks[placement] = peak
    return peaks
