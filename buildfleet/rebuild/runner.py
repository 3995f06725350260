"""Submitting a batch at its pace and following it to the end.

- At most `max_in_flight` of the batch's builds are queued or running at any moment: the
  next goes in only once the end of an earlier one has been seen.
- At most `rate` submissions a second (`pacing.Pacer`), in pipelined chunks.
- Each entry is recorded in the batch's record before its build is submitted, and the
  batch's cancel flag is read with it and again after the submission, so a
  `rebuild --cancel` that runs meanwhile misses no build: a chunk submitted after the
  flag was set is cancelled by the run itself.
- Ends are taken from the fleet's event stream as they happen, and, every few seconds, from
  the builds' own records (so a trimmed stream or a lost connection delays an end but
  never loses it). Read from the stream position taken before the first submission, so
  no end is missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

import msgspec
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from buildfleet.rebuild.pacing import Pacer
from buildfleet.rebuild.record import BatchRecord, EntryRecord
from producer.client import BuildfleetClient, FleetUnavailable
from producer.contract import (
    TERMINAL_STATUSES,
    BuildRequest,
    BuildResult,
    ContractError,
    result_of,
)

logger = logging.getLogger("buildfleet.rebuild")

CHUNK: Final = 500
"""Submissions per round trip at most."""
RECONCILE_S: Final = 10.0
"""How often the records of watched builds are read, in case the stream missed an end (it
was trimmed, or the connection was lost): the most an end can be seen late."""
_RETRY_S: Final = 1.0
_MAX_RETRY_S: Final = 5.0
OUTAGE_S: Final = 120.0
"""How long a run keeps submitting again while Redis cannot be reached, before it stops."""


class BatchCancelled(Exception):
    """`rebuild --cancel` was run for this batch while it was being submitted."""


@dataclass(eq=False)
class Item:
    """One entry of this run."""

    key: str
    record: EntryRecord
    recipe: str
    request: BuildRequest | None = None
    """What to submit; None for a build of an earlier run that is followed, not submitted."""
    status: str = "pending"
    result: BuildResult | None = None
    reused: bool = False
    """It succeeded, for the same commit, in an earlier run of the batch."""

    @property
    def build_id(self) -> str:
        return self.record.build_id

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL_STATUSES


@dataclass
class Follower:
    """The builds the run is waiting for, and their ends as they come."""

    fleet: BuildfleetClient
    record: BatchRecord
    on_end: Callable[[Item], None]
    after: str = "0-0"
    watched: dict[str, Item] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def in_flight(self) -> int:
        return len(self.watched)

    def watch(self, items: Sequence[Item]) -> None:
        for item in items:
            self.watched[item.build_id] = item

    def _end(self, build_id: str, result: BuildResult) -> None:
        item = self.watched.pop(build_id, None)
        if item is not None:
            item.status, item.result = result.status, result
            self.on_end(item)
            self.changed.set()

    async def _tail(self) -> None:
        after = self.after
        while True:
            try:
                async for event in self.fleet.tail(after=after):
                    result = result_of(event)
                    if result is not None:
                        self._end(event.build_id, result)
            except (FleetUnavailable, ContractError) as exc:  # gone, or an unreadable entry
                logger.warning("event stream lost (%s); reading build records meanwhile", exc)
                await asyncio.sleep(_RETRY_S)
                with contextlib.suppress(FleetUnavailable, RedisError):
                    after = await self.fleet.last_event_id()
                    await self.reconcile()  # ends published while the stream was away

    async def reconcile(self) -> None:
        """Read the records of the builds still watched; take the ends found there."""
        ids = list(self.watched)
        if not ids:
            return
        for build_id, state in (await self.record.statuses(ids)).items():
            if state.status in TERMINAL_STATUSES:
                result = state.result or BuildResult(build_id=build_id, status=state.status)
                self._end(build_id, result)
            elif build_id in self.watched:
                self.watched[build_id].status = state.status

    async def _reconcile_forever(self) -> None:
        while True:
            await asyncio.sleep(RECONCILE_S)
            try:
                await self.reconcile()
            except RedisError as exc:
                logger.warning("cannot read build records (%s); retrying", exc)

    async def drop_missing(self) -> None:
        """Stop waiting for builds that have no record: recorded by a run that was
        interrupted before it submitted them (or long expired)."""
        ids = list(self.watched)
        found = await self.record.statuses(ids) if ids else {}
        for build_id in ids:
            if build_id not in found:
                self.watched.pop(build_id).status = "not_submitted"
        self.changed.set()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Follower]:
        tasks = [asyncio.create_task(self._tail()), asyncio.create_task(self._reconcile_forever())]
        try:
            yield self
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def wait(self, at_most_s: float | None) -> None:
        """Until a watched build ends (or `at_most_s` passes); the caller clears `changed`
        before it looks at what is in flight, so an end in between is not missed."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(at_most_s):
                await self.changed.wait()

    async def until_all_ended(self) -> None:
        while self.watched:
            self.changed.clear()
            await self.wait(None)


