"""`buildfleet rebuild MANIFEST`: many images at once (a base-image CVE, a nightly refresh).

The manifest is TOML: an optional `[defaults]` table merged into every `[[build]]` table,
each of which is a build request in the contract's shape, e.g.

    [defaults]
    priority = "batch"
    build_args = { BASE = "registry.local/base/debian:12" }

    [[build]]
    source = { type = "git", url = "https://forge/acme/api.git", ref = "main" }
    images = ["registry.local/acme/api:nightly"]

Every entry is validated before anything is submitted. Builds go in at `--rate` per second
(batch priority unless an entry says otherwise, so interactive builds keep going first),
then one reader of the fleet's event stream follows them all to a summary.
"""

from __future__ import annotations

import asyncio
import sys
import time
import tomllib
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from producer.client import BuildfleetClient
from producer.contract import (
    BuildEvent,
    BuildRequest,
    BuildResult,
    ContractError,
    request_from_builtins,
    result_of,
)


def load_manifest(path: Path) -> list[BuildRequest]:
    """Every build of the manifest, validated; an error names the entry and the field."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ContractError(f"{path}: cannot read ({exc.strerror})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ContractError(f"{path}: not valid TOML ({exc})") from exc
    defaults: dict[str, Any] = {"priority": "batch", **data.get("defaults", {})}
    entries = data.get("build", [])
    if not isinstance(entries, list) or not entries:
        raise ContractError(f"{path}: expected one or more [[build]] tables")
    requests = []
    for index, entry in enumerate(entries):
        try:
            requests.append(request_from_builtins({**defaults, **entry}))
        except ContractError as exc:
            raise ContractError(f"{path}: build #{index + 1}: {exc}") from exc
    return requests


async def rebuild(
    fleet: BuildfleetClient, requests: Sequence[BuildRequest], rate: float, console: Console
) -> list[BuildResult]:
    """Submit at `rate` per second, follow to the end, return the results in manifest order."""
    wanted = {request.id for request in requests}
    results: dict[str, BuildResult] = {}
    events = fleet.tail(after=await fleet.last_event_id())  # sees every event of ours
    follower = asyncio.create_task(_follow(events, wanted, results))
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        submitted = progress.add_task("submitted", total=len(requests))
        ended = progress.add_task("ended", total=len(requests))
        began = time.monotonic()
        batch = max(1, int(rate))
        for start in range(0, len(requests), batch):
            await fleet.submit_many(requests[start : start + batch])
            progress.update(submitted, completed=min(len(requests), start + batch))
            progress.update(ended, completed=len(results))
            next_batch_at = began + (start + batch) / rate
            await asyncio.sleep(max(0.0, next_batch_at - time.monotonic()))
        while not follower.done():
            progress.update(ended, completed=len(results))
            await asyncio.wait([follower], timeout=0.25)
        progress.update(ended, completed=len(results))
    await follower
    return [results[request.id] for request in requests]


async def _follow(
    events: AsyncIterator[BuildEvent], wanted: set[str], results: dict[str, BuildResult]
) -> None:
    async for event in events:
        result = result_of(event)
        if event.build_id in wanted and result is not None:
            results[event.build_id] = result
            if len(results) == len(wanted):
                return


def summarize(requests: Sequence[BuildRequest], results: Sequence[BuildResult]) -> Table:
    statuses = Counter(result.status for result in results)
    table = Table(title=", ".join(f"{n} {status}" for status, n in sorted(statuses.items())))
    for column in ("build", "images", "status", "attempts", "time", "error"):
        table.add_column(column)
    for request, result in zip(requests, results, strict=True):
        if result.ok and len(results) > 20:
            continue  # a long run lists only what needs attention
        table.add_row(
            request.id,
            ", ".join(request.images),
            result.status,
            str(result.attempts),
            f"{result.build_s:.1f}s",
            result.error or "",
        )
    return table


async def run_rebuild(fleet: BuildfleetClient, manifest: Path, rate: float) -> list[BuildResult]:
    requests = load_manifest(manifest)
    console = Console(file=sys.stderr)
    results = await rebuild(fleet, requests, rate, console)
    console.print(summarize(requests, results))
    return results
