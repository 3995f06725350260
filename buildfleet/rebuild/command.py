"""`buildfleet rebuild`: the sources read into a plan, then the plan run as a batch.

    SOURCES     TOML manifests, Skaffold configs (a file, a directory holding
                skaffold.yaml, or URL#REF[:PATH] in a repository), and with `--rules` (or
                no sources) the gateway's configured rules
    --base      only images whose Dockerfile builds FROM that image
    --dry-run   print what would be built and why, submit nothing

A run of a batch (`--batch ID`, else a new id) skips every entry that already succeeded in
an earlier run for the same commit, follows those still in flight, and submits the rest,
longest first, at `--rate` and at most `--max-in-flight` at once; `--wait` (and
`--report`/`--junit`) follows them to the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from buildfleet.rebuild import console
from buildfleet.rebuild.gitread import GitReader
from buildfleet.rebuild.manifest import load_manifest
from buildfleet.rebuild.pacing import longest_first, smoothed
from buildfleet.rebuild.plan import (
    BatchNotFound,
    Entry,
    Plan,
    Refused,
    SourceError,
    describe_source,
    entry_key,
    fingerprint,
    recipe_key,
)
from buildfleet.rebuild.record import BatchRecord, EntryRecord, durations, remember_durations
from buildfleet.rebuild.reference import ImageRef
from buildfleet.rebuild.report import BatchReport, make_report, write_json, write_junit
from buildfleet.rebuild.rules import rule_entries
from buildfleet.rebuild.runner import BatchCancelled, Follower, Item, Submitter
from buildfleet.rebuild.selection import pin_commits, select_base, with_build_args
from buildfleet.rebuild.skaffold import SkaffoldOptions, load_skaffold
from buildfleet.rebuild.trees import DEFAULT_CONFIG, LocalTree, Tree, open_git, split_remote
from producer.client import BuildfleetClient, FleetUnavailable
from producer.contract import TERMINAL_STATUSES
from producer.gateway.settings import Rule
from producer.store import CancelOutcome

BATCH_ID: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_CANCELLED_HOW: Final = {
    CancelOutcome.CANCELLED: "cancelled while queued",
    CancelOutcome.SIGNALLED: "stopped while running",
    CancelOutcome.LEFT_RUNNING: "left running",
    CancelOutcome.ENDED: "had ended",
    CancelOutcome.UNKNOWN: "never submitted",
}


def new_batch_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def check_batch_id(batch_id: str) -> str:
    if not BATCH_ID.match(batch_id):
        raise SourceError(f"batch id {batch_id!r}: expected letters, digits, - and _ (64 at most)")
    return batch_id


@dataclass(frozen=True, kw_only=True)
class Sources:
    """Where the batch's images come from, and how they are chosen."""

    paths: tuple[str, ...] = ()
    rules: bool = False
    gateway_rules: tuple[Rule, ...] = ()
    clone_url: str | None = None
    repos: tuple[str, ...] = ()
    skaffold: SkaffoldOptions = field(default_factory=SkaffoldOptions)
    base: ImageRef | None = None
    build_args: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    batch_id: str
    rate: float | None
    max_in_flight: int | None
    wait: bool
    resume_hint: str
    """The command line that resumes this batch, for messages."""
    base: str | None = None
    report_json: Path | None = None
    report_junit: Path | None = None


# --- from sources to a plan ---------------------------------------------------------------


Profiles = set[str] | None
"""The profiles the Skaffold configs of a source define (None: not a Skaffold source)."""


async def _skaffold(
    tree: Tree, path: str, sources: Sources, reader: GitReader
) -> tuple[Plan, Profiles]:
    async def open_remote(url: str, ref: str) -> Tree:
        return await open_git(reader, url, ref)

    return await load_skaffold(tree, path, sources.skaffold, open_remote)


async def _read_source(source: str, sources: Sources, reader: GitReader) -> tuple[Plan, Profiles]:
    remote = split_remote(source)
    if remote is not None:
        url, ref, path = remote
        try:
            tree = await open_git(reader, url, ref)
        except SourceError as exc:
            return Plan(refused=[Refused(source, source, str(exc), "failed", url)]), set()
        return await _skaffold(tree, path, sources, reader)
    local = Path(source)
    if source.endswith(".toml"):
        return Plan(entries=load_manifest(local)), None
    if source.endswith((".yaml", ".yml")):
        return await _skaffold(LocalTree(), source, sources, reader)
    if await asyncio.to_thread(local.is_dir):
        return await _skaffold(LocalTree(), os.path.join(source, DEFAULT_CONFIG), sources, reader)
    raise SourceError(
        f"{source}: expected a TOML manifest (.toml), a Skaffold config (.yaml, a directory "
        "holding skaffold.yaml, or URL#REF[:PATH])"
    )


