"""The HTTP gateway: signed push webhooks and the REST API, over the Python client.

    app = make_app(settings, client)      # an aiohttp Application, for tests and embedding
    run_gateway(settings, redis, queue)   # `buildfleet gateway`: serve until SIGINT/SIGTERM

Every answer is JSON (`{"error": reason}` for failures) except /metrics and the event
stream. Redis being unreachable is a 503, never a 500 and never a false 202.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib
import logging
import re
import signal
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

import msgspec
from aiohttp import web
from aiohttp.typedefs import Middleware
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer.client import BuildfleetClient, BuildNotFound, FleetUnavailable, connect
from producer.contract import (
    BUILD_ID_PATTERN,
    BuildEvent,
    BuildRequest,
    ContractError,
    TraceContext,
    decode_request,
    encode,
    request_from_builtins,
)
from producer.gateway import rules as rules_mod
from producer.gateway.openapi import STREAM_ID_PATTERN, openapi_document
from producer.gateway.settings import Forge, GatewaySettings
from producer.gateway.tracing import tracing_middleware
from producer.gateway.webhooks import PARSERS, Delivery, Ignored, Ping, Push, WebhookError
from producer.keys import BUILD_PREFIX, build_key, delivery_key, supersede_record_key
from producer.settings import QueueSettings, RedisSettings
from producer.store import CancelOutcome, Submission

log = logging.getLogger("buildfleet.gateway")

ENQUEUE_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
METRICS_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
_BUILD_ID: Final = re.compile(BUILD_ID_PATTERN)
_STREAM_ID: Final = re.compile(STREAM_ID_PATTERN)
_TRACEPARENT: Final = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
_TRACESTATE: Final = re.compile(r"^[\x20-\x7e]{0,512}$")
_QUEUED_STATUSES: Final = frozenset({"queued", "retrying"})
_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# Records each new build id as the latest of its supersede key, returning per key the id it
# replaced and that build's status ('' and '' when there was none).
_SWAP_FUNCTION: Final = """
local function swap(first_key, ttl, prefix, first_id)
  local out = {}
  for i = first_key, #KEYS do
    local new = ARGV[first_id + i - first_key]
    local old = redis.call('SET', KEYS[i], new, 'GET', 'EX', ttl)
    if old and old ~= new then
      out[#out + 1] = old
      out[#out + 1] = redis.call('HGET', prefix .. old, 'status') or ''
    else
      out[#out + 1] = ''
      out[#out + 1] = ''
    end
  end
  return out
end
"""

# A new delivery, in one round trip: record it and, for each supersede key, record its new
# build as the latest and return the build it replaces with that build's status.
# KEYS: delivery key, then supersede keys. ARGV: build ids (JSON), delivery ttl, supersede
# ttl, build-key prefix, then the new build id of each supersede key.
# Returns {0, recorded ids} for a repeated delivery (nothing changed), else {1, old, status,
# old, status, ...} ('' and '' where nothing was replaced).
_CLAIM: Final = (
    _SWAP_FUNCTION
    + """
local previous = redis.call('GET', KEYS[1])
if previous then return {0, previous} end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
local out = swap(2, ARGV[3], ARGV[4], 5)
table.insert(out, 1, 1)
return out
"""
)

# KEYS: supersede keys; ARGV: ttl, build-key prefix, then one new build id per key.
_SWAP: Final = _SWAP_FUNCTION + "\nreturn swap(1, ARGV[1], ARGV[2], 3)\n"

_json: Final = msgspec.json.Encoder()
_json_list: Final = msgspec.json.Decoder(list[str])


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    inner = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True))
    return "{" + inner + "}" if inner else ""


class Counter:
    def __init__(self, name: str, help_text: str, labels: tuple[str, ...]) -> None:
        self.name = name
        self.help = help_text
        self.label_names = labels
        self.values: defaultdict[tuple[str, ...], float] = defaultdict(float)

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        self.values[labels] += amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        for labels, value in sorted(self.values.items()):
            lines.append(f"{self.name}{_labels(self.label_names, labels)} {value:g}")
        return lines


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]) -> None:
        self.name = name
        self.help = help_text
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        for index, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[index] += 1
                break

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, count in zip(self.buckets, self.counts, strict=True):
            cumulative += count
            lines.append(f'{self.name}_bucket{{le="{bound:g}"}} {cumulative}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{self.name}_sum {self.sum:.6f}")
        lines.append(f"{self.name}_count {self.count}")
        return lines


class GatewayMetrics:
    def __init__(self) -> None:
        self.requests = Counter(
            "buildfleet_gateway_requests_total",
            "HTTP requests by route, method and status.",
            ("route", "method", "status"),
        )
        self.webhooks = Counter(
            "buildfleet_gateway_webhooks_total",
            "Webhook deliveries by forge and outcome.",
            ("forge", "outcome"),
        )
        self.builds = Counter(
            "buildfleet_gateway_builds_enqueued_total",
            "Builds enqueued, by origin (webhook or api).",
            ("origin",),
        )
        self.superseded = Counter(
            "buildfleet_gateway_superseded_total",
            "Older builds cancelled because a newer one replaced them.",
            (),
        )
        self.rejected = Counter(
            "buildfleet_gateway_backpressure_total",
            "API submissions refused with 429 because the queue was too deep.",
            (),
        )
        self.enqueue = Histogram(
            "buildfleet_gateway_enqueue_seconds",
            "Time to enqueue the builds of one request (submit and supersede) in Redis.",
            ENQUEUE_BUCKETS,
        )

    def render(self) -> str:
        lines: list[str] = []
        for metric in (
            self.requests,
            self.webhooks,
            self.builds,
            self.superseded,
            self.rejected,
        ):
            lines.extend(metric.render())
        lines.extend(self.enqueue.render())
        return "\n".join(lines) + "\n"


# --- responses ---------------------------------------------------------------------------


def _reply(status: int, body: object, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=_json.encode(body), content_type="application/json", headers=headers
    )


def _error(status: int, reason: str, headers: dict[str, str] | None = None) -> web.Response:
    return _reply(status, {"error": reason}, headers)


@dataclass(frozen=True, slots=True)
class _Superseded:
    old_id: str
    new_id: str
    outcome: str


_In = TypeVar("_In")
_Out = TypeVar("_Out")


class Coalescer(Generic[_In, _Out]):
    """Runs the calls made during one event-loop turn as one batch.

    Concurrent requests that reach the same step together share one Redis round trip
    (one pipeline) instead of one each: under load the gateway's cost per request is
    mostly round trips, so this is what makes it scale. `run` gets the inputs in call order
    and returns one output (or exception) per input.
    """

    def __init__(self, run: Callable[[list[_In]], Awaitable[Sequence[_Out | Exception]]]) -> None:
        self._run = run
        self._pending: list[tuple[_In, asyncio.Future[_Out]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def __call__(self, item: _In) -> _Out:
        return await self.enqueue(item)

    def enqueue(self, item: _In) -> asyncio.Future[_Out]:
        """Queue `item` for this turn's batch; the future holds its output."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_Out] = loop.create_future()
        self._pending.append((item, future))
        if len(self._pending) == 1:
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.ensure_future(self._execute(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute(self, batch: list[tuple[_In, asyncio.Future[_Out]]]) -> None:
        try:
            results = await self._run([item for item, _ in batch])
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():  # its caller went away
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)


@dataclass(frozen=True, slots=True)
class _Replaced:
    """A supersede record moved from `old_id` (then in `status`, '' if unknown) to `new_id`."""

    old_id: str
    status: str
    new_id: str
    cancel_running: bool


@dataclass(frozen=True, slots=True)
class _Resubmit:
    requests: list[BuildRequest]


def _supersede_record(request: BuildRequest) -> str:
    """The record of the latest build for a request's supersede key (callers filter on it)."""
    return supersede_record_key(request.supersede_key or "")


def _replaced(keyed: Sequence[tuple[BuildRequest, bool]], reply: Sequence[Any]) -> list[_Replaced]:
    out = []
    for index, (request, running_too) in enumerate(keyed):
        old, status = _text(reply[2 * index]), _text(reply[2 * index + 1])
        if old:
            out.append(_Replaced(old, status, request.id, running_too))
    return out


class Gateway:
    """The application's state: settings, the client, metrics and the Redis scripts."""

    def __init__(self, settings: GatewaySettings, client: BuildfleetClient) -> None:
        self.settings = settings
        self.client = client
        self.redis = client.redis
        self.queue_name = client.store.queue.name
        self.metrics = GatewayMetrics()
        self.stopping = asyncio.Event()
        self._tokens = tuple(token.encode() for token in settings.api_tokens)
        self._claim = self.redis.register_script(_CLAIM)
        self._claims: Coalescer[tuple[list[str], list[Any]], Any] = Coalescer(self._claim_batch)
        self._submits: Coalescer[list[BuildRequest], list[Submission]] = Coalescer(
            self._submit_batch
        )
        self._latest: Coalescer[list[str], list[Any]] = Coalescer(self._latest_batch)
        self._cancels: Coalescer[tuple[str, str], CancelOutcome] = Coalescer(self._cancel_batch)
        self._swap = self.redis.register_script(_SWAP)
        self._build_key_prefix = BUILD_PREFIX

    # --- webhooks ------------------------------------------------------------------------

    async def webhook(self, request: web.Request, forge: Forge) -> web.Response:
        body = await request.read()
        try:
            delivery = PARSERS[forge](request.headers, body, self._secret)
        except WebhookError as exc:
            outcome = "unauthorized" if exc.status == 401 else "bad_request"
            self.metrics.webhooks.inc(forge, outcome)
            log.info("%s webhook refused (%d): %s", forge, exc.status, exc.reason)
            return _error(exc.status, exc.reason)
        event = delivery.event
        if isinstance(event, Ping):
            self.metrics.webhooks.inc(forge, "ping")
            return _reply(200, {"message": "pong", "repo": event.repo})
        if isinstance(event, Ignored):
            self.metrics.webhooks.inc(forge, "ignored")
            return _reply(
                202, {"message": f"event {event.event!r} ignored: only pushes build", "builds": []}
            )
        return await self._push(request, delivery, event)

    def _secret(self, forge: str, repo: str) -> str | None:
        return self.settings.secret_for(forge, repo)

    async def _push(self, request: web.Request, delivery: Delivery, push: Push) -> web.Response:
        forge = delivery.forge
        plan = rules_mod.plan(self.settings.rules, push)
        requests, planned, skipped = _requests_for(plan, push, delivery, _trace_context(request))
        running_too = [p.cancel_running for p in planned]
        started = time.perf_counter()
        duplicate = False
        replaced: list[_Replaced] | None = None
        if delivery.delivery_id is not None:
            claim = await self._claim_delivery(delivery, requests, running_too)
            if isinstance(claim, web.Response):
                return claim
            if isinstance(claim, _Resubmit):
                requests, duplicate = claim.requests, True
            else:
                replaced = claim
        superseded: list[_Superseded] = []
        if requests:
            try:
                await self._submits(requests)
            except FleetUnavailable:
                if delivery.delivery_id is not None and not duplicate:
                    with contextlib.suppress(RedisError):
                        await self.redis.delete(delivery_key(forge, delivery.delivery_id))
                raise
            if replaced is None:
                replaced = await self._swap_latest(requests, running_too)
                superseded = await self._cancel_replaced(replaced)
            else:
                superseded = await self._cancel_replaced(replaced, overtaken_check=requests)
            self.metrics.builds.inc("webhook", amount=len(requests))
        self.metrics.enqueue.observe(time.perf_counter() - started)
        self.metrics.webhooks.inc(forge, "push" if requests else "no_build")
        body = _push_reply(plan, push, requests, planned, superseded)
        if skipped:
            body["skipped"] = skipped
        if duplicate:
            body["duplicate"] = True
        return _reply(202, body)

    def _supersedable(
        self, requests: Sequence[BuildRequest], running_too: Sequence[bool | None]
    ) -> list[tuple[BuildRequest, bool]]:
        """The requests that replace an older build, with whether a running one goes too."""
        if not self.settings.supersede.enabled:
            return []
        default = self.settings.supersede.cancel_running
        return [
            (r, default if c is None else c)
            for r, c in zip(requests, running_too, strict=True)
            if r.supersede_key
        ]

    async def _claim_delivery(
        self, delivery: Delivery, requests: list[BuildRequest], running_too: list[bool | None]
    ) -> web.Response | _Resubmit | list[_Replaced]:
        """Record a new delivery and swap its supersede records (what it replaces is
        returned); for a repeated one, the answer to give, or the requests to enqueue again
        under the ids its first arrival recorded but never enqueued (Redis went away)."""
        key = delivery_key(delivery.forge, delivery.delivery_id or "")
        keyed = self._supersedable(requests, running_too)
        reply = await self._claims(
            (
                [key, *(_supersede_record(r) for r, _ in keyed)],
                [
                    _json.encode([r.id for r in requests]),
                    self.settings.delivery_ttl_s,
                    self.settings.supersede.record_ttl_s,
                    self._build_key_prefix,
                    *(r.id for r, _ in keyed),
                ],
            )
        )
        if int(reply[0]) == 1:
            return _replaced(keyed, reply[1:])
        recorded = _decode_ids(reply[1])
        if len(recorded) == len(requests) and not await self._all_exist(recorded):
            return _Resubmit(
                [msgspec.structs.replace(r, id=i) for r, i in zip(requests, recorded, strict=True)]
            )
        self.metrics.webhooks.inc(delivery.forge, "duplicate")
        return _reply(
            200,
            {
                "message": f"delivery {delivery.delivery_id} was already received",
                "duplicate": True,
                "builds": [{"id": i} for i in recorded],
            },
        )

    async def _claim_batch(self, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """Many claims in one pipeline, by EVALSHA (a Script in a pipeline would cost a
        SCRIPT EXISTS round trip every time); a Redis that lost the script gets it again."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                pipe.evalsha(self._claim.sha, len(keys), *keys, *args)
            results: list[Any] = await pipe.execute(raise_on_error=False)
        for index, result in enumerate(results):
            if isinstance(result, NoScriptError):
                keys, args = calls[index]
                results[index] = await self._claim(keys=keys, args=args)
        return results

    async def _submit_batch(self, batches: list[list[BuildRequest]]) -> list[list[Submission]]:
        submissions = await self.client.submit_many([r for batch in batches for r in batch])
        out, start = [], 0
        for batch in batches:
            out.append(submissions[start : start + len(batch)])
            start += len(batch)
        return out

    async def _latest_batch(self, key_lists: list[list[str]]) -> list[list[Any]]:
        values = await self.redis.mget([key for keys in key_lists for key in keys])
        out, start = [], 0
        for keys in key_lists:
            out.append(values[start : start + len(keys)])
            start += len(keys)
        return out

    async def _all_exist(self, build_ids: Sequence[str]) -> bool:
        if not build_ids:
            return True
        count = await self.redis.exists(*(build_key(i) for i in build_ids))
        return int(count) == len(build_ids)

    async def _swap_latest(
        self, requests: Sequence[BuildRequest], running_too: Sequence[bool | None]
    ) -> list[_Replaced]:
        """Record each (enqueued) build as the latest of its supersede key."""
        keyed = self._supersedable(requests, running_too)
        if not keyed:
            return []
        reply = await self._swap(
            keys=[_supersede_record(r) for r, _ in keyed],
            args=[
                self.settings.supersede.record_ttl_s,
                self._build_key_prefix,
                *(r.id for r, _ in keyed),
            ],
        )
        return _replaced(keyed, reply)

    async def _cancel_replaced(
        self,
        replaced: Sequence[_Replaced],
        overtaken_check: Sequence[BuildRequest] = (),
    ) -> list[_Superseded]:
        """Cancel the builds the new ones replace: queued ones, running ones if so asked.
        With `overtaken_check`, also cancel those of these (just enqueued) builds that a
        newer push has replaced meanwhile; both go out in the same round trip."""
        cancels = [
            r
            for r in replaced
            if r.status in _QUEUED_STATUSES or (r.cancel_running and r.status == "running")
        ]
        keyed = [r for r in overtaken_check if r.supersede_key]
        latest = (
            self._latest.enqueue([_supersede_record(r) for r in keyed])
            if keyed and self.settings.supersede.enabled
            else None
        )
        outcomes = await asyncio.gather(
            *(self._cancels.enqueue((r.old_id, f"superseded by {r.new_id}")) for r in cancels)
        )
        done = []
        for r, outcome in zip(cancels, outcomes, strict=True):
            if outcome in (CancelOutcome.CANCELLED, CancelOutcome.SIGNALLED):
                self.metrics.superseded.inc()
                done.append(_Superseded(r.old_id, r.new_id, outcome.value))
        if latest is not None:
            await self._cancel_overtaken(keyed, await latest)
        return done

    async def _cancel_overtaken(self, keyed: Sequence[BuildRequest], latest: Sequence[Any]) -> None:
        """Builds recorded as latest before they were enqueued may have been replaced by a
        newer push meanwhile, which could not cancel them (they were not there yet): they
        cancel themselves. With this, one of the two always cancels the older build,
        whatever the interleaving."""
        for request, now in zip(keyed, latest, strict=True):
            newer = _text(now)
            if newer and newer != request.id:
                outcome = await self._cancel_quietly(request.id, f"superseded by {newer}")
                if outcome in (CancelOutcome.CANCELLED, CancelOutcome.SIGNALLED):
                    self.metrics.superseded.inc()

    async def _cancel_quietly(self, build_id: str, reason: str) -> CancelOutcome:
        """Cancel, batched with the other cancels of this event-loop turn."""
        return await self._cancels((build_id, reason))

    async def _cancel_batch(self, items: list[tuple[str, str]]) -> list[CancelOutcome]:
        try:
            return await self.client.store.cancel_many(items)  # one round trip for them all
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise FleetUnavailable(f"cannot cancel: Redis unreachable ({exc})") from exc

    # --- REST API ------------------------------------------------------------------------

    def authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        given = token.strip().encode("utf-8", "replace")
        found = False
        for candidate in self._tokens:  # every token is compared: no early exit
            found |= hmac.compare_digest(candidate, given)
        return found

    async def submit(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            build = decode_request(body)
        except ContractError as exc:
            return _error(400, str(exc))
        except RecursionError:  # the contract's decoder lets this one through
            return _error(400, "invalid build request: JSON nested too deeply")
        if build.priority == "batch":
            depth = int(await self.redis.zcard(self.queue_name))
            if depth >= self.settings.max_queue_depth:
                self.metrics.rejected.inc()
                return _error(
                    429,
                    f"queue depth {depth} is at its limit {self.settings.max_queue_depth}; "
                    "retry later",
                    {"Retry-After": str(self.settings.retry_after_s)},
                )
        if not build.trace.traceparent:
            trace = _trace_context(request)
            if trace is not None:
                build = msgspec.structs.replace(build, trace=trace)
        started = time.perf_counter()
        [submission] = await self._submits([build])
        superseded: list[_Superseded] = []
        if submission.created:
            superseded = await self._cancel_replaced(await self._swap_latest([build], [None]))
            self.metrics.builds.inc("api")
        self.metrics.enqueue.observe(time.perf_counter() - started)
        answer: dict[str, Any] = {"id": build.id, "created": submission.created}
        if superseded:
            answer["superseded"] = superseded[0].old_id
        headers = {"Location": f"/v1/builds/{build.id}"}
        return _reply(202 if submission.created else 200, answer, headers)

    async def get(self, request: web.Request) -> web.Response:
        state = await self.client.get(_build_id(request))
        return web.Response(body=encode(state), content_type="application/json")

    async def cancel(self, request: web.Request) -> web.Response:
        build_id = _build_id(request)
        outcome = await self.client.cancel(build_id, reason="cancelled through the API")
        if outcome is CancelOutcome.ENDED:
            state = await self.client.get(build_id)
            return _reply(
                409,
                {"error": f"build has already ended ({state.status})", "outcome": outcome.value},
            )
        status = 200 if outcome is CancelOutcome.CANCELLED else 202
        return _reply(status, {"id": build_id, "outcome": outcome.value})

    async def events(self, request: web.Request) -> web.StreamResponse:
        build_id = _build_id(request)
        # Both are checked, whichever wins: a malformed one is an error, not ignored. An empty
        # Last-Event-ID is what EventSource means by "none yet" (the spec's words).
        header = request.headers.get("Last-Event-ID", "")
        query = request.query.get("after", "0-0")
        for name, value in (("Last-Event-ID", header or "0-0"), ("after", query)):
            if not _STREAM_ID.fullmatch(value):
                return _error(400, f"{name} must be a stream id like 1700000000000-0: {value!r}")
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
                except (FleetUnavailable, RedisError, ContractError) as exc:
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

    async def ready(self) -> web.Response:
        try:
            async with asyncio.timeout(2.0):
                await self.redis.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            return _error(503, f"Redis unreachable: {type(exc).__name__}")
        return _reply(200, {"status": "ready"})


def _push_reply(
    plan: rules_mod.Plan,
    push: Push,
    requests: Sequence[BuildRequest],
    planned: Sequence[rules_mod.PlannedBuild],
    superseded: Sequence[_Superseded],
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


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


def _decode_ids(value: bytes | str) -> list[str]:
    try:
        return _json_list.decode(value)
    except msgspec.DecodeError:
        return []


def _build_id(request: web.Request) -> str:
    build_id = request.match_info["build_id"]
    if not _BUILD_ID.match(build_id):
        raise BuildNotFound(build_id)
    return build_id


def _trace_context(request: web.Request) -> TraceContext | None:
    """The caller's W3C trace context, when it is well formed (else the build starts a trace)."""
    traceparent = request.headers.get("traceparent", "").strip()
    if not _TRACEPARENT.fullmatch(traceparent):
        return None
    tracestate = request.headers.get("tracestate", "").strip()
    if not _TRACESTATE.fullmatch(tracestate):
        tracestate = ""
    return TraceContext(traceparent=traceparent, tracestate=tracestate or None)


def _requests_for(
    plan: rules_mod.Plan, push: Push, delivery: Delivery, trace: TraceContext | None
) -> tuple[list[BuildRequest], list[rules_mod.PlannedBuild], list[dict[str, Any]]]:
    """The plan's builds as requests, and why any could not be made (`skipped`)."""
    skipped: list[dict[str, Any]] = [{"rule": s.rule, "reason": s.reason} for s in plan.skipped]
    requests: list[BuildRequest] = []
    planned: list[rules_mod.PlannedBuild] = []
    for build in plan.builds:
        try:
            requests.append(_build_request(build, push, delivery, trace))
            planned.append(build)
        except ContractError as exc:
            skipped.append({"rule": build.rule, "reason": str(exc)})
    return requests, planned, skipped


def _build_request(
    build: rules_mod.PlannedBuild,
    push: Push,
    delivery: Delivery,
    trace: TraceContext | None,
) -> BuildRequest:
    labels = {"origin": "webhook", "forge": push.forge, "repo": push.repo, "ref": push.ref}
    labels["rule"] = str(build.rule)
    if delivery.delivery_id is not None:
        labels["delivery"] = delivery.delivery_id
    obj: dict[str, Any] = {
        "source": {"type": "git", "url": push.clone_url, "ref": push.ref, "commit": push.sha},
        "images": build.images,
        "dockerfile": build.dockerfile,
        "context": build.context,
        "build_args": build.build_args,
        "platforms": build.platforms,
        "priority": build.priority,
        "push": build.push,
        "labels": labels,
    }
    if build.target is not None:
        obj["target"] = build.target
    if build.supersede_key is not None:
        obj["supersede_key"] = build.supersede_key
    if trace is not None:
        obj["trace"] = {"traceparent": trace.traceparent, "tracestate": trace.tracestate}
    return request_from_builtins(obj)


# --- the application ---------------------------------------------------------------------

GATEWAY: Final = web.AppKey("gateway", Gateway)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _route_name(request: web.Request) -> str:
    route = request.match_info.route
    resource = route.resource
    if resource is None or isinstance(request.match_info.http_exception, web.HTTPException):
        return "unmatched"
    return resource.canonical


def _middleware(gateway: Gateway) -> Middleware:
    limit = gateway.settings.body_limit_bytes

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        response: web.StreamResponse
        try:
            if request.content_length is not None and request.content_length > limit:
                response = _error(413, f"request body larger than {limit} bytes")
                response.force_close()
            else:
                response = await handler(request)
        except web.HTTPException as exc:
            response = _error(exc.status, exc.reason, _allow_header(exc))
            if exc.status == 413:
                response.force_close()
        except BuildNotFound as exc:
            response = _error(404, str(exc))
        except (FleetUnavailable, RedisError, ConnectionError) as exc:
            log.warning("Redis unreachable: %s", type(exc).__name__)
            response = _error(503, "the build queue (Redis) is unreachable; retry later")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            response = _error(500, "internal error")
        method = request.method if request.method in _METHODS else "OTHER"
        gateway.metrics.requests.inc(_route_name(request), method, str(response.status))
        return response

    return middleware


def _allow_header(exc: web.HTTPException) -> dict[str, str] | None:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else None


def make_app(settings: GatewaySettings, client: BuildfleetClient) -> web.Application:
    """The gateway as an aiohttp Application over `client` (which the caller closes)."""
    gateway = Gateway(settings, client)
    app = web.Application(
        client_max_size=settings.body_limit_bytes,
        middlewares=[tracing_middleware(), _middleware(gateway)],
    )
    app[GATEWAY] = gateway
    document = _json.encode(openapi_document(settings))

    def hook(forge: Forge) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await gateway.webhook(request, forge)

        return handler

    def api(method: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            if not gateway.authorized(request):
                return _error(
                    401,
                    "missing or invalid bearer token",
                    {"WWW-Authenticate": 'Bearer realm="buildfleet"'},
                )
            return await method(request)

        return handler

    async def healthz(_request: web.Request) -> web.StreamResponse:
        return _reply(200, {"status": "ok"})

    async def readyz(_request: web.Request) -> web.StreamResponse:
        return await gateway.ready()

    async def metrics(_request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=gateway.metrics.render().encode(),
            headers={"Content-Type": METRICS_CONTENT_TYPE},
        )

    async def openapi(_request: web.Request) -> web.StreamResponse:
        return web.Response(body=document, content_type="application/json")

    async def on_shutdown(_app: web.Application) -> None:
        gateway.stopping.set()

    app.on_shutdown.append(on_shutdown)
    for forge in ("github", "gitlab", "gitea"):
        app.router.add_post(f"/hooks/{forge}", hook(forge))
    app.router.add_post("/v1/builds", api(gateway.submit))
    app.router.add_get("/v1/builds/{build_id}", api(gateway.get), allow_head=False)
    app.router.add_delete("/v1/builds/{build_id}", api(gateway.cancel))
    app.router.add_get("/v1/builds/{build_id}/events", api(gateway.events), allow_head=False)
    app.router.add_get("/healthz", healthz, allow_head=False)
    app.router.add_get("/readyz", readyz, allow_head=False)
    app.router.add_get("/metrics", metrics, allow_head=False)
    app.router.add_get("/openapi.json", openapi, allow_head=False)
    return app


# --- serving -----------------------------------------------------------------------------


class GatewayServer:
    """A started gateway; `url` is where it listens (the port may have been chosen by the OS)."""

    def __init__(self, runner: web.AppRunner, host: str, port: int) -> None:
        self.runner = runner
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def aclose(self) -> None:
        await self.runner.cleanup()


async def start_gateway(settings: GatewaySettings, client: BuildfleetClient) -> GatewayServer:
    """Serve the gateway on `settings.host`:`settings.port` (0 picks a free port)."""
    app = make_app(settings, client)
    runner = web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=settings.shutdown_timeout_s,
        lingering_time=2.0,
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, backlog=1024)
    await site.start()
    port = settings.port
    server = site._server  # the only way to learn the port the OS picked
    sockets = getattr(server, "sockets", None)
    if sockets:
        port = int(sockets[0].getsockname()[1])
    return GatewayServer(runner, settings.host, port)


def load_gateway_settings(data: object) -> GatewaySettings:
    """The `[gateway]` table (TOML values, or strings from environment overrides) validated;
    a ValueError names the field and what was expected."""
    try:
        return msgspec.convert(data, GatewaySettings, strict=False)
    except msgspec.ValidationError as exc:
        raise ValueError(f"gateway: {exc}") from exc


def run_gateway(
    settings: GatewaySettings,
    redis: RedisSettings | None = None,
    queue: QueueSettings | None = None,
    *,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """`buildfleet gateway`: serve until SIGINT or SIGTERM, then drain and stop."""
    with asyncio.Runner(loop_factory=event_loop_factory(settings.event_loop)) as runner:
        runner.run(serve_gateway(settings, redis, queue, on_ready=on_ready))


def event_loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop for `uvloop` (which must be installed) and for `auto` when it is
    installed; None (asyncio's own) otherwise."""
    if choice == "asyncio":
        return None
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        if choice == "uvloop":
            raise
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


async def serve_gateway(
    settings: GatewaySettings,
    redis: RedisSettings | None = None,
    queue: QueueSettings | None = None,
    *,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """The body of `run_gateway`, for callers that already run an event loop."""
    client = BuildfleetClient(connect(redis or RedisSettings()), queue or QueueSettings())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    try:
        server = await start_gateway(settings, client)
        log.info("gateway listening on %s (%s)", server.url, type(loop).__module__)
        if on_ready is not None:
            on_ready(server.url)
        try:
            await stop.wait()
        finally:
            await server.aclose()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signum)
        await client.aclose()
