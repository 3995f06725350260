"""What a batch did, one record per image: as JSON, as JUnit XML, and as a console summary.

Statuses: the build's own (`succeeded`, `failed`, `cancelled`, `dead_lettered`, or
`queued`/`running` when not waited for), `skipped` (a builder this fleet has no backend
for), `not_submitted` (the run was interrupted or cancelled before it), and `failed` for an
entry that could not be built at all (its repository or ref does not exist): its `error`
says why. A build that succeeded for the same commit in an earlier run of the batch is
reported with that run's result and `reused: true`.

JUnit: one testsuite per batch, one testcase per image (classname: its source); a failed
or dead-lettered build is a <failure> with the failed step and the log tail, a cancelled or
unsubmitted one an <error>, a skipped or unfinished one <skipped>.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import msgspec
from rich.table import Table

from buildfleet.rebuild.plan import Refused
from buildfleet.rebuild.runner import Item

FAILED: Final = frozenset({"failed", "dead_lettered", "cancelled", "not_submitted"})
"""Statuses that make the batch fail (exit status 1)."""
_FAILURE: Final = frozenset({"failed", "dead_lettered"})
_ERROR: Final = frozenset({"cancelled", "not_submitted"})
_ALL_ROWS_UP_TO: Final = 20
_CONTROL: Final = {code: None for code in range(32) if code not in (9, 10, 13)}


class BuildRecord(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    name: str
    status: str
    origin: str
    source: str = ""
    images: tuple[str, ...] = ()
    build_id: str | None = None
    digest: str | None = None
    duration_s: float | None = None
    queue_wait_s: float | None = None
    attempts: int | None = None
    daemon: str | None = None
    error_class: str | None = None
    error: str | None = None
    failed_step: str | None = None
    log_tail: tuple[str, ...] = ()
    reused: bool = False
    matches: tuple[str, ...] = ()


class BatchReport(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    batch: str
    counts: dict[str, int]
    builds: list[BuildRecord]
    base: str | None = None
    written_at: float = msgspec.field(default_factory=time.time)

    @property
    def failed(self) -> bool:
        return any(record.status in FAILED for record in self.builds)


def _from_item(item: Item) -> BuildRecord:
    entry, result = item.record, item.result
    record = BuildRecord(
        name=entry.name,
        status=item.status,
        origin=entry.origin,
        source=entry.source,
        images=entry.images,
        build_id=item.build_id if item.status != "not_submitted" else None,
        reused=item.reused,
        matches=entry.matches,
    )
    if result is None:
        return record
    return msgspec.structs.replace(
        record,
        digest=result.digest,
        duration_s=round(result.build_s, 3),
        queue_wait_s=round(result.queue_wait_s, 3),
        attempts=result.attempts,
        daemon=result.daemon,
        error_class=result.error_class,
        error=result.error,
        failed_step=result.failed_step,
        log_tail=() if result.ok else result.log_tail,
    )


def _from_refused(refused: Refused) -> BuildRecord:
    return BuildRecord(
        name=refused.name,
        status=refused.status,
        origin=refused.origin,
        source=refused.source,
        error_class="source" if refused.status == "failed" else None,
        error=refused.reason,
    )


def make_report(
    batch: str, items: Sequence[Item], refused: Sequence[Refused], base: str | None = None
) -> BatchReport:
    builds = [_from_item(item) for item in items] + [_from_refused(r) for r in refused]
    counts = Counter(record.status for record in builds)
    return BatchReport(batch=batch, counts=dict(sorted(counts.items())), builds=builds, base=base)


def write_json(report: BatchReport, path: Path) -> None:
    path.write_bytes(msgspec.json.format(msgspec.json.encode(report)) + b"\n")


def _text(value: str) -> str:
    """XML 1.0 cannot carry most control characters (a build log can)."""
    return value.translate(_CONTROL)


def write_junit(report: BatchReport, path: Path) -> None:
    suite = ET.Element(
        "testsuite",
        name=f"buildfleet rebuild {report.batch}",
        tests=str(len(report.builds)),
        failures=str(sum(r.status in _FAILURE for r in report.builds)),
        errors=str(sum(r.status in _ERROR for r in report.builds)),
        skipped=str(sum(r.status not in FAILED and r.status != "succeeded" for r in report.builds)),
        time=f"{sum(r.duration_s or 0.0 for r in report.builds):.3f}",
    )
    for record in report.builds:
        case = ET.SubElement(
            suite,
            "testcase",
            classname=_text(record.source or record.origin),
            name=_text(record.name),
            time=f"{record.duration_s or 0.0:.3f}",
        )
        message = _text(record.error or record.status)
        if record.status in _FAILURE:
            failure = ET.SubElement(
                case, "failure", message=message, type=record.error_class or record.status
            )
            lines = [f"failed step: {record.failed_step}"] if record.failed_step else []
            failure.text = _text("\n".join([*lines, *record.log_tail]))
        elif record.status in _ERROR:
            ET.SubElement(case, "error", message=message, type=record.status)
        elif record.status != "succeeded":
            ET.SubElement(case, "skipped", message=message)
        details = [f"build {record.build_id}"] if record.build_id else []
        details += [f"digest {record.digest}"] if record.digest else []
        details += ["succeeded in an earlier run of this batch"] if record.reused else []
        details += [f"matched {match}" for match in record.matches]
        if details:
            ET.SubElement(case, "system-out").text = _text("\n".join(details))
    root = ET.Element("testsuites", name="buildfleet rebuild")
    root.append(suite)
    ET.indent(root)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def summary(report: BatchReport, *, all_rows: bool = False) -> Table:
    """The counts as the title; a row per image that needs attention (or every image)."""
    title = ", ".join(f"{n} {status}" for status, n in report.counts.items())
    table = Table(title=f"batch {report.batch}: {title}")
    for column in ("image", "status", "time", "source", "why"):
        table.add_column(column)
    brief = not all_rows and len(report.builds) > _ALL_ROWS_UP_TO
    for record in report.builds:
        if brief and record.status not in FAILED and record.status != "skipped":
            continue  # a long batch lists only what needs attention
        why = record.error or ("earlier run" if record.reused else "")
        if record.failed_step:
            why = f"{why} (step: {record.failed_step})"
        took = f"{record.duration_s:.1f}s" if record.duration_s is not None else ""
        table.add_row(record.name, record.status, took, record.source, why)
    return table
