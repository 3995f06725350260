"""Builders that number their steps in plain text, turned into Step and Log events. Pure.

Buildah prints `STEP 3/4: RUN make`, Docker's classic builder `Step 3/4 : RUN make`; what
follows a step line, up to the next one, is that step's output. Each step becomes a Step
event when it starts and another when it ends (the next step starting, or `finish`), with
the error when the build failed in it; every other line is a Log event of the current step.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from typing import Final

import msgspec

from producer.contract import Log, Step

BUILDAH_STEP: Final = re.compile(r"^(?:\[(\d+/\d+)\] )?STEP (\d+)/(\d+): (.*)$")
"""With several stages, buildah prefixes the stage: `[2/3] STEP 1/4: FROM ...`."""
CLASSIC_STEP: Final = re.compile(r"^()Step (\d+)/(\d+) : (.*)$")
BUILDER_CHATTER: Final = re.compile(
    r"^(\s*--->? |Removing intermediate container |Successfully (built|tagged) |COMMIT "
    r"|Getting image source signatures|Copying (blob|config) |Writing manifest|Storing signatures"
    r"|Trying to pull |subprocess exited with status )"
)
"""The builders' own lines between a step's output lines: shown, but not a failure's tail."""
_CACHED: Final = re.compile(r"^(-->|\s*--->) Using cache\b")


@dataclass
class TextSteps:
    """What every plain-text step parser keeps: the running step, its output's last lines,
    and the step that failed; subclasses say in `feed` which lines start a step."""

    build_id: str
    attempt: int
    tail_lines: int = 20
    current: Step | None = None
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    """The last lines of the current step's output: a failed step's log tail."""
    steps: int = 0
    failed: Step | None = None
    """The step that was running when the build failed."""

    def __post_init__(self) -> None:
        self.tail = deque(maxlen=self.tail_lines)

    def output(self, text: str, tail: str | None) -> list[Step | Log]:
        """A line of the current step's output, and what of it belongs in a failure's tail
        (None for the builder's own chatter)."""
        if tail is not None:
            self.tail.append(tail)
        vertex = self.current.vertex if self.current else None
        return [Log(build_id=self.build_id, attempt=self.attempt, vertex=vertex, text=text)]

    def start(self, name: str, now: float) -> list[Step | Log]:
        """A new step begins: the current one ends."""
        events: list[Step | Log] = list(self.finish(now))
        self.steps += 1
        self.current = Step(
            build_id=self.build_id,
            attempt=self.attempt,
            vertex=f"step-{self.steps}",
            name=name,
            started=now,
        )
        self.tail.clear()
        events.append(self.current)
        return events

    def finish(self, now: float, error: str | None = None) -> list[Step]:
        """End the current step (failed with `error`, if given)."""
        if self.current is None:
            return []
        ended = msgspec.structs.replace(self.current, completed=now, error=error)
        self.current = None
        if error is not None:
            self.failed = ended
        return [ended]


@dataclass
class NumberedSteps(TextSteps):
    """Feed it the builder's output line by line (newline included); it answers with events."""

    pattern: re.Pattern[str] = BUILDAH_STEP

    def feed(self, line: str, now: float) -> list[Step | Log]:
        match = self.pattern.match(line.rstrip("\r\n"))
        if match is None:
            if _CACHED.match(line) and self.current is not None:
                self.current = msgspec.structs.replace(self.current, cached=True)
            kept = line.strip() and not BUILDER_CHATTER.match(line)
            return self.output(line, line.rstrip() if kept else None)
        stage, number, total, instruction = match.groups()
        return self.start(
            f"{f'stage {stage} ' if stage else ''}[{number}/{total}] {instruction}", now
        )
