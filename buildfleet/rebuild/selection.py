"""From declared entries to what the batch builds: commits pinned, `--build-arg` applied,
and with `--base` only the images built FROM that base.

Every git entry is pinned to the commit its ref names now, so the batch builds one known
revision per entry and a resumed batch can tell whether it already built it. An entry whose
repository or ref does not exist is refused with the reason, and the others go on.
With `--base`, each entry's Dockerfile is read at that commit (or from its directory) and
kept when a FROM of a stage the build needs pulls the base.
"""

from __future__ import annotations

import asyncio
import posixpath
from collections.abc import Mapping, Sequence
from pathlib import Path

import msgspec

from buildfleet.rebuild import dockerfile
from buildfleet.rebuild.gitread import GitReader
from buildfleet.rebuild.plan import Entry, Plan, Refused, SourceError, describe_source
from buildfleet.rebuild.reference import ImageRef
from producer.contract import GitSource, LocalSource


def _refused(entry: Entry, reason: str) -> Refused:
    return Refused(entry.name, entry.origin, reason, "failed", describe_source(entry.request))


async def _pin(entry: Entry, reader: GitReader) -> Entry | Refused:
    source = entry.request.source
    if not isinstance(source, GitSource) or source.commit is not None:
        return entry
    try:
        commit = await reader.resolve(source.url, source.ref)
    except SourceError as exc:
        return _refused(entry, str(exc))
    pinned = msgspec.structs.replace(source, commit=commit)
    return Entry(msgspec.structs.replace(entry.request, source=pinned), entry.origin, entry.matches)


def with_build_args(entries: Sequence[Entry], build_args: Mapping[str, str]) -> list[Entry]:
    """`--build-arg` values win over the entries' own."""
    if not build_args:
        return list(entries)
    return [
        Entry(
            msgspec.structs.replace(
                entry.request, build_args={**entry.request.build_args, **build_args}
            ),
            entry.origin,
            entry.matches,
        )
        for entry in entries
    ]


async def pin_commits(entries: Sequence[Entry], reader: GitReader) -> Plan:
    plan = Plan()
    for outcome in await asyncio.gather(*(_pin(entry, reader) for entry in entries)):
        if isinstance(outcome, Refused):
            plan.refused.append(outcome)
        else:
            plan.entries.append(outcome)
    return plan


async def read_dockerfile(entry: Entry, reader: GitReader) -> str:
    request = entry.request
    path = posixpath.normpath(posixpath.join(request.context, request.dockerfile))
    match request.source:
        case GitSource(url=url, ref=ref, commit=commit):
            assert commit is not None, "entries are pinned before they are read"
            return await reader.read(url, commit, path, ref=ref)
        case LocalSource(path=root):
            file = Path(root, path)
            try:
                return await asyncio.to_thread(file.read_text)
            except (OSError, UnicodeDecodeError) as exc:
                raise SourceError(f"{file}: cannot read ({exc})") from None


async def _select(entry: Entry, base: ImageRef, reader: GitReader) -> Entry | Refused | str:
    """The entry with its matching FROM lines; else why it is left out (a str)."""
    try:
        text = await read_dockerfile(entry, reader)
        uses = dockerfile.base_uses(text, entry.request.build_args, entry.request.target)
    except SourceError as exc:
        return _refused(entry, str(exc))
    except dockerfile.DockerfileError as exc:
        return _refused(entry, f"{entry.request.dockerfile}: {exc}")
    matching = dockerfile.uses_of(base, uses)
    if matching:
        return Entry(entry.request, entry.origin, tuple(use.describe() for use in matching))
    if not uses:
        return "builds FROM no image (scratch, or stages only)"
    return "builds FROM " + "; ".join(use.describe() for use in uses)


async def select_base(entries: Sequence[Entry], base: ImageRef, reader: GitReader) -> Plan:
    plan = Plan()
    outcomes = await asyncio.gather(*(_select(entry, base, reader) for entry in entries))
    for entry, outcome in zip(entries, outcomes, strict=True):
        match outcome:
            case Entry():
                plan.entries.append(outcome)
            case Refused():
                plan.refused.append(outcome)
            case str():
                plan.unselected.append((entry, outcome))
    return plan