@dataclass
class Submitter:
    fleet: BuildfleetClient
    record: BatchRecord
    follower: Follower | None
    rate: float | None
    max_in_flight: int | None
    on_submitted: Callable[[Sequence[Item]], None]
    batch_labels: dict[str, str] = field(default_factory=dict)
    on_outage: Callable[[str], None] = lambda _message: None
    outage_s: float = OUTAGE_S

    def _room(self, pending: int) -> int:
        if self.max_in_flight is None or self.follower is None:
            return pending
        return self.max_in_flight - self.follower.in_flight

    async def submit(self, items: Sequence[Item]) -> None:
        """Every item, in order, at the pace and under the cap; raises BatchCancelled."""
        pacer = Pacer(self.rate, time.monotonic())
        position = 0
        while position < len(items):
            if self.follower is not None:
                self.follower.changed.clear()
            now = time.monotonic()
            room = self._room(len(items) - position)
            count = min(room, pacer.allowance(now), CHUNK, len(items) - position)
            if count <= 0:
                assert self.follower is not None or room > 0
                timeout = pacer.wait_s(now) if room > 0 else None
                if self.follower is not None:
                    await self.follower.wait(timeout)
                else:
                    await asyncio.sleep(timeout or 0)
                continue
            chunk = items[position : position + count]
            await self._submit_through_outages(chunk)
            pacer.took(count, now)
            position += count

    async def _submit_through_outages(self, chunk: Sequence[Item]) -> None:
        """The chunk, again while Redis cannot be reached, for up to `outage_s`: submitting
        is idempotent (the same build ids), so a chunk whose answer was lost is not doubled."""
        deadline = time.monotonic() + self.outage_s
        pause = _RETRY_S / 4
        while True:
            try:
                await self._submit_chunk(chunk)
                return
            except (FleetUnavailable, RedisConnectionError, RedisTimeoutError) as exc:
                if time.monotonic() + pause > deadline:
                    raise FleetUnavailable(f"Redis unreachable for {self.outage_s:.0f} s") from exc
                self.on_outage(f"Redis unreachable ({exc}); submitting again in {pause:.1f} s")
                await asyncio.sleep(pause)
                pause = min(pause * 2, _MAX_RETRY_S)

    async def _submit_chunk(self, chunk: Sequence[Item]) -> None:
        if await self.record.remember((item.key, item.record) for item in chunk):
            raise BatchCancelled
        requests = []
        for item in chunk:
            assert item.request is not None
            labels = {**item.request.labels, **self.batch_labels}
            requests.append(msgspec.structs.replace(item.request, id=item.build_id, labels=labels))
        if self.follower is not None:
            self.follower.watch(chunk)
        await self.fleet.submit_many(requests)
        for item in chunk:
            item.status = "queued"
        self.on_submitted(chunk)
        if await self.record.cancelled():
            reason = f"batch {self.record.batch_id} cancelled"
            await self.fleet.store.cancel_many([(item.build_id, reason) for item in chunk])
            raise BatchCancelled
