"""The web view (`GET /ui`): one static page, its script and style inline, no build step.

The page holds no data and needs no token to load; it asks for an API token, keeps it in
the tab's sessionStorage and sends it as `Authorization: Bearer` to the JSON API
(GET /v1/builds, /v1/fleet, /v1/builds/{id}) and to the event stream, which it reads with
fetch() rather than EventSource (which cannot send headers): a token never appears in a URL,
a log or a Referer.

Its Content-Security-Policy allows the page's own inline script and style by their hashes
and nothing else: no other script, no inline handlers, no connections but to this origin,
no framing, and Trusted Types so that no string can become HTML.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources
from typing import Final

from aiohttp import web

_PAGE: Final = resources.files("producer.gateway").joinpath("ui.html").read_bytes()
_INLINE: Final = re.compile(rb"<(script|style)>(.*?)</\1>", re.DOTALL)


def _hashes(page: bytes, tag: bytes) -> str:
    return " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(body).digest()).decode()}'"
        for found_tag, body in _INLINE.findall(page)
        if found_tag == tag
    )


CONTENT_SECURITY_POLICY: Final = "; ".join(
    (
        "default-src 'none'",
        f"script-src {_hashes(_PAGE, b'script')}",
        f"style-src {_hashes(_PAGE, b'style')}",
        "connect-src 'self'",
        "img-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
        "require-trusted-types-for 'script'",
        "trusted-types 'none'",
    )
)
_HEADERS: Final = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-store",
}


async def page(_request: web.Request) -> web.Response:
    return web.Response(body=_PAGE, content_type="text/html", charset="utf-8", headers=_HEADERS)
