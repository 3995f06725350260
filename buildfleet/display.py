"""Live progress of one build: rich on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator
from typing import TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from producer.client import FleetStatus
from producer.contract import (
    BuildEvent,
    BuildResult,
    Cancelled,
    DeadLettered,
    Failed,
    Log,
    Queued,
    Retrying,
    Started,
    Step,
    Succeeded,
    result_of,
)


def _step_state(step: Step) -> tuple[str, str]:
    if step.error:
        return "ERROR", "bold red"
    if step.cached:
        return "CACHED", "cyan"
    if step.completed:
        return "done", "green"
    return "running", "yellow"


def _duration(step: Step) -> str:
    if step.started is None:
        return ""
    end = step.completed or time.time()
    return f"{end - step.started:.1f}s"


def describe(event: BuildEvent) -> str:
    """One plain line per event (what the non-terminal display prints)."""
    match event:
        case Queued(priority=priority):
            return f"queued ({priority})"
        case Started(worker=worker, backend=backend, attempt=attempt):
            return f"started attempt {attempt} on {worker} ({backend})"
        case Step(name=name) as step:
            state, _style = _step_state(step)
            return f"step {state:<7} {name} {_duration(step)}".rstrip()
        case Log(text=text):
            return "  | " + text.rstrip("\n").replace("\n", "\n  | ")
        case Retrying(reason=reason, next_attempt_at=when):
            return f"retrying in {max(0.0, when - time.time()):.1f}s: {reason}"
        case Succeeded(result=result):
            return f"succeeded {result.digest or ''}".rstrip()
        case Failed(result=result):
            where = f" at {result.failed_step}" if result.failed_step else ""
            return f"failed{where}: {result.error}"
        case Cancelled(reason=reason):
            return f"cancelled: {reason}"
        case DeadLettered(reason=reason):
            return f"dead-lettered: {reason}"
    return repr(event)  # pragma: no cover - the union is exhaustive


async def follow_plain(
    build_id: str, events: AsyncIterator[BuildEvent], out: TextIO, *, logs: bool = False
) -> BuildResult | None:
    """One line per event; a step only when it starts and when it ends, not on every update."""
    prefix = f"[{build_id}]"
    shown: dict[str, str] = {}
    async for event in events:
        if isinstance(event, Log) and not logs:
            continue
        if isinstance(event, Step):
            state, _style = _step_state(event)
            if shown.get(event.vertex) in (state, "done", "CACHED", "ERROR"):
                continue
            shown[event.vertex] = state
        print(prefix, describe(event), file=out, flush=True)
        if (result := result_of(event)) is not None:
            return result
    return None


async def follow_rich(
    build_id: str, events: AsyncIterator[BuildEvent], console: Console
) -> BuildResult | None:
    steps: dict[str, Step] = {}
    status = Text("queued")
    began = time.monotonic()

    def render() -> Group:
        table = Table.grid(padding=(0, 1))
        for step in steps.values():
            state, style = _step_state(step)
            table.add_row(Text(f"{state:>7}", style=style), step.name, _duration(step))
        header = Text.assemble(
            ("build ", "bold"), (build_id, "bold"), f"  {time.monotonic() - began:5.1f}s  ", status
        )
        return Group(header, table)

    with Live(render(), console=console, refresh_per_second=8, transient=False) as live:
        async for event in events:
            if isinstance(event, Step):
                steps[event.vertex] = event
            elif not isinstance(event, Log):
                status = Text(describe(event))
            live.update(render())
            if (result := result_of(event)) is not None:
                return result
    return None


async def follow(
    build_id: str, events: AsyncIterator[BuildEvent], *, logs: bool = False
) -> BuildResult | None:
    """Show a build's events until it ends; rich when stdout is a terminal."""
    if sys.stdout.isatty():
        return await follow_rich(build_id, events, Console())
    return await follow_plain(build_id, events, sys.stdout, logs=logs)


def status_lines(status: FleetStatus) -> list[str]:
    """`buildfleet status` for people."""
    waiting = ", ".join(f"{priority} {count}" for priority, count in status.waiting.items())
    lines = [
        f"waiting       {waiting}",
        f"running       {status.running}",
        f"dead letters  {status.dead_letters}",
        f"workers       {len(status.workers)} alive",
    ]
    for worker in status.workers:
        lines.append(
            f"  {worker.name:<28} heartbeat {worker.heartbeat_age_s:5.1f}s ago  "
            f"{len(worker.builds)}/{worker.concurrency} builds  {worker.backend}"
        )
    lines.append(f"daemons       {len(status.daemons)}")
    for daemon in status.daemons:
        health = "healthy" if daemon.healthy else "DOWN"
        lines.append(
            f"  {daemon.address:<28} {health:<8} {daemon.in_flight}/{daemon.capacity} in flight"
        )
    return lines
