"""BuildKit's `StatusResponse` protobuf, as a Docker daemon sends it, decoded. Pure.

With `version=2` a Docker daemon builds with BuildKit and reports progress as
`{"id": "moby.buildkit.trace", "aux": "<base64 StatusResponse>"}` lines. Only the fields
buildfleet shows are read (moby/buildkit api/services/control/control.proto):

    StatusResponse: 1 vertexes (Vertex), 3 logs (VertexLog); 2 statuses, 4 warnings skipped
    Vertex:         1 digest, 3 name, 4 cached, 5 started, 6 completed, 7 error
    VertexLog:      1 vertex, 2 timestamp, 3 stream, 4 msg
    Timestamp:      1 seconds, 2 nanos

Unknown fields are skipped by wire type, so a newer daemon's extra fields do no harm; a
message that is not valid protobuf raises `TraceError`.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Final

from worker.progress import SolveStatus, Vertex, VertexLog

_VARINT: Final = 0
_FIXED64: Final = 1
_LENGTH: Final = 2
_FIXED32: Final = 5

Field = tuple[int, int | bytes]


class TraceError(ValueError):
    """An aux message that is not a StatusResponse."""


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise TraceError("truncated or overlong varint")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, at


def _fields(data: bytes) -> Iterator[Field]:
    """(field number, value) pairs: an int for varints, bytes for length-delimited fields."""
    at = 0
    while at < len(data):
        key, at = _varint(data, at)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, at = _varint(data, at)
            yield number, value
        elif wire == _LENGTH:
            size, at = _varint(data, at)
            if at + size > len(data):
                raise TraceError("length-delimited field runs past the message")
            yield number, data[at : at + size]
            at += size
        elif wire == _FIXED64:
            at += 8
        elif wire == _FIXED32:
            at += 4
        else:
            raise TraceError(f"unsupported wire type {wire}")
    if at != len(data):
        raise TraceError("fixed-width field runs past the message")


def _text(value: int | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else ""


def _timestamp(value: int | bytes) -> datetime | None:
    if not isinstance(value, bytes):
        return None
    seconds = nanos = 0
    for number, part in _fields(value):
        if number == 1 and isinstance(part, int):
            seconds = part
        elif number == 2 and isinstance(part, int):
            nanos = part
    return datetime.fromtimestamp(seconds + nanos / 1e9, tz=UTC)


def _vertex(data: bytes) -> Vertex:
    fields: dict[int, int | bytes] = dict(_fields(data))
    return Vertex(
        digest=_text(fields.get(1, b"")),
        name=_text(fields.get(3, b"")),
        cached=bool(fields.get(4, 0)),
        started=_timestamp(fields.get(5, 0)),
        completed=_timestamp(fields.get(6, 0)),
        error=_text(fields.get(7, b"")),
    )


def _log(data: bytes) -> VertexLog:
    fields: dict[int, int | bytes] = dict(_fields(data))
    stream = fields.get(3, 1)
    message = fields.get(4, b"")
    return VertexLog(
        data=message if isinstance(message, bytes) else b"",
        vertex=_text(fields.get(1, b"")),
        stream=stream if isinstance(stream, int) else 1,
    )


def decode_status(message: bytes) -> SolveStatus:
    """One serialized StatusResponse."""
    status = SolveStatus()
    for number, value in _fields(message):
        if not isinstance(value, bytes):
            continue
        if number == 1:
            status.vertexes.append(_vertex(value))
        elif number == 3:
            status.logs.append(_log(value))
    return status


def decode_aux(aux: str) -> SolveStatus:
    """The `aux` string of a `moby.buildkit.trace` line."""
    try:
        message = base64.b64decode(aux, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise TraceError(f"aux is not base64: {exc}") from exc
    return decode_status(message)
