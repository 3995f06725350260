"""The worker side's configuration sections: frozen, grouped by concern."""

from __future__ import annotations

import os
import socket
from typing import Annotated, Literal

import msgspec

PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]


class WorkerSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One worker process."""

    backend: Literal["buildkit", "kaniko", "simulate"] = "buildkit"
    concurrency: PositiveInt = 8
    """Builds this process runs at once (arq's `max_jobs`)."""
    name: str = msgspec.field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    poll_delay_s: PositiveFloat = 0.005
    default_timeout_s: PositiveFloat = 3600.0
    """A build's timeout when its request names none."""
    drain_grace_s: NonNegativeFloat = 60.0
    """On SIGTERM, how long in-flight builds may go on before they are re-queued."""
    log_cap_bytes: PositiveInt = 1 << 20
    """Log bytes kept per build attempt; past it one marker says how much was dropped."""
    log_tail_lines: PositiveInt = 20


class DaemonSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    address: str
    """buildkitd's gRPC address, e.g. tcp://buildkitd-0.buildkitd:1234."""
    max_builds: PositiveInt = 4


class BuildkitSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    daemons: tuple[DaemonSettings, ...] = ()
    buildctl: str = "buildctl"
    cancel_grace_s: PositiveFloat = 1.0
    """After SIGINT asks buildctl to cancel the solve, how long until SIGKILL."""
    tls_dir: str | None = None
    """mTLS to the daemons: a directory with ca.pem, cert.pem, key.pem (or ca.crt, tls.crt,
    tls.key), handed to buildctl as --tlsdir for builds and health probes."""

    def connection(self, address: str) -> list[str]:
        """buildctl and its connection flags, ready for a subcommand."""
        tls = ["--tlsdir", self.tls_dir] if self.tls_dir else []
        return [self.buildctl, "--addr", address, *tls]


class SimulateSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A backend that builds nothing: for load tests and capacity planning."""

    duration_s: NonNegativeFloat = 0.0
    outcome: Literal["succeeded", "failed", "temporary"] = "succeeded"
    steps: Annotated[int, msgspec.Meta(ge=0)] = 0
    journal: str | None = None
    """A file each simulated build appends one JSON line to: where it ran, from when to when
    (what tests and capacity planning count concurrency from)."""


class SchedulingSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Capacity leases, routing, recovery and health probes, shared by every worker."""

    routing: Literal["rendezvous", "random"] = "rendezvous"
    """rendezvous: a repository goes to the daemon holding its cache while it has room."""
    slot_ttl_s: PositiveFloat = 15.0
    """A capacity slot whose holder stops renewing it frees itself after this long."""
    lease_ttl_s: PositiveFloat = 10.0
    """A running build's lease; when its worker dies, the build is re-run soon after."""
    reap_interval_s: PositiveFloat = 2.0
    health_interval_s: PositiveFloat = 5.0
    probe_timeout_s: PositiveFloat = 5.0
    capacity_poll_max_s: PositiveFloat = 0.25
    """Longest pause between two tries for a slot while every daemon is full."""
    spill_after_s: NonNegativeFloat = 3.0
    """How long a build waits for a slot on the daemon holding its cache before it takes
    one on the next daemon in rank with room (0: spill at once)."""
    affinity_width: PositiveInt = 1
    """How many daemons, first in rank, count as holding a repository's cache."""
