"""One Redis reader for every event stream the gateway serves (Server-Sent Events).

    subscription = await hub.subscribe(build_id, after="0-0")
    while (entry := await subscription.next()) is not None: ...
    subscription.close()

Invariants:
- One blocking XREAD, on one connection, serves every open stream: it reads each watched
  build's own stream from the oldest position among that build's subscribers and hands each
  subscriber the entries past its own position. A subscriber sees every entry of its build
  once, in order, up to and including the terminal one, then None.
- A subscriber that joins behind the others makes the next read start at its position; the
  others skip what they have seen. A new subscription wakes the reader through a stream of
  its own (`buildfleet:gateway:{instance}:wake`), so it never waits for the block to time out.
- A subscriber whose buffer fills (a client that stops reading) is dropped with Overflow;
  it never slows the reader or the others. Redis failing ends every subscription with
  FleetUnavailable; the next subscription starts the reader again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Final

import msgspec
from redis.asyncio import Redis
from redis.typing import KeyT, StreamIdT

from producer.contract import TERMINAL_STATUSES, event_kind
from producer.errors import FleetUnavailable, unavailable
from producer.keys import EVENT_FIELD, events_key, gateway_wake_key

log = logging.getLogger("buildfleet.gateway")

StreamId = tuple[int, int]
BLOCK_MS: Final = 10_000
READ_COUNT: Final = 500
BUFFER: Final = 10_000
_WAKE_TTL_MS: Final = 3_600_000


def parse_id(text: str) -> StreamId:
    milliseconds, _, sequence = text.partition("-")
    return int(milliseconds), int(sequence or 0)


def format_id(stream_id: StreamId) -> str:
    return f"{stream_id[0]}-{stream_id[1]}"


class Overflow(Exception):
    """The subscriber fell too far behind; it may resume from its last entry."""


@dataclass(frozen=True, slots=True)
class Entry:
    id: str
    kind: str
    """The event's type (`queued`, `log`, ...), or '' if it could not be read."""
    data: bytes


class Subscription:
    def __init__(self, hub: EventHub, build_id: str, after: StreamId, buffer: int) -> None:
        self.build_id = build_id
        self.last = after
        self._hub = hub
        self._buffer = buffer
        self._items: deque[Entry] = deque()
        self._ready = asyncio.Event()
        self._ended = False
        self._failure: BaseException | None = None

    async def next(self) -> Entry | None:
        """The next entry; None once the terminal entry has been given (or the hub closed);
        FleetUnavailable or Overflow when the stream cannot go on."""
        while True:
            if self._items:
                return self._items.popleft()
            if self._ended:
                if self._failure is not None:
                    raise self._failure
                return None
            self._ready.clear()
            await self._ready.wait()

    def close(self) -> None:
        self._hub._unsubscribe(self)

    def _offer(self, entry: Entry, entry_id: StreamId) -> None:
        if len(self._items) >= self._buffer:
            self._end(Overflow(f"more than {self._buffer} events waiting"))
            return
        self._items.append(entry)
        self.last = entry_id
        self._ready.set()

    def _end(self, failure: BaseException | None = None) -> None:
        if not self._ended:
            self._ended, self._failure = True, failure
            self._ready.set()


@dataclass(slots=True)
class _Watch:
    subscribers: set[Subscription] = field(default_factory=set)

    @property
    def start(self) -> StreamId:
        return min(s.last for s in self.subscribers)


class EventHub:
    def __init__(
        self,
        redis: Redis,
        instance: str,
        *,
        block_ms: int = BLOCK_MS,
        buffer: int = BUFFER,
    ) -> None:
        self.redis = redis
        self.block_ms = block_ms
        self.buffer = buffer
        self._wake_key = gateway_wake_key(instance)
        self._wake_cursor = "0-0"
        self._watches: dict[str, _Watch] = {}
        self._reader: asyncio.Task[None] | None = None

    @property
    def watched(self) -> int:
        return len(self._watches)

    async def subscribe(self, build_id: str, after: str = "0-0") -> Subscription:
        """Follow `build_id`'s events from just after `after`."""
        subscription = Subscription(self, build_id, parse_id(after), self.buffer)
        self._watches.setdefault(build_id, _Watch()).subscribers.add(subscription)
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read(), name="buildfleet-event-hub")
        else:
            try:
                await self._wake()
            except BaseException:
                subscription.close()
                raise
        return subscription

    async def aclose(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
        for watch in self._watches.values():
            for subscription in watch.subscribers:
                subscription._end()
        self._watches.clear()
        with contextlib.suppress(Exception):
            await self.redis.delete(self._wake_key)

    def _unsubscribe(self, subscription: Subscription) -> None:
        subscription._end()
        watch = self._watches.get(subscription.build_id)
        if watch is not None:
            watch.subscribers.discard(subscription)
            if not watch.subscribers:
                del self._watches[subscription.build_id]

    async def _wake(self) -> None:
        with unavailable("watch builds"):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xadd(self._wake_key, {"w": "1"}, maxlen=1, approximate=False)
                pipe.pexpire(self._wake_key, _WAKE_TTL_MS)
                await pipe.execute()

    async def _read(self) -> None:
        try:
            while self._watches:
                starts = {build_id: w.start for build_id, w in self._watches.items()}
                streams: dict[KeyT, StreamIdT] = {
                    events_key(b): format_id(s) for b, s in starts.items()
                }
                streams[self._wake_key] = self._wake_cursor
                with unavailable("watch builds"):
                    reply = await self.redis.xread(streams, block=self.block_ms, count=READ_COUNT)
                for key, entries in reply:
                    self._dispatch(key.decode(), entries, starts)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not isinstance(exc, FleetUnavailable):
                log.exception("the event reader failed")
            for watch in list(self._watches.values()):
                for subscription in list(watch.subscribers):
                    subscription._end(exc)
            self._watches.clear()

    def _dispatch(
        self, key: str, entries: list[tuple[bytes, dict[bytes, bytes]]], starts: dict[str, StreamId]
    ) -> None:
        if key == self._wake_key:
            self._wake_cursor = entries[-1][0].decode()
            return
        build_id = _build_id_of(key)
        watch, start = self._watches.get(build_id), starts.get(build_id)
        if watch is None or start is None:
            return  # everyone left meanwhile
        for raw_id, fields in entries:
            entry_id = parse_id(raw_id.decode())
            data = fields.get(EVENT_FIELD, b"")
            kind = _kind(data)
            entry = Entry(raw_id.decode(), kind, data)
            for subscription in list(watch.subscribers):
                # This read covers a subscriber only from where it started.
                if start <= subscription.last < entry_id:
                    subscription._offer(entry, entry_id)
                    if subscription._ended:
                        watch.subscribers.discard(subscription)
                    elif kind in TERMINAL_STATUSES:
                        subscription._end()
                        watch.subscribers.discard(subscription)
        if not watch.subscribers:
            self._watches.pop(build_id, None)


_EVENTS_PREFIX: Final = events_key("")


def _build_id_of(key: str) -> str:
    """The build id in `events_key(build_id)`."""
    head, _, tail = _EVENTS_PREFIX.partition(":events")
    return key.removeprefix(head).removesuffix(":events" + tail)


def _kind(data: bytes) -> str:
    try:
        return event_kind(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ""
