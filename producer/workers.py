"""What a worker's heartbeat records about it in `buildfleet:workers`: written by every
worker (worker/capacity.py), read by `buildfleet status` (producer/client.py)."""

from __future__ import annotations

from typing import Final

import msgspec

WORKER_STALE_S: Final = 30.0
"""A worker whose last heartbeat is older than this is taken for gone."""


class DaemonBeat(msgspec.Struct, frozen=True):
    healthy: bool
    """Whether the worker's last probe of the daemon succeeded."""
    capacity: int
    """The daemon's `max_builds`."""


class WorkerBeat(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    at: float
    """When the heartbeat was sent (seconds since the epoch)."""
    builds: tuple[str, ...] = ()
    backend: str = ""
    concurrency: int = 0
    daemons: dict[str, DaemonBeat] = msgspec.field(default_factory=dict)
    """Where the worker places builds."""


worker_beat_encoder: Final = msgspec.json.Encoder()
worker_beat_decoder: Final = msgspec.json.Decoder(WorkerBeat)
