"""What the dead-letter stream keeps of a build, within a byte budget. Pure.

The stream holds the full request of each dead-lettered build, for inspection and replay.
Requests are bounded where they come in (the gateway's body limit), but a worker also
dead-letters bytes it could not even decode, and the stream lives in Redis's memory: so
each entry is capped (`[queue].dead_letter_max_bytes`), and the stream's length is the
budget over the cap (`[queue].dead_letters_max_bytes`), which bounds its memory.

An entry whose request was over the cap keeps the build id, the reason and the request's
size; `buildfleet dlq replay` says it cannot be replayed.
"""

from __future__ import annotations

from typing import Final

MAX_REASON: Final = 2048
TRUNCATED: Final = b"truncated"


def entry(
    build_id: str, reason: str, at: float, request: bytes, max_bytes: int
) -> dict[str, str | bytes]:
    """The stream entry's fields; `request` dropped (its size kept) when over `max_bytes`."""
    fields: dict[str, str | bytes] = {
        "build_id": build_id,
        "reason": reason[:MAX_REASON],
        "at": str(at),
        "request": request if len(request) <= max_bytes else b"",
    }
    if len(request) > max_bytes:
        fields["request_bytes"] = str(len(request))
        fields[TRUNCATED.decode()] = "1"
    return fields


def maxlen(budget_bytes: int, max_bytes: int) -> int:
    """How many entries the stream keeps: its byte budget over the cap of one entry."""
    return max(1, budget_bytes // (max_bytes + MAX_REASON + 256))
