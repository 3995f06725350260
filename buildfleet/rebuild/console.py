"""What `rebuild` shows a person: the plan of a dry run, progress, and what to do next."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import msgspec
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as Bars
from rich.table import Table

from buildfleet.rebuild.plan import Plan, describe_source
from buildfleet.rebuild.report import BatchReport, summary
from buildfleet.rebuild.runner import Item


class _PlannedBuild(msgspec.Struct, frozen=True, omit_defaults=True):
    name: str
    origin: str
    source: str
    images: tuple[str, ...]
    matches: tuple[str, ...] = ()


class _Left(msgspec.Struct, frozen=True):
    name: str
    origin: str
    why: str
    status: str = "not_selected"


class _DryRun(msgspec.Struct, frozen=True):
    build: list[_PlannedBuild]
    left_out: list[_Left]


def print_plan(plan: Plan, *, as_json: bool, out: Console) -> None:
    """What would be built, from where, and why (the FROM lines that matched)."""
    builds = [
        _PlannedBuild(e.name, e.origin, describe_source(e.request), e.request.images, e.matches)
        for e in plan.entries
    ]
    left = [_Left(e.name, e.origin, why) for e, why in plan.unselected]
    left += [_Left(r.name, r.origin, r.reason, r.status) for r in plan.refused]
    if as_json:
        sys.stdout.write(msgspec.json.encode(_DryRun(builds, left)).decode() + "\n")
        return
    table = Table(title=f"would build {len(builds)} image(s); {len(left)} left out")
    for column in ("image", "source", "declared at", "why"):
        table.add_column(column, overflow="fold")
    for build in builds:
        table.add_row(build.name, build.source, build.origin, "\n".join(build.matches))
    for entry in left:
        table.add_row(entry.name, f"[{entry.status}]", entry.origin, entry.why)
    out.print(table)


class Progress:
    """A run on stderr: bars for builds submitted and ended, notes, the summary."""

    def __init__(self, out: Console) -> None:
        self.out = out
        self.bars = Bars(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=out,
            transient=False,
        )
        self._submitted = self.bars.add_task("submitted", total=0)
        self._ended = self.bars.add_task("ended", total=0)

    def start(  # noqa: PLR0917 - counts, each named at the one call site
        self, batch: str, run: int, submit: int, reused: int, adopted: int, refused: int
    ) -> None:
        parts = [f"{submit} to submit"]
        parts += [f"{reused} already built for the same commit"] if reused else []
        parts += [f"{adopted} still running from an earlier run"] if adopted else []
        parts += [f"{refused} left out"] if refused else []
        self.out.print(
            f"batch {batch}" + (f" (run {run})" if run else "") + ": " + ", ".join(parts)
        )
        self.bars.update(self._submitted, total=submit)
        self.bars.update(self._ended, total=submit + adopted)
        self.bars.start()

    def submitted(self, items: Sequence[Item]) -> None:
        self.bars.advance(self._submitted, len(items))

    def ended(self, item: Item) -> None:
        self.bars.advance(self._ended)

    def note(self, text: str) -> None:
        self.out.print(text)

    def finish(self, report: BatchReport, *, submitted: int) -> None:
        self.bars.stop()
        self.out.print(summary(report))
        if submitted and any(b.status in ("queued", "running") for b in report.builds):
            self.out.print(
                f"follow it: buildfleet rebuild --follow {report.batch}",
                soft_wrap=True,
                markup=False,
                highlight=False,
            )

    def stopped(self, why: str, batch: str, resume: str, report: BatchReport) -> None:
        running = sum(b.status in ("queued", "running", "retrying") for b in report.builds)
        left = sum(b.status == "not_submitted" for b in report.builds)
        self.out.print(
            f"{why}: {running} build(s) of batch {batch} keep running, "
            f"{left} not submitted yet.\n"
            f"  follow them:  buildfleet rebuild --follow {batch}\n"
            f"  resume:       {resume}\n"
            f"                (skips what succeeded, submits the rest)\n"
            f"  cancel:       buildfleet rebuild --cancel {batch}",
            # Commands to copy: never broken across lines, never read as markup.
            soft_wrap=True,
            markup=False,
            highlight=False,
        )