def _drop_repeats(plan: Plan) -> Plan:
    """An image listed twice (two sources, or two profiles' worth) is built once."""
    seen: dict[str, Entry] = {}
    kept = Plan(refused=plan.refused, unselected=plan.unselected)
    for entry in plan.entries:
        key = entry_key(entry.request)
        if key in seen:
            reason = f"listed again: built once, as declared at {seen[key].origin}"
            kept.refused.append(Refused(entry.name, entry.origin, reason, "skipped"))
            continue
        seen[key] = entry
        kept.entries.append(entry)
    return kept


async def make_plan(sources: Sources, reader: GitReader) -> Plan:
    """Every entry of every source, pinned to its commit, `--base` applied."""
    declared = Plan()
    defined: Profiles = None
    for part, profiles in await asyncio.gather(
        *(_read_source(s, sources, reader) for s in sources.paths)
    ):
        declared.extend(part)
        if profiles is not None:
            defined = (defined or set()) | profiles
    for profile in sources.skaffold.profiles:
        if defined is None:
            raise SourceError(f"--profile {profile}: profiles are for Skaffold configs")
        if profile not in defined:
            raise SourceError(f"--profile {profile}: no Skaffold config read defines it")
    if sources.rules or not sources.paths:
        if sources.clone_url is None:
            raise SourceError("the gateway's rules need --clone-url (e.g. git://forge/{repo}.git)")
        if not sources.gateway_rules:
            raise SourceError("no gateway rules are configured ([[gateway.rules]])")
        declared.extend(
            await rule_entries(
                sources.gateway_rules,
                repos=sources.repos,
                clone_url=sources.clone_url,
                reader=reader,
            )
        )
    entries = with_build_args(declared.entries, sources.build_args)
    plan = await pin_commits(entries, reader)
    plan.refused[:0] = declared.refused
    if sources.base is not None:
        selected = await select_base(plan.entries, sources.base, reader)
        plan = Plan(selected.entries, plan.refused + selected.refused, selected.unselected)
    return _drop_repeats(plan)


# --- running a plan -----------------------------------------------------------------------


def _entry_record(entry: Entry, build_id: str) -> EntryRecord:
    return EntryRecord(
        build_id=build_id,
        recipe=recipe_key(entry.request),
        fingerprint=fingerprint(entry.request),
        name=entry.name,
        origin=entry.origin,
        source=describe_source(entry.request),
        images=entry.request.images,
        matches=entry.matches,
    )


async def _items(
    record: BatchRecord, entries: Sequence[Entry], run: int
) -> tuple[list[Item], list[Item], list[Item]]:
    """(items reused, items still in flight from an earlier run, items to submit)."""
    prior = await record.entries()
    states = await record.statuses([r.build_id for r in prior.values()])
    reused: list[Item] = []
    adopted: list[Item] = []
    fresh: list[tuple[Entry, str]] = []
    for entry in entries:
        key = entry_key(entry.request)
        previous = prior.get(key)
        state = states.get(previous.build_id) if previous is not None else None
        if previous is None or state is None or previous.fingerprint != fingerprint(entry.request):
            fresh.append((entry, key))
            continue
        item = Item(key, previous, recipe_key(entry.request), status=state.status)
        if state.status == "succeeded":
            item.result, item.reused = state.result, True
            reused.append(item)
        elif state.status in TERMINAL_STATUSES:
            fresh.append((entry, key))
        else:
            adopted.append(item)
    known = await durations(record.redis, (recipe_key(e.request) for e, _ in fresh))
    ordered = longest_first(fresh, lambda pair: recipe_key(pair[0].request), known)
    submit = [
        Item(
            key,
            _entry_record(entry, f"{record.batch_id}.r{run}.{n:06d}"),
            recipe_key(entry.request),
            request=entry.request,
        )
        for n, (entry, key) in enumerate(ordered)
    ]
    return reused, adopted, submit


class _Durations:
    """How long each recipe took, gathered as builds end and written once at the end."""

    def __init__(self, known: dict[str, float]) -> None:
        self.known = known
        self.updated: dict[str, float] = {}

    def add(self, item: Item) -> None:
        if item.result is not None and item.result.ok and item.result.build_s > 0:
            previous = self.updated.get(item.recipe, self.known.get(item.recipe))
            self.updated[item.recipe] = smoothed(previous, item.result.build_s)


async def _settle(record: BatchRecord, items: Sequence[Item]) -> None:
    """Statuses of the builds not seen ending, as they are now (for the report)."""
    open_items = [i for i in items if not i.ended and i.status != "not_submitted"]
    states = await record.statuses([i.build_id for i in open_items]) if open_items else {}
    for item in open_items:
        if (state := states.get(item.build_id)) is not None:
            item.status, item.result = state.status, state.result or item.result


