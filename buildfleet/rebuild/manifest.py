"""A TOML manifest as batch entries; every error names the file, the line and the field.

An optional `[defaults]` table is merged into every `[[build]]` table, each of which is a
build request in the contract's shape:

    [defaults]
    build_args = { BASE = "registry.local/base/debian:12" }

    [[build]]
    source = { type = "git", url = "https://forge/acme/api.git", ref = "main" }
    images = ["registry.local/acme/api:nightly"]

A batch names its own builds and builds at `batch` priority, so `id`, `submitted_at` and
an `interactive` priority are refused; so is any field the contract does not have (a typo
would otherwise be ignored).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from buildfleet.rebuild.plan import Entry, SourceError
from producer.contract import BuildRequest, ContractError, request_from_builtins

_NOT_IN_A_BATCH: Final = frozenset({"id", "submitted_at"})
_FIELDS: Final = frozenset(BuildRequest.__struct_fields__) - _NOT_IN_A_BATCH
_AT_PATH: Final = re.compile(r"^(?P<message>.*?)(?: - at `(?P<path>\$[^`]*)`)?$", re.DOTALL)
_HEADER: Final = re.compile(r"^\s*\[\[?\s*([A-Za-z0-9_.\"' -]+?)\s*\]\]?\s*(?:#.*)?$")
MAX_MANIFEST_BYTES: Final = 64 * 1024 * 1024


class _Lines:
    """Where tables and keys are in the manifest's text (tomllib keeps no positions)."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.tables: list[tuple[str, int]] = []  # (header name, 0-based line), in order
        self.by_name: dict[str, list[int]] = {}  # header name -> its indexes in `tables`
        for index, line in enumerate(self.lines):
            match = _HEADER.match(line)
            if match:
                name = match.group(1).replace(" ", "")
                self.by_name.setdefault(name, []).append(len(self.tables))
                self.tables.append((name, index))

    def _span(self, table: str, occurrence: int) -> tuple[int, int] | None:
        """The lines of the `occurrence`-th `[table]`/`[[table]]`, its sub-tables included."""
        starts = self.by_name.get(table, [])
        if occurrence >= len(starts):
            return None
        first = starts[occurrence]
        after = first + 1
        while after < len(self.tables) and self.tables[after][0].startswith(f"{table}."):
            after += 1
        end = self.tables[after][1] if after < len(self.tables) else len(self.lines)
        return self.tables[first][1], end

    def line_of(self, table: str, occurrence: int, key: str | None) -> int | None:
        """1-based line of `key` in that table (or of the table header)."""
        span = self._span(table, occurrence)
        if span is None:
            return None
        start, end = span
        if key is not None:
            assignment = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*[.=]")
            sub_table = re.compile(rf"^\s*\[\[?\s*{re.escape(table)}\.{re.escape(key)}\b")
            for index in range(start, end):
                if assignment.match(self.lines[index]) or sub_table.match(self.lines[index]):
                    return index + 1
        return start + 1


def _field_of(path: str | None) -> str | None:
    """`$.source.url` -> `source`; `$.images[0]` -> `images`."""
    if not path or path == "$":
        return None
    return re.split(r"[.\[]", path.removeprefix("$."), maxsplit=1)[0]


def _refused_field(key: str) -> str | None:
    if key in _NOT_IN_A_BATCH:
        return f"{key}: a batch names and stamps its own builds; remove it"
    if key not in _FIELDS:
        return f"{key}: no such field (expected one of {', '.join(sorted(_FIELDS))})"
    return None


def _entry(
    path: Path, lines: _Lines, index: int, entry: Mapping[str, Any], defaults: Mapping[str, Any]
) -> Entry:
    label = f"build #{index + 1}"

    def error(key: str | None, message: str) -> SourceError:
        line = lines.line_of("build", index, key)
        if key is not None and key not in entry and key in defaults:
            line = lines.line_of("defaults", 0, key) or line
        return SourceError(f"{path}:{line or '?'}: {label}: {message}")

    for key in entry:
        if problem := _refused_field(key):
            raise error(key, problem)
    merged = {**defaults, **entry}
    if merged.get("priority", "batch") != "batch":
        raise error("priority", "priority: a batch builds at batch priority")
    try:
        request = request_from_builtins({**merged, "priority": "batch"})
    except ContractError as exc:
        detail = str(exc).removeprefix("invalid build request: ")
        match = _AT_PATH.match(detail)
        assert match is not None
        where = match.group("path")
        message = f"{where}: {match.group('message')}" if where else match.group("message")
        raise error(_field_of(where), message) from None
    return Entry(request=request, origin=f"{path}:{lines.line_of('build', index, None)}")


def load_manifest(path: Path) -> list[Entry]:
    """Every build of the manifest, validated; the first error stops the whole batch."""
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise SourceError(f"{path}: larger than {MAX_MANIFEST_BYTES >> 20} MiB")
        text = path.read_text()
    except OSError as exc:
        raise SourceError(f"{path}: cannot read ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise SourceError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SourceError(f"{path}: not valid TOML ({exc})") from exc
    lines = _Lines(text)
    unknown = set(data) - {"defaults", "build"}
    if unknown:
        name = sorted(unknown)[0]
        line = lines.line_of(name, 0, None) or next(
            (i + 1 for i, text_line in enumerate(lines.lines) if text_line.startswith(name)), "?"
        )
        raise SourceError(f"{path}:{line}: {name}: expected only [defaults] and [[build]] tables")
    defaults = data.get("defaults", {})
    entries = data.get("build", [])
    if not isinstance(defaults, dict):
        raise SourceError(f"{path}: defaults: expected a table")
    if (
        not isinstance(entries, list)
        or not all(isinstance(e, dict) for e in entries)
        or not entries
    ):
        raise SourceError(f"{path}: build: expected one or more [[build]] tables")
    for key in defaults:
        if problem := _refused_field(key):
            line = lines.line_of("defaults", 0, key) or "?"
            raise SourceError(f"{path}:{line}: defaults: {problem}")
    return [_entry(path, lines, index, entry, defaults) for index, entry in enumerate(entries)]
