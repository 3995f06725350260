"""arq's job envelope, in msgpack instead of pickle.

arq stores `{t, f, a, k, et}` (try, function, args, kwargs, enqueue time) per job. A message
that cannot be read is not dropped: it decodes to a call of the build function with the raw
bytes, and the worker dead-letters it with the decoding error as the reason.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Final

import msgspec

BUILD_FUNCTION: Final = "build"

_encoder: Final = msgspec.msgpack.Encoder(enc_hook=repr)
_decoder: Final = msgspec.msgpack.Decoder(dict[str, Any])


def serialize(envelope: dict[str, Any]) -> bytes:
    """arq's `job_serializer`; anything msgpack cannot carry (an exception) becomes its repr."""
    return _encoder.encode(envelope)


def deserialize(data: bytes) -> dict[str, Any]:
    """arq's `job_deserializer`; never raises, so garbage reaches the worker as a build."""
    try:
        envelope = _decoder.decode(data)
        if (
            isinstance(envelope.get("f"), str)
            and isinstance(envelope.get("a"), list)
            and isinstance(envelope.get("k"), dict)
        ):
            return envelope
    except msgspec.DecodeError:
        pass
    return {"t": None, "f": BUILD_FUNCTION, "a": [data], "k": {}, "et": int(time.time() * 1000)}


def build_envelope(
    request_json: bytes,
    enqueue_time_ms: int,
    attempt: int = 1,
    avoid: Sequence[str] = (),
    retry_since: float = 0.0,
) -> bytes:
    """The job for one attempt: the build function's arguments are (request, attempt, avoid,
    retry_since), `avoid` naming daemons that failed this build before and `retry_since`
    when its first temporary failure happened (0: none yet; the retry budget runs from it)."""
    return serialize(
        {
            "t": None,
            "f": BUILD_FUNCTION,
            "a": [request_json, attempt, list(avoid), retry_since],
            "k": {},
            "et": enqueue_time_ms,
        }
    )


def envelope_around(request_json: bytes, enqueue_time_ms: int) -> tuple[bytes, bytes]:
    """A first attempt's job as the bytes before and after its request, so that a script
    given the request anyway makes the job without the request being sent twice."""
    head, _, tail = build_envelope(request_json, enqueue_time_ms).partition(request_json)
    return head, tail
