"""What people are shown of builds and of the fleet: the web view's JSON (GET /v1/builds,
GET /v1/fleet) and the trace link `buildfleet get` prints. Pure.

A tenant's token sees its own builds only; the fleet's shape (queue depth, workers, daemons
and their load) is shared by everyone, but never which builds another tenant runs: a
worker's running builds are a count here, not their ids.
"""

from __future__ import annotations

from typing import Final

import msgspec

from producer.contract import TERMINAL_STATUSES, BuildRequest, BuildState, GitSource, Status
from producer.settings import TelemetrySettings

_SHORT_COMMIT: Final = 12


def trace_id_of(request: BuildRequest | None) -> str | None:
    """The id of a build's trace: the one its request carries (the gateway's, or the
    submitter's); None when it was submitted without a trace context."""
    traceparent = request.trace.traceparent if request else None
    return traceparent.split("-")[1] if traceparent else None


class BuildSummary(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One row of the web view's list of builds."""

    id: str
    status: Status
    attempt: int = 1
    priority: str = ""
    source: str = ""
    """The repository and revision (or the local path) it builds."""
    images: tuple[str, ...] = ()
    submitted_at: float = 0.0
    started_at: float | None = None
    """When its latest attempt started."""
    finished_at: float | None = None
    duration_s: float = 0.0
    """Queued: how long it has waited; running: how long its attempt has run; ended: from
    submission to the end."""
    daemon: str | None = None
    error: str | None = None
    trace_id: str | None = None
    trace_url: str | None = None


class WorkerView(msgspec.Struct, frozen=True):
    name: str
    heartbeat_age_s: float
    running: int
    concurrency: int
    backend: str


class DaemonView(msgspec.Struct, frozen=True):
    address: str
    healthy: bool
    in_flight: int
    capacity: int


class FleetView(msgspec.Struct, frozen=True):
    """What `buildfleet status` shows, without other tenants' build ids."""

    waiting: dict[str, int]
    running: int
    workers: tuple[WorkerView, ...]
    daemons: tuple[DaemonView, ...]


def describe_source(request: BuildRequest) -> str:
    match request.source:
        case GitSource(url=url, ref=ref, commit=commit):
            return f"{url}@{commit[:_SHORT_COMMIT] if commit else ref}"
        case source:
            return source.path


def summarize(
    state: BuildState,
    *,
    started_at: float | None,
    daemon: str | None,
    now: float,
    telemetry: TelemetrySettings,
) -> BuildSummary:
    """`state` as a row: `started_at` is when its latest attempt started, `daemon` where it
    runs now (an ended build's result says where it ran)."""
    request, result = state.request, state.result
    submitted = request.submitted_at if request else 0.0
    if started_at is not None:
        # The start is recorded to the millisecond (and a client may stamp its submission
        # on a clock of its own): a build never shows as started before it was submitted.
        started_at = max(started_at, submitted)
    finished = result.finished_at if result and result.finished_at else None
    if state.status in TERMINAL_STATUSES:
        end, start = finished or now, submitted
    elif state.status == "running" and started_at is not None:
        end, start = now, started_at
    else:
        end, start = now, submitted
    trace_id = trace_id_of(request)
    return BuildSummary(
        id=state.build_id,
        status=state.status,
        attempt=state.attempt,
        priority=request.priority if request else "",
        source=describe_source(request) if request else "",
        images=request.images if request else (),
        submitted_at=submitted,
        started_at=started_at,
        finished_at=finished,
        duration_s=round(max(0.0, end - start), 3) if start else 0.0,
        daemon=(result.daemon if result else None) or daemon,
        error=result.error if result else None,
        trace_id=trace_id,
        trace_url=telemetry.trace_url(trace_id) if trace_id else None,
    )
