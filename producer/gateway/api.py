"""The REST API (/v1, behind the authentication middleware) and the operations routes.

A token sees, lists, cancels and follows only its tenant's builds: another tenant's build
answers 404, as an unknown one does. A submission is decoded (400 naming the field),
checked against the token's policy (403 naming the field), admitted (429 with
Retry-After), then enqueued.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from typing import Any, Final

import msgspec
from aiohttp import web

from producer.contract import BUILD_ID_PATTERN, ContractError, decode_request
from producer.errors import BuildNotFound, FleetUnavailable
from producer.gateway import rules
from producer.gateway.admission import Caps, Refused
from producer.gateway.http import TOKEN, error, read_body, refused, reply, sse, too_many
from producer.gateway.metrics import CONTENT_TYPE
from producer.gateway.openapi import LIST_DEFAULT, LIST_MAX, STREAM_ID_PATTERN
from producer.gateway.state import Gateway
from producer.gateway.streams import Overflow, Subscription
from producer.policy import PolicyError, check_request
from producer.store import CancelOutcome
from producer.views import DaemonView, FleetView, WorkerView, summarize, trace_id_of

log = logging.getLogger("buildfleet.gateway")

_BUILD_ID: Final = re.compile(BUILD_ID_PATTERN)
_STREAM_ID: Final = re.compile(STREAM_ID_PATTERN)
_json: Final = msgspec.json.Encoder()


async def submit(gateway: Gateway, request: web.Request) -> web.Response:
    token, settings = request[TOKEN], gateway.settings
    body = await read_body(request, settings.api_body_limit_bytes)
    try:
        build = decode_request(body)
    except ContractError as exc:
        return error(400, str(exc))
    try:
        check_request(build, gateway.policies[token.name])
    except PolicyError as exc:
        gateway.metrics.refused.inc(exc.field)
        return error(403, str(exc))
    trace = build.trace
    if not trace.traceparent:
        headers = request.headers
        trace = (
            rules.trace_context(headers.get("traceparent", ""), headers.get("tracestate", ""))
            or trace
        )
    build = msgspec.structs.replace(build, tenant=token.tenant_name, submitted_at=0.0, trace=trace)
    depth = (
        settings.max_queue_depth
        if build.priority == "batch"
        else settings.max_queue_depth_interactive
    )
    caps = Caps(
        depth, build.tenant, settings.tenant_cap(build.tenant), token.name, token.max_queued
    )
    admission = await gateway.admissions.admit([build.id], caps)
    if isinstance(admission, Refused):
        return refused(gateway.metrics, admission, settings.retry_after_s)
    started = time.perf_counter()
    enqueued = await gateway.ledger.enqueue([build], [None])
    [created] = enqueued.created
    if not created:
        existing = await gateway.client.get(build.id)
        if existing.request is None or existing.request.tenant != build.tenant:
            return error(409, f"build id {build.id!r} is taken; leave `id` out for a fresh one")
    answer: dict[str, Any] = {"id": build.id, "created": created}
    if created:
        gateway.metrics.superseded.inc(amount=len(enqueued.superseded))
        gateway.metrics.builds.inc("api")
        if enqueued.superseded:
            answer["superseded"] = enqueued.superseded[0].old_id
    gateway.metrics.enqueue.observe(time.perf_counter() - started)
    location = {"Location": f"/v1/builds/{build.id}"}
    return reply(202 if created else 200, answer, location)


async def get(gateway: Gateway, request: web.Request) -> web.Response:
    """The build's state, with its trace's id and link (as `buildfleet get --json`)."""
    state = await gateway.visible_state(_build_id(request), request[TOKEN])
    trace_id = trace_id_of(state.request)
    answer = msgspec.to_builtins(state)
    answer.update(
        trace_id=trace_id,
        trace_url=gateway.telemetry.trace_url(trace_id) if trace_id else None,
    )
    return reply(200, answer)


async def builds(gateway: Gateway, request: web.Request) -> web.Response:
    """The token's tenant's newest builds (`?limit=`, 1 to LIST_MAX), newest first."""
    text = request.query.get("limit", str(LIST_DEFAULT))
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= LIST_MAX):
        return error(400, f"limit must be a whole number from 1 to {LIST_MAX}: {text[:40]!r}")
    listed = await gateway.client.recent(request[TOKEN].tenant_name, int(text))
    placements: dict[str, str] = {}
    if any(item.state.status == "running" for item in listed):
        status = await gateway.client.status()
        placements = await gateway.client.placements([d.address for d in status.daemons])
    now = time.time()
    rows = [
        summarize(
            item.state,
            started_at=item.started_at,
            daemon=placements.get(item.state.build_id),
            now=now,
            telemetry=gateway.telemetry,
        )
        for item in listed
    ]
    return reply(200, {"builds": rows})


async def fleet(gateway: Gateway, _request: web.Request) -> web.Response:
    """The fleet's queue depth, workers and daemons' load (no build ids: they may be
    another tenant's)."""
    status = await gateway.client.status()
    view = FleetView(
        waiting=status.waiting,
        running=status.running,
        workers=tuple(
            WorkerView(w.name, w.heartbeat_age_s, len(w.builds), w.concurrency, w.backend)
            for w in status.workers
        ),
        daemons=tuple(
            DaemonView(d.address, d.healthy, d.in_flight, d.capacity) for d in status.daemons
        ),
    )
    return reply(200, view)


async def cancel(gateway: Gateway, request: web.Request) -> web.Response:
    build_id = _build_id(request)
    await gateway.visible_state(build_id, request[TOKEN])
    outcome = await gateway.client.cancel(build_id, reason="cancelled through the API")
    if outcome is CancelOutcome.ENDED:
        state = await gateway.client.get(build_id)
        return reply(
            409,
            {"error": f"build has already ended ({state.status})", "outcome": outcome.value},
        )
    status = 200 if outcome is CancelOutcome.CANCELLED else 202
    return reply(status, {"id": build_id, "outcome": outcome.value})


async def events(gateway: Gateway, request: web.Request) -> web.StreamResponse:
    build_id, token = _build_id(request), request[TOKEN]
    # Both are checked, whichever wins: a malformed one is an error, not ignored. An empty
    # Last-Event-ID is what EventSource means by "none yet" (the spec's words).
    header = request.headers.get("Last-Event-ID", "")
    query = request.query.get("after", "0-0")
    for name, value in (("Last-Event-ID", header or "0-0"), ("after", query)):
        if not _STREAM_ID.fullmatch(value):
            return error(400, f"{name} must be a stream id like 1700000000000-0: {value!r}")
    await gateway.visible_state(build_id, token)  # 404 or 503 before the stream starts
    full = gateway.streams.acquire(token.name)
    if full is not None:
        gateway.metrics.limited.inc("streams")
        return too_many(full, str(gateway.settings.retry_after_s))
    gateway.metrics.streams.value = gateway.streams.in_use
    try:
        subscription = await gateway.hub.subscribe(build_id, header or query)
        try:
            response = web.StreamResponse(
                headers={
                    "Content-Type": "text/event-stream",
                    "Cache-Control": "no-cache",
                    "X-Accel-Buffering": "no",
                }
            )
            await response.prepare(request)
            with contextlib.suppress(ConnectionError):
                await _stream(gateway, response, subscription)
                await response.write_eof()
            return response
        finally:
            subscription.close()
    finally:
        gateway.streams.release(token.name)
        gateway.metrics.streams.value = gateway.streams.in_use


async def _stream(
    gateway: Gateway, response: web.StreamResponse, subscription: Subscription
) -> None:
    stopping = asyncio.ensure_future(gateway.stopping.wait())
    try:
        while True:
            pending = asyncio.ensure_future(subscription.next())
            while True:
                done, _ = await asyncio.wait(
                    {pending, stopping},
                    timeout=gateway.settings.sse_heartbeat_s,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if done:
                    break
                await response.write(b": keep-alive\n\n")
            if pending not in done:
                pending.cancel()
                return  # shutting down; the client resumes with Last-Event-ID
            try:
                entry = pending.result()
            except (FleetUnavailable, Overflow) as exc:
                # The headers are sent: say so on the stream and end it (never a 5xx).
                log.warning("event stream ended early: %s", type(exc).__name__)
                message = (
                    "the build queue (Redis) is unreachable; reconnect later"
                    if isinstance(exc, FleetUnavailable)
                    else "this stream fell too far behind; reconnect with Last-Event-ID"
                )
                await response.write(sse(None, "error", _json.encode({"error": message})))
                return
            if entry is None:
                return
            if not entry.kind:
                message = "an event of this build cannot be read"
                await response.write(sse(None, "error", _json.encode({"error": message})))
                return
            await response.write(sse(entry.id, entry.kind, entry.data))
    finally:
        stopping.cancel()


async def healthz(_gateway: Gateway, _request: web.Request) -> web.Response:
    return reply(200, {"status": "ok"})


async def readyz(gateway: Gateway, _request: web.Request) -> web.Response:
    try:
        async with asyncio.timeout(2.0):
            await gateway.client.ping()
    except (FleetUnavailable, TimeoutError) as exc:
        return error(503, f"Redis unreachable: {type(exc).__name__}")
    return reply(200, {"status": "ready"})


async def metrics(gateway: Gateway, _request: web.Request) -> web.Response:
    return web.Response(
        body=gateway.metrics.render().encode(), headers={"Content-Type": CONTENT_TYPE}
    )


def _build_id(request: web.Request) -> str:
    build_id = request.match_info["build_id"]
    if not _BUILD_ID.fullmatch(build_id):
        raise BuildNotFound(build_id)
    return build_id
