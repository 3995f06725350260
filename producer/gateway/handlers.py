"""The gateway's HTTP handlers: webhooks, the REST API, operations.

Each handler reads a request, asks the client or the ledger, and renders the answer: JSON
everywhere (`{"error": reason}` for failures) but /metrics and the event stream. Errors a
handler does not answer itself (Redis unreachable, an unknown build) are mapped to HTTP by
the application's middleware (producer.gateway.app).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Final

import msgspec
from aiohttp import web

from producer.batching import Coalescer, regroup
from producer.client import BuildfleetClient
from producer.contract import (
    BUILD_ID_PATTERN,
    BuildEvent,
    BuildRequest,
    ContractError,
    TraceContext,
    decode_request,
    encode,
)
from producer.errors import BuildNotFound, FleetUnavailable
from producer.gateway import rules
from producer.gateway.ledger import Claimed, Duplicate, Ledger, Replaced, Resubmit, Superseded
from producer.gateway.metrics import CONTENT_TYPE, GatewayMetrics
from producer.gateway.openapi import STREAM_ID_PATTERN
from producer.gateway.settings import Forge, GatewaySettings
from producer.gateway.webhooks import PARSERS, Delivery, Ignored, Ping, Push, WebhookError
from producer.store import CancelOutcome, Submission

log = logging.getLogger("buildfleet.gateway")

_BUILD_ID: Final = re.compile(BUILD_ID_PATTERN)
_STREAM_ID: Final = re.compile(STREAM_ID_PATTERN)
_json: Final = msgspec.json.Encoder()


def reply(status: int, body: object, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=_json.encode(body), content_type="application/json", headers=headers
    )


def error(status: int, reason: str, headers: dict[str, str] | None = None) -> web.Response:
    return reply(status, {"error": reason}, headers)


class Gateway:
    """The application's state (settings, client, ledger, metrics) and its handlers."""

    def __init__(self, settings: GatewaySettings, client: BuildfleetClient) -> None:
        self.settings = settings
        self.client = client
        self.redis = client.redis
        self.queue_name = client.store.queue.name
        self.metrics = GatewayMetrics()
        self.stopping = asyncio.Event()
        self.ledger = Ledger(
            client.redis, client.store, settings.supersede, settings.delivery_ttl_s
        )
        self._submits: Coalescer[list[BuildRequest], list[Submission]] = Coalescer(
            self._submit_batch
        )

    # --- webhooks ------------------------------------------------------------------------

    async def webhook(self, request: web.Request, forge: Forge) -> web.Response:
        body = await request.read()
        try:
            delivery = PARSERS[forge](request.headers, body, self.settings.secret_for)
        except WebhookError as exc:
            outcome = "unauthorized" if exc.status == 401 else "bad_request"
            self.metrics.webhooks.inc(forge, outcome)
            log.info("%s webhook refused (%d): %s", forge, exc.status, exc.reason)
            return error(exc.status, exc.reason)
        event = delivery.event
        if isinstance(event, Ping):
            self.metrics.webhooks.inc(forge, "ping")
            return reply(200, {"message": "pong", "repo": event.repo})
        if isinstance(event, Ignored):
            self.metrics.webhooks.inc(forge, "ignored")
            return reply(
                202, {"message": f"event {event.event!r} ignored: only pushes build", "builds": []}
            )
        return await self._push(request, delivery, event)

    async def _push(self, request: web.Request, delivery: Delivery, push: Push) -> web.Response:
        forge = delivery.forge
        plan = rules.plan(self.settings.rules, push)
        requests, planned, skipped = rules.requests_for(plan, push, delivery, _trace(request))
        running_too = [p.cancel_running for p in planned]
        started = time.perf_counter()
        duplicate = False
        replaced: list[Replaced] | None = None
        if delivery.delivery_id is not None:
            match await self.ledger.claim(forge, delivery.delivery_id, requests, running_too):
                case Duplicate(build_ids=recorded):
                    self.metrics.webhooks.inc(forge, "duplicate")
                    return reply(
                        200,
                        {
                            "message": f"delivery {delivery.delivery_id} was already received",
                            "duplicate": True,
                            "builds": [{"id": i} for i in recorded],
                        },
                    )
                case Resubmit(requests=again):
                    requests, duplicate = again, True
                case Claimed(replaced=swapped):
                    replaced = swapped
        superseded: list[Superseded] = []
        if requests:
            try:
                await self._submits(requests)
            except FleetUnavailable:
                if delivery.delivery_id is not None and not duplicate:
                    with contextlib.suppress(FleetUnavailable):
                        await self.ledger.release(forge, delivery.delivery_id)
                raise
            if replaced is None:
                replaced = await self.ledger.swap_latest(requests, running_too)
                overtaken: Sequence[BuildRequest] = ()
            else:
                overtaken = requests
            superseded, cancelled = await self.ledger.cancel_replaced(replaced, overtaken)
            self.metrics.superseded.inc(amount=cancelled)
            self.metrics.builds.inc("webhook", amount=len(requests))
        self.metrics.enqueue.observe(time.perf_counter() - started)
        self.metrics.webhooks.inc(forge, "push" if requests else "no_build")
        body = _push_reply(plan, push, requests, planned, superseded)
        if skipped:
            body["skipped"] = [{"rule": s.rule, "reason": s.reason} for s in skipped]
        if duplicate:
            body["duplicate"] = True
        return reply(202, body)

    async def _submit_batch(self, batches: list[list[BuildRequest]]) -> list[list[Submission]]:
        submissions = await self.client.submit_many([r for batch in batches for r in batch])
        return regroup(submissions, batches)

    # --- REST API ------------------------------------------------------------------------

    async def submit(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            build = decode_request(body)
        except ContractError as exc:
            return error(400, str(exc))
        if build.priority == "batch":
            depth = int(await self.redis.zcard(self.queue_name))
            if depth >= self.settings.max_queue_depth:
                self.metrics.rejected.inc()
                return error(
                    429,
                    f"queue depth {depth} is at its limit {self.settings.max_queue_depth}; "
                    "retry later",
                    {"Retry-After": str(self.settings.retry_after_s)},
                )
        if not build.trace.traceparent:
            trace = _trace(request)
            if trace is not None:
                build = msgspec.structs.replace(build, trace=trace)
        started = time.perf_counter()
        [submission] = await self._submits([build])
        superseded: list[Superseded] = []
        if submission.created:
            replaced = await self.ledger.swap_latest([build], [None])
            superseded, cancelled = await self.ledger.cancel_replaced(replaced)
            self.metrics.superseded.inc(amount=cancelled)
            self.metrics.builds.inc("api")
        self.metrics.enqueue.observe(time.perf_counter() - started)
        answer: dict[str, Any] = {"id": build.id, "created": submission.created}
        if superseded:
            answer["superseded"] = superseded[0].old_id
        headers = {"Location": f"/v1/builds/{build.id}"}
        return reply(202 if submission.created else 200, answer, headers)

    async def get(self, request: web.Request) -> web.Response:
        state = await self.client.get(_build_id(request))
        return web.Response(body=encode(state), content_type="application/json")

    async def cancel(self, request: web.Request) -> web.Response:
        build_id = _build_id(request)
        outcome = await self.client.cancel(build_id, reason="cancelled through the API")
        if outcome is CancelOutcome.ENDED:
            state = await self.client.get(build_id)
            return reply(
                409,
                {"error": f"build has already ended ({state.status})", "outcome": outcome.value},
            )
        status = 200 if outcome is CancelOutcome.CANCELLED else 202
        return reply(status, {"id": build_id, "outcome": outcome.value})

    async def events(self, request: web.Request) -> web.StreamResponse:
        build_id = _build_id(request)
        # Both are checked, whichever wins: a malformed one is an error, not ignored. An empty
        # Last-Event-ID is what EventSource means by "none yet" (the spec's words).
        header = request.headers.get("Last-Event-ID", "")
        query = request.query.get("after", "0-0")
        for name, value in (("Last-Event-ID", header or "0-0"), ("after", query)):
            if not _STREAM_ID.fullmatch(value):
                return error(400, f"{name} must be a stream id like 1700000000000-0: {value!r}")
        after = header or query
        await self.client.get(build_id)  # 404 or 503 before the stream starts
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        entries = self.client.watch_entries(build_id, after=after)
        with contextlib.suppress(ConnectionError):
            await self._stream(response, entries)
            await response.write_eof()
        return response

    async def _stream(
        self, response: web.StreamResponse, entries: AsyncIterator[tuple[str, BuildEvent]]
    ) -> None:
        stopping = asyncio.ensure_future(self.stopping.wait())
        pending: asyncio.Future[tuple[str, BuildEvent]] | None = None
        try:
            while True:
                pending = asyncio.ensure_future(anext(entries))
                while True:
                    done, _ = await asyncio.wait(
                        {pending, stopping},
                        timeout=self.settings.sse_heartbeat_s,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    if pending in done or stopping in done:
                        break
                    await response.write(b": keep-alive\n\n")
                if pending not in done:
                    return  # shutting down; the client resumes with Last-Event-ID
                try:
                    entry_id, event = pending.result()
                except (StopAsyncIteration, BuildNotFound):
                    return
                except Exception as exc:
                    # The headers are sent: say so on the stream and end it (never a 5xx).
                    log.warning("event stream ended early: %s", type(exc).__name__)
                    message = "the build queue (Redis) is unreachable; reconnect later"
                    await response.write(_sse(None, "error", _json.encode({"error": message})))
                    return
                finally:
                    pending = None
                tag = type(event).__struct_config__.tag
                await response.write(_sse(entry_id, str(tag), encode(event)))
        finally:
            stopping.cancel()
            if pending is not None and not pending.done():
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending
            aclose = getattr(entries, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    # --- operations ----------------------------------------------------------------------

    async def healthz(self, _request: web.Request) -> web.Response:
        return reply(200, {"status": "ok"})

    async def readyz(self, _request: web.Request) -> web.Response:
        try:
            async with asyncio.timeout(2.0):
                await self.client.ping()
        except (FleetUnavailable, TimeoutError) as exc:
            return error(503, f"Redis unreachable: {type(exc).__name__}")
        return reply(200, {"status": "ready"})

    async def metrics_text(self, _request: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics.render().encode(), headers={"Content-Type": CONTENT_TYPE}
        )


def _push_reply(
    plan: rules.Plan,
    push: Push,
    requests: Sequence[BuildRequest],
    planned: Sequence[rules.PlannedBuild],
    superseded: Sequence[Superseded],
) -> dict[str, Any]:
    by_new = {s.new_id: s for s in superseded}
    builds = []
    for req, build in zip(requests, planned, strict=True):
        entry: dict[str, Any] = {"id": req.id, "images": list(req.images), "rule": build.rule}
        if req.id in by_new:
            entry["superseded"] = by_new[req.id].old_id
        builds.append(entry)
    body: dict[str, Any] = {"message": plan.message, "repo": push.repo, "ref": push.ref}
    if push.sha:
        body["sha"] = push.sha
    body["builds"] = builds
    return body


def _sse(entry_id: str | None, event: str, data: bytes) -> bytes:
    head = f"id: {entry_id}\n" if entry_id is not None else ""
    return f"{head}event: {event}\n".encode() + b"data: " + data + b"\n\n"


def _build_id(request: web.Request) -> str:
    build_id = request.match_info["build_id"]
    if not _BUILD_ID.match(build_id):
        raise BuildNotFound(build_id)
    return build_id


def _trace(request: web.Request) -> TraceContext | None:
    headers = request.headers
    return rules.trace_context(headers.get("traceparent", ""), headers.get("tracestate", ""))
