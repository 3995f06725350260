"""One batching primitive: calls made close together share one round trip.

    submits = Coalescer(submit_batch)              # a batch per event-loop turn
    claims = Coalescer(claim_batch, max_batch=16)  # ... of at most 16 calls
    publishes = Coalescer(publish_batch, serial=True)
    result = await submits(request)                # or submits.enqueue(request): a Future

Under load a producer's cost per request is mostly Redis round trips; running the calls
that arrive together as one pipeline is what makes the gateway and the workers scale.

Two ways to batch, the only difference being when a batch goes out:
- default: every call made during one event-loop turn forms a batch, and a batch starts
  at once, even while earlier ones are still under way (lowest latency); with `max_batch`,
  a batch that reaches that size starts without waiting for the turn to end, so that the
  calls that arrive together go in several batches, answered one after another;
- `serial=True`: one batch at a time; calls made while one is under way go together in the
  next, in order (what an ordered event log needs: a later batch never overtakes).

`run` gets the inputs in call order and returns one output, or exception, per input; an
exception it raises fails every call of its batch. A caller that stops waiting (cancelled)
does not stop its batch; cancelling the batch itself cancels its callers' futures.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Generic, TypeVar

_In = TypeVar("_In")
_Out = TypeVar("_Out")

BatchRunner = Callable[[list[_In]], Awaitable[Sequence[_Out | Exception]]]


class Coalescer(Generic[_In, _Out]):
    def __init__(
        self, run: BatchRunner[_In, _Out], *, serial: bool = False, max_batch: int = 0
    ) -> None:
        if serial and max_batch:
            raise ValueError("max_batch bounds concurrent batches; serial ones take what waits")
        self._run = run
        self._serial = serial
        self._max_batch = max_batch
        self._pending: list[tuple[_In, asyncio.Future[_Out]]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._scheduled = False

    async def __call__(self, item: _In) -> _Out:
        return await self.enqueue(item)

    def enqueue(self, item: _In) -> asyncio.Future[_Out]:
        """Queue `item` for the next batch; the future holds its output. A caller that does
        not await it should add a done callback that reads its exception."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_Out] = loop.create_future()
        self._pending.append((item, future))
        if len(self._pending) == self._max_batch:
            batch, self._pending = self._pending, []
            self._spawn(self._execute(batch))
        elif not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._start)
        return future

    def _start(self) -> None:
        if self._serial:
            self._spawn(self._drain())
            return
        self._scheduled = False
        batch, self._pending = self._pending, []
        if batch:  # else a full batch took them all
            self._spawn(self._execute(batch))

    def _spawn(self, work: Coroutine[None, None, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                await self._execute(batch)
        except asyncio.CancelledError:
            left, self._pending = self._pending, []
            for _, future in left:
                future.cancel()
            raise
        finally:
            self._scheduled = False

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
