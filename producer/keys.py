"""Every Redis key, stream and channel name the fleet uses, and the arq internals it relies on.

One module says how the fleet's data is laid out in Redis (as arq's `constants.py` does
for arq), so a reader finds every name here and a change of layout is one edit. Every name
of the fleet's own starts with `buildfleet:`; arq's are copied here rather than imported
(the client must not import arq) and pinned to arq's own by a test.
"""

from __future__ import annotations

from typing import Final

PREFIX: Final = "buildfleet:"

DEFAULT_QUEUE: Final = "buildfleet:queue"
"""arq's queue: a sorted set of build ids scored by when each may run."""
EVENTS_STREAM: Final = "buildfleet:events"
"""Every build's events, capped (`queue.events_maxlen`): what `buildfleet events` tails."""
CANCEL_CHANNEL: Final = "buildfleet:cancel"
"""Pub/sub: a cancel for a running build, heard by the worker running it."""
_QUEUED: Final = "buildfleet:queued:"
DEAD_LETTER_STREAM: Final = "buildfleet:dead-letters"
"""The full requests of dead-lettered builds, for inspection and replay."""
ACTIVE_BUILDS: Final = "buildfleet:active"
"""Sorted set of the builds that have not ended, scored by submit time: what the watchdog
walks to find a build whose job was lost."""
WORKERS: Final = "buildfleet:workers"
"""Hash: each live worker's name -> its heartbeat (what `buildfleet status` reports)."""

BUILD_PREFIX: Final = "buildfleet:build:"
"""Build records: `{BUILD_PREFIX}{id}` (Lua scripts that read a build's status take it)."""
_SLOTS: Final = "buildfleet:slots:"
_WAITING: Final = "buildfleet:waiting:"
_DELIVERY: Final = "buildfleet:delivery:"
_SUPERSEDE: Final = "buildfleet:supersede:"
_PUSHES: Final = "buildfleet:pushes:"
_TENANT: Final = "buildfleet:tenant:"
_TOKEN: Final = "buildfleet:token:"  # noqa: S105 - a key prefix, not a secret
_GATEWAY: Final = "buildfleet:gateway:"
_BATCH: Final = "buildfleet:batch:"

DURATIONS_KEY: Final = "buildfleet:durations"
"""Hash: how long builds of one recipe (repository + context + Dockerfile + target) took,
smoothed over its successful builds; `rebuild` starts the longest first."""

EVENT_FIELD: Final = b"event"
"""The one field of an entry in an event stream: the encoded event."""

# --- arq's internals (pinned to arq.constants by tests/test_keys.py) -----------------------
ARQ_JOB_PREFIX: Final = "arq:job:"
"""arq:job:{id} holds a queued job's envelope."""
ARQ_IN_PROGRESS_PREFIX: Final = "arq:in-progress:"
"""arq:in-progress:{id} is a worker's claim on a job while it runs."""
ARQ_RETRY_PREFIX: Final = "arq:retry:"
ARQ_RESULT_PREFIX: Final = "arq:result:"
ARQ_HEALTH_CHECK_SUFFIX: Final = ":health-check"


def queued_channel(queue: str) -> str:
    """Pub/sub: builds were queued; the queue's idle workers poll at once instead of at
    their next poll."""
    return f"{_QUEUED}{queue}"


def build_key(build_id: str) -> str:
    """Hash: the build's request, status, attempt, result, cancel flag."""
    return f"{BUILD_PREFIX}{build_id}"


def events_key(build_id: str) -> str:
    """Stream: the build's own events, replayed by `watch`."""
    return f"{BUILD_PREFIX}{build_id}:events"


def lease_key(build_id: str) -> str:
    """Held by the worker running the build; gone means the build needs a new worker."""
    return f"{BUILD_PREFIX}{build_id}:lease"


def waiting_key(priority: str) -> str:
    """Sorted set: the builds of one priority waiting to (re)start, scored as in the queue."""
    return f"{_WAITING}{priority}"


def slot_key(daemon: str) -> str:
    """Sorted set: holders of a daemon's capacity slots, scored by expiry."""
    return f"{_SLOTS}{daemon}"


def delivery_key(forge: str, delivery_id: str) -> str:
    """The build ids one webhook delivery made, so a redelivery makes no second build."""
    return f"{_DELIVERY}{forge}:{delivery_id}"


def supersede_record_key(tenant: str, key: str) -> str:
    """The latest build of one supersede key (a repository + ref + image) of one tenant,
    which a newer build with that key replaces. A tenant never replaces another's builds."""
    return f"{_SUPERSEDE}{tenant}:{key}"


def push_history_key(forge: str, repo: str, ref: str) -> str:
    """Hash: the commits a ref's pushes built (or moved past), so a replayed or late push of
    one of them builds nothing."""
    return f"{_PUSHES}{forge}:{repo.lower()}:{ref}"


def tenant_queued_key(tenant: str) -> str:
    """Sorted set: a tenant's builds counted against its cap of queued builds."""
    return f"{_TENANT}{tenant}:queued"


def tenant_recent_key(tenant: str) -> str:
    """Sorted set: a tenant's newest builds scored by submit time (milliseconds), capped,
    so the web view lists a tenant's builds without scanning anything."""
    return f"{_TENANT}{tenant}:recent"


def token_queued_key(token: str) -> str:
    """Sorted set: an API token's builds counted against its cap of queued builds."""
    return f"{_TOKEN}{token}:queued"


def gateway_wake_key(instance: str) -> str:
    """Stream: a gateway process wakes its one event reader here when a stream starts."""
    return f"{_GATEWAY}{instance}:wake"


def batch_key(batch_id: str) -> str:
    """Hash: one batch rebuild's own fields (created, runs, the cancel flag)."""
    return f"{_BATCH}{batch_id}"


def batch_entries_key(batch_id: str) -> str:
    """Hash: a batch's entries, each the build that last ran it and the commit it built
    (what a resumed batch skips when it succeeded)."""
    return f"{_BATCH}{batch_id}:entries"


def job_key(build_id: str) -> str:
    return f"{ARQ_JOB_PREFIX}{build_id}"


def in_progress_key(build_id: str) -> str:
    return f"{ARQ_IN_PROGRESS_PREFIX}{build_id}"


def retry_key(build_id: str) -> str:
    return f"{ARQ_RETRY_PREFIX}{build_id}"
