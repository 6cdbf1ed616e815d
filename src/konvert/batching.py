"""Natural batching: concurrent requests share one database (or Redis) round trip.

``GroupCommit`` is for writes. A PostgreSQL commit waits for its WAL flush; one commit per
request caps a service at the disk's flush rate. Requests that arrive while a batch is being
written queue up and go into the next batch together (no timer, no added latency when idle).
The batch's ``write`` owns its transaction and returns every item's own outcome:

- a refusal that needs no rollback (an idempotency conflict) fails that item only;
- if ``write`` raises (a database error aborted the transaction), every item of the batch is
  written alone, each in a transaction of its own, so that one bad request never fails its
  neighbours; an item that meets a concurrent write (``errors.ConcurrentWrite``) is tried once more;
- an item's request gets its outcome only after ``write`` returned, that is after the commit:
  a 2xx means committed.

Items are written in a stable order (``sort_key``) so that concurrent batches, in this process
or another, take row locks in the same order. A batch starts as soon as one is asked for while
none is in flight. While one is, the queue grows into the next batch until the one in flight
finishes, or has been in flight for ``overlap_after_seconds``, or a full batch is waiting (then
another starts beside it, up to ``batches_in_flight_max``): a larger batch costs less per item,
and a batch waiting on a lock does not hold everything up.

``BatchedLookups`` is for reads: concurrent lookups by key share one query.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

from konvert import errors
from konvert.observability import BATCHED_WRITES, ThrottledLog

log = logging.getLogger("konvert.batching")
failed_log = ThrottledLog(log)

Item = TypeVar("Item")
Result = TypeVar("Result")
Key = TypeVar("Key", bound=Hashable)
Value = TypeVar("Value")

# Writes a batch in one transaction of its own; returns per item its result or its refusal.
WriteBatch = Callable[[list[Item]], Awaitable[list[Result | errors.KonvertError]]]


class GroupCommit(Generic[Item, Result]):
    def __init__(
        self,
        write: WriteBatch[Item, Result],
        sort_key: Callable[[Item], Any],
        *,
        batch_size_max: int,
        batches_in_flight_max: int,
        overlap_after_seconds: float = 0.0,
    ) -> None:
        self._write = write
        self._sort_key = sort_key
        self._batch_size_max = batch_size_max
        self._slots = asyncio.Semaphore(batches_in_flight_max)
        self._overlap_after_seconds = overlap_after_seconds
        self._last_started = 0.0  # loop time at which the latest batch started
        self._queue: list[tuple[Item, asyncio.Future[Result]]] = []
        self._pending = asyncio.Event()
        self._flushes: set[asyncio.Task[None]] = set()
        self._dispatcher: asyncio.Task[None] | None = None

    async def submit(self, item: Item) -> Result:
        """The item's outcome once its batch committed (or its refusal, raised)."""
        if self._dispatcher is None:
            self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch())
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._pending.set()
        # If this request is cancelled (its client went away), so is its future, and nothing
        # else: the write goes on, its outcome is stored, and a retry will replay it.
        return await future

    async def aclose(self) -> None:
        """Write what is queued, wait for the batches in flight, then stop."""
        if self._dispatcher is None:
            return
        while self._queue or self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)
            await asyncio.sleep(0)  # let the dispatcher take what is queued
        self._dispatcher.cancel()
        await asyncio.gather(self._dispatcher, return_exceptions=True)
        self._dispatcher = None

    async def _dispatch(self) -> None:
        while True:
            await self._pending.wait()
            self._pending.clear()
            while self._queue:
                await self._slots.acquire()
                await self._let_the_batch_grow()
                self._last_started = asyncio.get_running_loop().time()
                batch = self._queue[: self._batch_size_max]
                del self._queue[: len(batch)]
                task = asyncio.create_task(self._flush(batch))
                self._flushes.add(task)
                task.add_done_callback(self._flushes.discard)

    async def _let_the_batch_grow(self) -> None:
        """Until no batch is in flight, the latest has been for ``overlap_after_seconds``, or the
        queue holds a full batch already (it cannot grow any larger)."""
        while self._flushes and len(self._queue) < self._batch_size_max:
            wait = self._last_started + self._overlap_after_seconds - asyncio.get_running_loop().time()
            if wait <= 0:
                return
            await asyncio.wait(set(self._flushes), timeout=wait, return_when=asyncio.FIRST_COMPLETED)

    async def _flush(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        try:
            batch.sort(key=lambda entry: self._sort_key(entry[0]))
            items = [item for item, _ in batch]
            outcomes: list[Result | BaseException]
            try:
                outcomes = list(await self._write(items))
                BATCHED_WRITES.labels("together").inc(len(items))
            except Exception as exc:  # noqa: BLE001 - the batch is rolled back; each item goes alone
                # (At most a line per kind of failure every few seconds: with the database down,
                # every batch fails alike.)
                failed_log.warning(
                    "batch failed; writing its items one by one", type(exc).__name__, size=len(batch), error=repr(exc)
                )
                outcomes = [await self._write_alone(item) for item in items]
                BATCHED_WRITES.labels("alone").inc(len(items))
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    _settle(future, error=outcome)
                else:
                    _settle(future, result=outcome)
        except BaseException as exc:  # never leave a request waiting forever
            for _, future in batch:
                _settle(future, error=exc)
            raise
        finally:
            self._slots.release()

    async def _write_alone(self, item: Item) -> Result | BaseException:
        for attempt in range(2):
            try:
                (outcome,) = await self._write([item])
                return outcome
            except errors.ConcurrentWrite as exc:
                if attempt:
                    return exc
            except Exception as exc:  # noqa: BLE001 - handed to this item's request, which maps it
                return exc
        raise AssertionError("unreachable")  # pragma: no cover


class BatchedLookups(Generic[Key, Value]):
    """Concurrent lookups by key share one query: a round trip, statement and wake-up of the
    server for many requests instead of one each.

    A key asked for is looked up when the current turn of the event loop ends, together with
    every other key asked for in that turn; while ``batches_in_flight_max`` lookups are in flight,
    keys wait and go in the next one together. No timer, so an idle service adds no latency. A
    lookup starts only after its keys were asked for, so it sees every write committed before the
    request asked (read your writes); a key asked for again while its lookup is in flight is
    looked up again.

    ``look_up_many`` returns the values it found by key (a key it did not find gets None). When it
    fails, every request in the lookup gets its error (a timeout or a lost connection is the whole
    lookup's), except for an error of a kind in ``alone_on``, which one key may have brought (a
    value PostgreSQL refuses): then the keys are looked up alone with ``look_up_one``, one after
    another, so that each request gets its own outcome.
    """

    def __init__(
        self,
        look_up_many: Callable[[list[Key]], Awaitable[dict[Key, Value]]],
        *,
        batch_size_max: int,
        batches_in_flight_max: int,
        look_up_one: Callable[[Key], Awaitable[Value | None]] | None = None,
        alone_on: tuple[type[Exception], ...] = (),
    ) -> None:
        self._look_up_many = look_up_many
        self._look_up_one = look_up_one
        self._alone_on = alone_on
        self._batch_size_max = batch_size_max
        self._batches_in_flight_max = batches_in_flight_max
        # The requests waiting for each key, one future each: a request that goes away cancels
        # its own future only, never the answer the others wait for.
        self._asked: dict[Key, list[asyncio.Future[Value | None]]] = {}
        self._starting = False
        self._in_flight: set[asyncio.Task[None]] = set()
        # Lookups made, and keys they looked up: their ratio is how many requests share one.
        self.batches = 0
        self.keys_looked_up = 0

    async def get(self, key: Key) -> Value | None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Value | None] = loop.create_future()
        waiting = self._asked.get(key)
        if waiting is None:
            self._asked[key] = [future]
            if not self._starting:
                self._starting = True
                loop.call_soon(self._start)
        else:
            waiting.append(future)
        return await future

    async def aclose(self) -> None:
        """Until every lookup asked for so far has been answered."""
        while self._asked or self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)
            await asyncio.sleep(0)

    def _start(self) -> None:
        self._starting = False
        loop = asyncio.get_running_loop()
        while self._asked and len(self._in_flight) < self._batches_in_flight_max:
            keys = list(itertools.islice(self._asked, self._batch_size_max))
            batch = {key: self._asked.pop(key) for key in keys}
            task = loop.create_task(self._look_up(batch))
            self._in_flight.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        if self._asked and not self._starting:
            self._start()  # the keys that waited for a free slot

    async def _look_up(self, batch: dict[Key, list[asyncio.Future[Value | None]]]) -> None:
        try:
            try:
                found = await self._look_up_many(list(batch))
            except self._alone_on as exc:
                if len(batch) == 1 or self._look_up_one is None:
                    raise
                log.warning(
                    "batched lookup refused a value; looking its keys up one by one", extra={"error": repr(exc)}
                )
                for key, futures in batch.items():
                    try:
                        _settle_all(futures, result=await self._look_up_one(key))
                    except Exception as alone:  # noqa: BLE001 - this key's own outcome
                        _settle_all(futures, error=alone)
            else:
                for key, futures in batch.items():
                    _settle_all(futures, result=found.get(key))
            self.batches += 1
            self.keys_looked_up += len(batch)
        except BaseException as exc:  # never leave a request waiting forever
            for futures in batch.values():
                _settle_all(futures, error=exc)
            if not isinstance(exc, Exception):
                raise


def _settle_all(
    futures: list[asyncio.Future[Result]], *, result: Result | None = None, error: BaseException | None = None
) -> None:
    for future in futures:
        _settle(future, result=result, error=error)


def _settle(
    future: asyncio.Future[Result], *, result: Result | None = None, error: BaseException | None = None
) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]
