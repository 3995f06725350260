"""BuildKit's `--progress=rawjson` stream, turned into Step and Log events.

buildctl writes one JSON `SolveStatus` per line; a Docker daemon sends the same status as
protobuf (worker.backends.buildkit_trace decodes it into `SolveStatus`). A vertex (a build
step) is re-sent whenever it changes, so vertices are merged by digest and a Step is emitted
only when its state moved. The push is no vertex of its own: it is a status of "exporting to
image" ("pushing layers", "pushing manifest for IMAGE"), so each push status becomes a Step
too, keyed by its vertex and id. Pure: it reads lines and returns events; the backend does
the reading.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

import msgspec

from producer.contract import Log, Step


class Vertex(msgspec.Struct):
    digest: str
    name: str = ""
    started: datetime | None = None
    completed: datetime | None = None
    cached: bool = False
    error: str = ""


class VertexLog(msgspec.Struct):
    data: bytes
    vertex: str = ""
    stream: int = 1


class Status(msgspec.Struct):
    id: str
    vertex: str = ""
    started: datetime | None = None
    completed: datetime | None = None


class SolveStatus(msgspec.Struct):
    vertexes: list[Vertex] = []
    statuses: list[Status] = []
    logs: list[VertexLog] = []


PUSH_STATUS_PREFIX = "pushing "


_status_decoder = msgspec.json.Decoder(SolveStatus)


def _is_push(status: Status) -> bool:
    return status.id.startswith(PUSH_STATUS_PREFIX)


def _push_vertex(status: Status) -> Vertex:
    """A push status as a step of its own, under an id no real vertex digest can take."""
    return Vertex(
        digest=f"{status.vertex}/{status.id}",
        name=status.id,
        started=status.started,
        completed=status.completed,
    )


def _timestamp(moment: datetime | None) -> float | None:
    return None if moment is None else moment.timestamp()


@dataclass
class ProgressParser:
    """Feed it buildctl's stderr line by line; it answers with the events each line makes."""

    build_id: str
    attempt: int
    tail_lines: int = 20
    _steps: dict[str, Step] = field(default_factory=dict)
    _tails: dict[str, deque[str]] = field(default_factory=dict)
    other_output: deque[str] = field(default_factory=lambda: deque(maxlen=50))
    """Lines that are not rawjson: buildctl's own `error: ...` summary, for instance."""

    def feed(self, line: bytes) -> list[Step | Log]:
        try:
            status = _status_decoder.decode(line)
        except (msgspec.DecodeError, msgspec.ValidationError):
            text = line.decode(errors="replace").rstrip()
            if text:
                self.other_output.append(text)
            return []
        return self.feed_status(status)

    def feed_status(self, status: SolveStatus) -> list[Step | Log]:
        """The events one decoded status makes."""
        vertexes = [*status.vertexes, *map(_push_vertex, filter(_is_push, status.statuses))]
        events: list[Step | Log] = [
            step for vertex in vertexes if (step := self._merge(vertex)) is not None
        ]
        events.extend(self._log(entry) for entry in status.logs)
        return events

    def _merge(self, vertex: Vertex) -> Step | None:
        previous = self._steps.get(vertex.digest)
        step = Step(
            build_id=self.build_id,
            attempt=self.attempt,
            vertex=vertex.digest,
            name=vertex.name or (previous.name if previous else vertex.digest),
            cached=vertex.cached,
            started=_timestamp(vertex.started),
            completed=_timestamp(vertex.completed),
            error=vertex.error or None,
        )
        if previous is not None and (
            previous.name,
            previous.cached,
            previous.started,
            previous.completed,
            previous.error,
        ) == (step.name, step.cached, step.started, step.completed, step.error):
            return None
        self._steps[vertex.digest] = step
        return step

    def _log(self, entry: VertexLog) -> Log:
        text = entry.data.decode(errors="replace")
        tail = self._tails.setdefault(entry.vertex, deque(maxlen=self.tail_lines))
        tail.extend(line for line in text.splitlines() if line.strip())
        return Log(
            build_id=self.build_id,
            attempt=self.attempt,
            vertex=entry.vertex or None,
            stream=2 if entry.stream == 2 else 1,
            text=text,
        )

    @property
    def failed_step(self) -> Step | None:
        """The step BuildKit reported as failed (the last one, when several failed)."""
        failed = [step for step in self._steps.values() if step.error]
        return failed[-1] if failed else None

    @property
    def steps(self) -> list[Step]:
        return list(self._steps.values())

    def log_tail(self, vertex: str) -> tuple[str, ...]:
        return tuple(self._tails.get(vertex, ()))


TRUNCATION_MARKER: Final = (
    "[buildfleet: log truncated: the per-build log cap was reached; further output is dropped]\n"
)


class LogBudget:
    """Caps the log bytes one build attempt publishes, with one visible truncation marker."""

    def __init__(self, cap_bytes: int) -> None:
        self.remaining = cap_bytes
        self.dropped = 0

    def admit(self, log: Log) -> Log | None:
        size = len(log.text.encode())
        if self.dropped == 0 and self.remaining >= size:
            self.remaining -= size
            return log
        first_drop = self.dropped == 0
        self.dropped += size
        if not first_drop:
            return None
        return msgspec.structs.replace(log, text=TRUNCATION_MARKER)


def _state(step: Step) -> tuple[bool, bool, bool, str | None]:
    """What a watcher sees of a step: cached, started, completed, failed."""
    return step.cached, step.started is not None, step.completed is not None, step.error


class ProgressBuffer:
    """Progress of one attempt, held between two flushes (at most one per interval: the
    runner flushes on a timer, and before the attempt's end).

    A flush carries the latest Step of each vertex whose state (cached, started, completed,
    failed) changed since the last flush, in the order of their latest updates (BuildKit
    lists every vertex up front, not in the order they run; a step that started and
    completed in between goes out once, completed, with both times), and, where its first
    line arrived, each vertex's log lines of one stream as one Log (the truncation marker
    stays a Log of its own, so a watcher finds it at the start of one). A warm build of a
    few hundred milliseconds publishes its progress in one batch, with its terminal event.
    """

    def __init__(self) -> None:
        self._pending: dict[tuple[str, str | None, int], Step | Log] = {}
        self._published: dict[str, tuple[bool, bool, bool, str | None]] = {}

    def __bool__(self) -> bool:
        return bool(self._pending)

    def add(self, event: Step | Log) -> None:
        match event:
            case Step(vertex=vertex):
                self._pending.pop(("step", vertex, 0), None)  # it moves to the end
                self._pending["step", vertex, 0] = event
            case Log(text=text) if text == TRUNCATION_MARKER:
                self._pending["truncated", None, 0] = event
            case Log(vertex=vertex, stream=stream, text=text):
                key = ("log", vertex, stream)
                held = self._pending.get(key)
                if isinstance(held, Log):
                    event = msgspec.structs.replace(held, text=held.text + text)
                self._pending[key] = event

    def flush(self) -> list[Step | Log]:
        """The events to publish now, and forget them."""
        events: list[Step | Log] = []
        for event in self._pending.values():
            if isinstance(event, Step):
                state = _state(event)
                if self._published.get(event.vertex) == state:
                    continue  # only its progress moved: nothing a watcher would see
                self._published[event.vertex] = state
            events.append(event)
        self._pending.clear()
        return events