@contextlib.asynccontextmanager
async def _unreachable_as_fleet_unavailable() -> AsyncIterator[None]:
    """redis-py's connection errors, mapped once at this edge (the client maps its own)."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError) as exc:
        raise FleetUnavailable(f"Redis unreachable ({exc})") from exc


async def run_batch(
    fleet: BuildfleetClient, plan: Plan, options: RunOptions, view: console.Progress
) -> BatchReport:
    async with _unreachable_as_fleet_unavailable():
        return await _run_batch(fleet, plan, options, view)


async def _run_batch(
    fleet: BuildfleetClient, plan: Plan, options: RunOptions, view: console.Progress
) -> BatchReport:
    record = BatchRecord(fleet.redis, options.batch_id)
    run = await record.start_run()
    reused, adopted, submit = await _items(record, plan.entries, run)
    items = [*reused, *adopted, *submit]
    timings = _Durations(await durations(fleet.redis, {i.recipe for i in submit}))
    view.start(options.batch_id, run, len(submit), len(reused), len(adopted), len(plan.refused))

    def ended(item: Item) -> None:
        timings.add(item)
        view.ended(item)

    follow = options.wait or options.max_in_flight is not None
    follower = Follower(fleet, record, ended, after=await fleet.last_event_id())
    submitter = Submitter(
        fleet,
        record,
        follower if follow else None,
        options.rate,
        options.max_in_flight,
        view.submitted,
        {"batch": options.batch_id},
        on_outage=view.note,
    )
    stopped: str | None = None
    cancelled = False
    try:
        async with follower.running() if follow else contextlib.nullcontext(follower):
            if follow:
                follower.watch(adopted)
                await follower.reconcile()
            await submitter.submit(submit)
            if options.wait:
                await follower.until_all_ended()
    except BatchCancelled:
        cancelled = True
        view.note(f"batch {options.batch_id} was cancelled: the rest is not submitted")
    except asyncio.CancelledError:
        stopped = "interrupted"
        raise
    except FleetUnavailable:
        stopped = "Redis went away"
        raise
    finally:
        try:
            await _finish(fleet, record, items, timings, read_statuses=bool(stopped or cancelled))
        except FleetUnavailable as exc:
            view.note(f"cannot read where the builds stand ({exc}); the report shows what was seen")
        report = make_report(options.batch_id, items, plan.refused, options.base)
        write_reports(report, options.report_json, options.report_junit)
        view.finish(report, submitted=sum(i.status != "not_submitted" for i in submit))
        if stopped is not None:
            view.stopped(stopped, options.batch_id, options.resume_hint, report)
    return report


def write_reports(report: BatchReport, json_path: Path | None, junit_path: Path | None) -> None:
    if json_path is not None:
        write_json(report, json_path)
    if junit_path is not None:
        write_junit(report, junit_path)


async def _finish(
    fleet: BuildfleetClient,
    record: BatchRecord,
    items: Sequence[Item],
    timings: _Durations,
    *,
    read_statuses: bool,
) -> None:
    """Durations kept; with `read_statuses`, the report gets where each build stands now
    (else a build not waited for is reported as it was submitted: queued)."""
    for item in items:
        if item.status == "pending":
            item.status = "not_submitted"
    async with _unreachable_as_fleet_unavailable():
        if read_statuses:
            await _settle(record, items)
        await remember_durations(fleet.redis, timings.updated)


async def follow_batch(
    fleet: BuildfleetClient, batch_id: str, view: console.Progress
) -> BatchReport:
    """Follow an earlier run's builds to their end."""
    async with _unreachable_as_fleet_unavailable():
        return await _follow_batch(fleet, batch_id, view)


async def _follow_batch(
    fleet: BuildfleetClient, batch_id: str, view: console.Progress
) -> BatchReport:
    record = BatchRecord(fleet.redis, batch_id)
    if not await record.exists():
        raise BatchNotFound(batch_id)
    entries = await record.entries()
    items = [Item(key, entry, entry.recipe, status="queued") for key, entry in entries.items()]
    view.start(batch_id, 0, 0, 0, len(items), 0)
    timings = _Durations(await durations(fleet.redis, {i.recipe for i in items}))

    def ended(item: Item) -> None:
        timings.add(item)
        view.ended(item)

    follower = Follower(fleet, record, ended, after=await fleet.last_event_id())
    async with follower.running():
        follower.watch(items)
        await follower.drop_missing()
        await follower.reconcile()
        await follower.until_all_ended()
    await remember_durations(fleet.redis, timings.updated)
    report = make_report(batch_id, items, ())
    view.finish(report, submitted=0)
    return report


async def cancel_batch(fleet: BuildfleetClient, batch_id: str) -> dict[str, int]:
    """Stop submitting (a run in progress sees the flag) and cancel every build of the
    batch: queued ones end now, running ones are stopped by their workers."""
    async with _unreachable_as_fleet_unavailable():
        return await _cancel_batch(fleet, batch_id)


async def _cancel_batch(fleet: BuildfleetClient, batch_id: str) -> dict[str, int]:
    record = BatchRecord(fleet.redis, batch_id)
    if not await record.exists():
        raise BatchNotFound(batch_id)
    await record.cancel()
    entries = await record.entries()
    reason = f"batch {batch_id} cancelled"
    outcomes = await fleet.store.cancel_many([(e.build_id, reason) for e in entries.values()])
    counts: dict[str, int] = {}
    for outcome in outcomes:
        what = _CANCELLED_HOW[outcome]
        counts[what] = counts.get(what, 0) + 1
    return counts
