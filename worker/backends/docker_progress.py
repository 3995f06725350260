"""A Docker daemon's build and push streams, read into events, an image id and an error. Pure.

A build stream mixes, one JSON message a line:
- `{"id": "moby.buildkit.trace", "aux": "<base64>"}`: BuildKit's progress (`version=2`),
  decoded by buildkit_trace and merged by vertex as buildctl's rawjson is;
- `{"stream": "..."}`: the classic builder's text, `Step n/m : ...` lines and their output
  (not line-aligned: buffered here until a newline);
- `{"aux": {"ID": "sha256:..."}}` (with `"id": "moby.image.id"` under BuildKit): the image;
- `{"error": "...", "errorDetail": {"message": "...", "code": N}}`: the build failed, under
  HTTP 200. The failed step is the vertex BuildKit marked with an error, or the classic
  builder's step in progress.
A push stream carries `{"aux": {"Tag": ..., "Digest": ..., "Size": ...}}` for each tag.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Final

import msgspec

from producer.contract import Log, Step
from worker.backends.buildkit_trace import TraceError, decode_aux
from worker.backends.steplines import CLASSIC_STEP, NumberedSteps
from worker.errors import BuildError, TemporaryBuildError
from worker.progress import ProgressParser
from worker.retry import classify

TRACE_ID: Final = "moby.buildkit.trace"
_ANSI: Final = re.compile(r"\x1b\[[0-9;]*m")
_QUIET_PUSH_STATUSES: Final = frozenset({"Preparing", "Waiting", "Pushing"})


class ErrorDetail(msgspec.Struct):
    message: str = ""
    code: int | None = None


class StreamMessage(msgspec.Struct):
    """One line of a build or push stream."""

    stream: str | None = None
    status: str | None = None
    id: str | None = None
    aux: msgspec.Raw = msgspec.Raw()
    """Empty when the message has none."""
    error: str | None = None
    errorDetail: ErrorDetail | None = None


class _ImageId(msgspec.Struct):
    ID: str = ""


class _Pushed(msgspec.Struct):
    Tag: str = ""
    Digest: str = ""


_image_id_decoder: Final = msgspec.json.Decoder(_ImageId)
_pushed_decoder: Final = msgspec.json.Decoder(_Pushed)
_trace_decoder: Final = msgspec.json.Decoder(str)


def _error_text(message: StreamMessage) -> str:
    detail = message.errorDetail
    return (detail.message if detail and detail.message else message.error) or "unknown error"


@dataclass
class BuildStream:
    """Feed it a build stream's messages; it answers with events and keeps the outcome."""

    build_id: str
    attempt: int
    tail_lines: int = 20
    image_id: str | None = None
    error: str | None = None
    trace: ProgressParser = field(init=False)
    classic: NumberedSteps = field(init=False)
    _partial: str = ""

    def __post_init__(self) -> None:
        self.trace = ProgressParser(self.build_id, self.attempt, tail_lines=self.tail_lines)
        self.classic = NumberedSteps(
            self.build_id, self.attempt, tail_lines=self.tail_lines, pattern=CLASSIC_STEP
        )

    def feed(self, message: StreamMessage, now: float | None = None) -> list[Step | Log]:
        now = time.time() if now is None else now
        if message.error is not None or message.errorDetail is not None:
            self.error = _error_text(message)
            return [*self._flush(now), *self.classic.finish(now, self.error)]
        if message.aux:
            return self._aux(message, now)
        if message.stream is not None:
            return self._text(_ANSI.sub("", message.stream), now)
        if message.status:  # the classic builder pulling a base image
            return [self._log(f"{message.status}\n")]
        return []

    def _aux(self, message: StreamMessage, now: float) -> list[Step | Log]:
        raw = bytes(message.aux)
        if message.id == TRACE_ID:
            try:
                return self.trace.feed_status(decode_aux(_trace_decoder.decode(raw)))
            except (TraceError, msgspec.DecodeError, msgspec.ValidationError):
                return []
        try:
            image = _image_id_decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return []
        if image.ID:
            self.image_id = image.ID
        return []

    def _text(self, text: str, now: float) -> list[Step | Log]:
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        events: list[Step | Log] = []
        for line in lines:
            events.extend(self.classic.feed(line + "\n", now))
        return events

    def _flush(self, now: float) -> list[Step | Log]:
        if not self._partial:
            return []
        rest, self._partial = self._partial, ""
        return list(self.classic.feed(rest + "\n", now))

    def finish(self, now: float | None = None) -> list[Step | Log]:
        """The stream ended: close the classic builder's last step."""
        now = time.time() if now is None else now
        return [*self._flush(now), *self.classic.finish(now, self.error)]

    def _log(self, text: str) -> Log:
        return Log(build_id=self.build_id, attempt=self.attempt, text=text)

    def failure(self) -> BuildError:
        """The classified error of a failed build, with its failed step and log tail."""
        if self.error is None:
            return TemporaryBuildError(
                "the Docker daemon ended the build stream without an image or an error",
                error_class="daemon_protocol",
                daemon_at_fault=True,
            )
        failed = self.trace.failed_step
        if failed is not None:
            return classify(
                self.error, step=failed.name, log_tail=self.trace.log_tail(failed.vertex)
            )
        step = self.classic.failed
        return classify(
            self.error, step=step.name if step else None, log_tail=tuple(self.classic.tail)
        )


@dataclass
class PushStream:
    """Feed it a push stream's messages: the digest pushed, progress worth showing, errors."""

    build_id: str
    attempt: int
    image: str
    digest: str | None = None
    error: str | None = None

    def feed(self, message: StreamMessage) -> list[Log]:
        if message.error is not None or message.errorDetail is not None:
            self.error = _error_text(message)
            return []
        if message.aux:
            try:
                pushed = _pushed_decoder.decode(bytes(message.aux))
            except (msgspec.DecodeError, msgspec.ValidationError):
                return []
            self.digest = pushed.Digest or self.digest
            return []
        if not message.status or message.status in _QUIET_PUSH_STATUSES:
            return []
        layer = f"{message.id}: " if message.id else ""
        text = f"push {self.image}: {layer}{message.status}\n"
        return [Log(build_id=self.build_id, attempt=self.attempt, text=text)]

    def failure(self) -> BuildError:
        if self.error is None:
            return TemporaryBuildError(
                f"pushing {self.image}: the daemon ended the push without a digest",
                error_class="push_failed",
            )
        return classify(f"pushing {self.image}: {self.error}")
