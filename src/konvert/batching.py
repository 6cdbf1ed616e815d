"""Group commit: concurrent writes share one transaction, and so one durable commit.

A PostgreSQL commit waits for its WAL flush; one commit per request caps a service at the
disk's flush rate. Here, requests that arrive while a batch is being written queue up and go
into the next batch together (natural batching: no timer, no added latency when idle). Every
request still gets its own outcome:

- work that refuses a request *without* a database error (a KonvertError raised before it
  writes, such as an idempotency conflict) fails that request only; its neighbours commit;
- a database error aborts the shared transaction, so the batch is rolled back and each request
  is retried alone in a transaction of its own: one bad request never fails its neighbours;
- a request's future is resolved only after the commit: a 2xx means committed.

A batch is written in one of two ways. By default every item is written with ``write`` in one
shared transaction. A ``write_batch`` instead writes and commits the whole batch itself (for
purchases: one read, then one self-committing statement, no BEGIN/COMMIT round trips; see
konvert.earning.service) and hands back each item's outcome; it must not raise for a single
item, and if it raises anyway its items are written one by one like a failed shared batch.

Items are written in a stable order (``sort_key``) so that concurrent batches, in this process
or another, take row locks in the same order and cannot deadlock each other.

A batch starts as soon as one is asked for while none is in flight. While one is, the queue
grows into the next batch until the one in flight finishes, or until it has been in flight for
``overlap_after_seconds``, or until it holds a full batch (then another starts beside it, up
to ``batches_in_flight_max``): a larger batch costs less per item, and a batch waiting on a lock
does not hold everything up.

Reads batch the same way (``BatchedLookups``): concurrent lookups by key share one query.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

import asyncpg

from konvert.errors import KonvertError

log = logging.getLogger("konvert.batching")


Item = TypeVar("Item")
Result = TypeVar("Result")
Key = TypeVar("Key", bound=Hashable)
Value = TypeVar("Value")

WriteOne = Callable[[asyncpg.Connection, Item], Awaitable[Result]]
# Writes and commits a whole batch itself; returns per item its result or its error.
WriteBatch = Callable[[list[Item]], Awaitable[list[Result | BaseException]]]
# Runs once per batch with the results that committed (cache invalidations, say).
AfterCommit = Callable[[list[Result]], Awaitable[None]]


class GroupCommit(Generic[Item, Result]):
    def __init__(
        self,
        pool: asyncpg.Pool,
        write: WriteOne[Item, Result],
        after_commit: AfterCommit[Result],
        sort_key: Callable[[Item], Hashable],
        *,
        batch_size_max: int,
        batches_in_flight_max: int,
        overlap_after_seconds: float = 0.0,
        write_batch: WriteBatch[Item, Result] | None = None,
    ) -> None:
        self._pool = pool
        self._write = write
        self._write_batch = write_batch
        self._after_commit = after_commit
        self._sort_key = sort_key
        self._batch_size_max = batch_size_max
        self._slots = asyncio.Semaphore(batches_in_flight_max)
        self._overlap_after_seconds = overlap_after_seconds
        self._last_started = 0.0  # loop time at which the latest batch started
        self._queue: list[tuple[Item, asyncio.Future[Result]]] = []
        self._pending = asyncio.Event()
        self._flushes: set[asyncio.Task[None]] = set()
        self._dispatcher: asyncio.Task[None] | None = None
        self.batches_written = 0
        self.items_written = 0

    def start(self) -> None:
        self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch())

    async def stop(self) -> None:
        """Write what is queued, wait for batches in flight, then stop."""
        if self._dispatcher is not None:
            while self._queue or self._flushes:
                await asyncio.sleep(0.01)
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
            self._dispatcher = None

    async def submit(self, item: Item) -> Result:
        if self._dispatcher is None:
            raise RuntimeError("GroupCommit.start() was not called")
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._pending.set()
        # The write goes on even if this request is cancelled (its client went away): the
        # outcome is stored and a retry will replay it.
        return await asyncio.shield(future)

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
            try:
                outcomes = await self._write_together(batch)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
                log.warning(
                    "batch failed; writing its items one by one",
                    extra={"size": len(batch), "error": repr(exc)},
                )
                outcomes = [await self._write_alone(item) for item, _ in batch]
            # One after-commit step for the batch (its cache invalidations in one round trip): a
            # slow Redis costs the batch one timeout, not one per item.
            committed = [outcome for outcome in outcomes if not isinstance(outcome, BaseException)]
            if committed:
                await self._after_commit_safely(committed)
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    _settle(future, error=outcome)
                else:
                    _settle(future, result=outcome)
            self.batches_written += 1
            self.items_written += len(batch)
        except BaseException as exc:  # never leave a request waiting forever
            for _, future in batch:
                _settle(future, error=exc)
            raise
        finally:
            self._slots.release()

    async def _write_together(
        self, batch: list[tuple[Item, asyncio.Future[Result]]]
    ) -> list[Result | BaseException]:
        if self._write_batch is not None:
            return await self._write_batch([item for item, _ in batch])
        outcomes: list[Result | BaseException] = []
        async with self._pool.acquire() as conn, conn.transaction():
            for item, _ in batch:
                try:
                    outcomes.append(await self._write(conn, item))
                except KonvertError as refused:
                    outcomes.append(refused)
        return outcomes

    async def _write_alone(self, item: Item) -> Result | BaseException:
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                return await self._write(conn, item)
        except Exception as exc:  # noqa: BLE001 - handed to this item's request, which maps it
            return exc

    async def _after_commit_safely(self, committed: list[Result]) -> None:
        try:
            await self._after_commit(committed)
        except Exception:  # the write is committed; a cache hiccup must not turn it into an error
            log.exception("after-commit step failed")


class BatchedLookups(Generic[Key, Value]):
    """Concurrent lookups by key share one query: a PostgreSQL round trip, statement and
    wake-up for many requests instead of one each.

    Natural batching, as for writes: a key asked for is looked up when the current turn of the
    event loop ends, together with every other key asked for in that turn; while
    ``batches_in_flight_max`` lookups are in flight, keys wait and go in the next one together.
    No timer, so an idle service adds no latency. A lookup starts only after its keys were asked
    for, so it sees every write committed before the request asked (read your writes); a key
    asked for again while its lookup is in flight is looked up again.

    ``look_up_many`` returns the values it found by key (a key it did not find gets None). When
    it fails, every request in the lookup gets its error (a timeout or a lost connection is the
    whole lookup's), except for a value PostgreSQL refuses (``asyncpg.DataError``), which one key
    may have brought: then the keys are looked up alone with ``look_up_one``, one after another
    in the lookup's slot, so that each request gets its own outcome.
    """

    def __init__(
        self,
        look_up_many: Callable[[list[Key]], Awaitable[dict[Key, Value]]],
        look_up_one: Callable[[Key], Awaitable[Value | None]],
        *,
        batch_size_max: int,
        batches_in_flight_max: int,
    ) -> None:
        self._look_up_many = look_up_many
        self._look_up_one = look_up_one
        self._batch_size_max = batch_size_max
        self._batches_in_flight_max = batches_in_flight_max
        self._asked: dict[Key, asyncio.Future[Value | None]] = {}
        self._starting = False
        self._in_flight: set[asyncio.Task[None]] = set()
        self.batches = 0
        self.keys_looked_up = 0

    async def get(self, key: Key) -> Value | None:
        future = self._asked.get(key)
        if future is None:
            loop = asyncio.get_running_loop()
            future = self._asked[key] = loop.create_future()
            if not self._starting:
                self._starting = True
                loop.call_soon(self._start)
        # Shielded: a request that goes away must not cancel the answer others wait for too.
        return await asyncio.shield(future)

    async def wait_idle(self) -> None:
        """Until every lookup asked for so far has been answered."""
        while self._asked or self._in_flight:
            await asyncio.sleep(0.005)

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

    async def _look_up(self, batch: dict[Key, asyncio.Future[Value | None]]) -> None:
        try:
            try:
                found = await self._look_up_many(list(batch))
            except asyncpg.DataError as exc:
                if len(batch) == 1:
                    raise
                log.warning(
                    "batched lookup refused a value; looking its keys up one by one",
                    extra={"error": repr(exc)},
                )
                for key, future in batch.items():
                    try:
                        _settle(future, result=await self._look_up_one(key))
                    except Exception as alone:  # noqa: BLE001 - this key's own outcome
                        _settle(future, error=alone)
            else:
                for key, future in batch.items():
                    _settle(future, result=found.get(key))
            self.batches += 1
            self.keys_looked_up += len(batch)
        except BaseException as exc:  # never leave a request waiting forever
            for future in batch.values():
                _settle(future, error=exc)
            if not isinstance(exc, Exception):
                raise


def _settle(
    future: asyncio.Future[Result], *, result: Result | None = None, error: BaseException | None = None
) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]
