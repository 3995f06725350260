"""Kaniko's build stages as `Step` events, read from the executor's log lines.

A stage starts at its "Building stage 'BASE' [idx: 'N', ...]" line and ends when the next
one starts or the build ends. Pure: the caller gives the time.
"""

from __future__ import annotations

import re
from typing import Final

import msgspec

from producer.contract import Step

_STAGE_RE: Final = re.compile(r"Building stage '(?P<base>[^']*)' \[idx: '(?P<idx>\d+)'")


class KanikoStages:
    """The stages of one attempt, fed line by line."""

    def __init__(self, build_id: str, attempt: int) -> None:
        self.build_id = build_id
        self.attempt = attempt
        self._open: Step | None = None

    def on_line(self, text: str, now: float) -> list[Step]:
        """The Steps a log line closes and opens (none for most lines)."""
        match = _STAGE_RE.search(text)
        if match is None:
            return []
        closed = self.finish(now, None)
        self._open = Step(
            build_id=self.build_id,
            attempt=self.attempt,
            vertex=f"stage-{match['idx']}",
            name=f"stage {match['idx']} FROM {match['base']}",
            started=now,
        )
        return [*closed, self._open]

    def finish(self, now: float, error: str | None) -> list[Step]:
        """The open stage, completed (with `error` when the build failed)."""
        if self._open is None:
            return []
        done = msgspec.structs.replace(self._open, completed=now, error=error)
        self._open = None
        return [done]
