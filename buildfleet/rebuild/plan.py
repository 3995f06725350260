"""What a batch is made of: entries to build, entries refused, and the keys that name them.
Pure.

An entry is one build request as its source declared it (no id yet: the batch names its
builds). Three keys are derived from a request, each for one question:
- `entry_key`: is this the same entry as in an earlier run of the batch? (what it builds:
  repository and ref, context, Dockerfile, target, images, platforms; not the commit)
- `fingerprint`: would this build exactly what that earlier run built? (everything that
  shapes the image, the commit included)
- `recipe_key`: which earlier builds predict how long this one takes? (repository,
  context, Dockerfile, target)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Final, Literal

import msgspec

from producer.contract import BuildRequest, GitSource, LocalSource

_KEY_LENGTH: Final = 24
_encoder: Final = msgspec.json.Encoder(order="sorted")


class SourceError(ValueError):
    """A manifest, config or repository cannot be used; the message says where and why."""


class BatchNotFound(LookupError):
    def __init__(self, batch_id: str) -> None:
        super().__init__(f"no batch named {batch_id!r} (unknown, or expired)")


@dataclass(frozen=True, slots=True)
class Entry:
    """One image of the batch, and where it was declared (`file:line`)."""

    request: BuildRequest
    origin: str
    matches: tuple[str, ...] = ()
    """With `--base`: the FROM lines that pull the base (`line N: FROM ... -> image`)."""

    @property
    def name(self) -> str:
        return self.request.images[0] if self.request.images else self.origin


@dataclass(frozen=True, slots=True)
class Refused:
    """An entry the batch does not build: `skipped` by design (a builder this fleet does not
    have), or `failed` because it cannot be built (its repository or ref does not exist)."""

    name: str
    origin: str
    reason: str
    status: Literal["skipped", "failed"] = "failed"
    source: str = ""


@dataclass
class Plan:
    entries: list[Entry] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)
    unselected: list[tuple[Entry, str]] = field(default_factory=list)
    """With `--base`: entries left out, and why (for `--dry-run`)."""

    def extend(self, other: Plan) -> None:
        self.entries.extend(other.entries)
        self.refused.extend(other.refused)
        self.unselected.extend(other.unselected)


def describe_source(request: BuildRequest) -> str:
    """`url@commit` (or `url#ref`), or the local path, with the context when not `.`."""
    match request.source:
        case GitSource(url=url, ref=ref, commit=commit):
            where = f"{url}@{commit[:12]}" if commit else f"{url}#{ref}"
        case LocalSource(path=path):
            where = path
    return where if request.context in ("", ".") else f"{where} ({request.context})"


def _digest(value: object) -> str:
    return hashlib.sha256(_encoder.encode(value)).hexdigest()[:_KEY_LENGTH]


def _origin(request: BuildRequest) -> list[str]:
    match request.source:
        case GitSource(url=url, ref=ref):
            return ["git", url, ref]
        case LocalSource(path=path):
            return ["local", path]


def entry_key(request: BuildRequest) -> str:
    return _digest(
        [
            _origin(request),
            request.context,
            request.dockerfile,
            request.target,
            sorted(request.images),
            list(request.platforms),
        ]
    )


def fingerprint(request: BuildRequest) -> str:
    commit = request.source.commit if isinstance(request.source, GitSource) else None
    return _digest(
        [
            entry_key(request),
            commit,
            request.build_args,
            request.cache,
            request.push,
            request.timeout_s,
        ]
    )


def recipe_key(request: BuildRequest) -> str:
    return _digest([_origin(request)[:2], request.context, request.dockerfile, request.target])
