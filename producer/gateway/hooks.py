"""POST /hooks/{forge}: a signed webhook, and the builds a push makes.

The order of the checks is the point:
1. the body limit, before reading (producer.gateway.http.read_body);
2. authentication, before the JSON is parsed (producer.gateway.webhooks);
3. a rate limit per repository;
4. the ledger, in one round trip: a repeated delivery answers what it made (200); a push of
   a commit already built for its ref, or one the ref has moved past, builds nothing (409);
   admission (the queue's depth, the tenant's cap) may refuse it (429 with Retry-After,
   nothing recorded, so the forge's redelivery can still build); else its builds are
   enqueued and supersede the older builds of the same ref and image in that same trip.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any, Final

from aiohttp import web

from producer.contract import BuildRequest
from producer.gateway import rules
from producer.gateway.admission import Caps, Refused
from producer.gateway.http import error, read_body, refused, reply, too_many
from producer.gateway.ledger import (
    Claimed,
    Duplicate,
    PushRecord,
    Resubmit,
    Stale,
    Superseded,
)
from producer.gateway.limits import retry_after
from producer.gateway.settings import Forge
from producer.gateway.state import Gateway
from producer.gateway.webhooks import PARSERS, Delivery, Ignored, Ping, Push, WebhookError
from producer.keys import push_history_key

log = logging.getLogger("buildfleet.gateway")

OFF_LOOP_BYTES: Final = 256 * 1024
"""Bodies larger than this are authenticated on a thread (hashlib releases the GIL)."""


async def webhook(gateway: Gateway, request: web.Request, forge: Forge) -> web.Response:
    settings = gateway.settings
    body = await read_body(request, settings.body_limit_bytes)
    parse = PARSERS[forge]
    headers, secrets = request.headers, settings.webhook_secrets
    try:
        if len(body) > OFF_LOOP_BYTES:
            delivery = await asyncio.to_thread(parse, headers, body, secrets)
        else:
            delivery = parse(headers, body, secrets)
    except WebhookError as exc:
        outcome = "unauthorized" if exc.status == 401 else "bad_request"
        gateway.metrics.webhooks.inc(forge, outcome)
        log.info("%s webhook refused (%d): %s", forge, exc.status, exc.reason)
        return error(exc.status, exc.reason)
    match delivery.event:
        case Ping(repo=repo):
            gateway.metrics.webhooks.inc(forge, "ping")
            return reply(200, {"message": "pong", "repo": repo})
        case Ignored(repo=repo, event=event):
            gateway.metrics.webhooks.inc(forge, "ignored")
            why = "only pushes build" if repo else "it names no repository"
            return reply(202, {"message": f"event {event!r} ignored: {why}", "builds": []})
        case Push() as push:
            wait = gateway.hook_rate.take(f"{forge}:{push.repo.lower()}", time.monotonic())
            if wait:
                gateway.metrics.limited.inc("webhook_rate")
                return too_many(
                    f"too many deliveries for {push.repo}; retry later", retry_after(wait)
                )
            return await _push(gateway, request, delivery, push)


async def _push(
    gateway: Gateway, request: web.Request, delivery: Delivery, push: Push
) -> web.Response:
    settings, metrics, forge = gateway.settings, gateway.metrics, delivery.forge
    plan = rules.plan(settings.rules, push)
    tenant = settings.tenant_of_owner(push.owner)
    origin = rules.Origin(
        delivery=delivery,
        clone_url=settings.forges.of(forge).url_for(push.repo),
        tenant=tenant,
        trace=rules.trace_context(
            request.headers.get("traceparent", ""), request.headers.get("tracestate", "")
        ),
        received_at=time.time(),
    )
    requests, planned, skipped = rules.requests_for(plan, push, origin)
    running_too = [p.cancel_running for p in planned]
    started = time.perf_counter()
    remembered = requests and settings.refuse_old_pushes
    record = PushRecord(
        push_history_key(forge, push.repo, push.ref), push.sha if remembered else "", push.before
    )
    duplicate = False
    caps = Caps(settings.max_queue_depth_interactive, tenant, settings.tenant_cap(tenant))
    claim = await gateway.ledger.claim(
        forge, delivery.delivery_id, record, requests, running_too=running_too, caps=caps
    )
    match claim:
        case Duplicate(build_ids=recorded):
            metrics.webhooks.inc(forge, "duplicate")
            message = f"delivery {delivery.delivery_id} was already received"
            builds = [{"id": i} for i in recorded]
            return reply(200, {"message": message, "duplicate": True, "builds": builds})
        case Stale(built=built):
            metrics.webhooks.inc(forge, "stale")
            return error(409, _stale_reason(push, built))
        case Refused() as refusal:
            return refused(metrics, refusal, settings.retry_after_s)
        case Resubmit(requests=again):
            requests, duplicate = again, True
            enqueued = await gateway.ledger.enqueue(requests, running_too)
        case Claimed(enqueued=enqueued):
            pass  # enqueued, and superseding, in the claim's own round trip
    superseded = enqueued.superseded
    if requests:
        metrics.superseded.inc(amount=len(superseded))
        metrics.builds.inc("webhook", amount=len(requests))
    metrics.enqueue.observe(time.perf_counter() - started)
    metrics.webhooks.inc(forge, "push" if requests else "no_build")
    body = _push_reply(plan, push, requests, planned, superseded)
    if skipped:
        body["skipped"] = [{"rule": s.rule, "reason": s.reason} for s in skipped]
    if duplicate:
        body["duplicate"] = True
    return reply(202, body)


def _stale_reason(push: Push, built: bool) -> str:
    commit = push.sha[:12]
    if built:
        return f"commit {commit} (after) was already built for {push.ref}: nothing to build"
    return (
        f"{push.ref} has moved past commit {commit} (after): building it would move its images "
        "back to an older commit, so nothing is built"
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
