"""What every handler shares: JSON answers, bounded body reads, the caller's token."""

from __future__ import annotations

from typing import Final

import msgspec
from aiohttp import web

from producer.gateway.admission import Refused
from producer.gateway.metrics import GatewayMetrics
from producer.gateway.settings import TokenSettings

TOKEN: Final = web.RequestKey("token", TokenSettings)
"""The token an authenticated /v1 request carries (set by the authentication middleware)."""

_json: Final = msgspec.json.Encoder()


class BodyTooLarge(Exception):
    """Answered 413 (and the connection closed) by the application's middleware."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body larger than {limit} bytes")
        self.limit = limit


def reply(status: int, body: object, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=_json.encode(body), content_type="application/json", headers=headers
    )


def error(status: int, reason: str, headers: dict[str, str] | None = None) -> web.Response:
    return reply(status, {"error": reason}, headers)


def too_many(reason: str, retry_after: str) -> web.Response:
    return error(429, reason, {"Retry-After": retry_after})


def refused(metrics: GatewayMetrics, refusal: Refused, retry_after_s: int) -> web.Response:
    """429 for a submission admission refused, counted by the bound that refused it."""
    if refusal.bound == "queue":
        metrics.rejected.inc()
    else:
        metrics.limited.inc(refusal.bound)
    return too_many(refusal.reason, str(retry_after_s))


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, refused (BodyTooLarge) as soon as it is known to exceed `limit`:
    before reading when it says its length, after `limit` bytes otherwise."""
    if request.content_length is not None:
        if request.content_length > limit:
            raise BodyTooLarge(limit)
        return await request.read()  # no more than it said: aiohttp's parser holds it to that
    body = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge(limit)
    return bytes(body)


def sse(entry_id: str | None, event: str, data: bytes) -> bytes:
    head = f"id: {entry_id}\n" if entry_id is not None else ""
    return f"{head}event: {event}\n".encode() + b"data: " + data + b"\n\n"
