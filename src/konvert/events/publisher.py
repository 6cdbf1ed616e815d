"""Publishing the outbox: to the Redis Stream, and to webhook endpoints, signed.

Four independent steps, each in bounded batches, so that one cannot hold up another:

* **sequencer**: committed events are numbered (``position``) without a gap, each member's in
  their order (konvert.events.store); the steps below and the feed read positions.
* **stream**: the next events after the 'stream' cursor are added to the Redis Stream (``XADD
  MAXLEN ~``, one pipeline) and the cursor moves past them in the same transaction; if Redis
  fails, the cursor stays and the batch is sent again (at least once).
* **fan-out**: the next events after the 'webhooks' cursor become one message per enabled
  endpoint that wants their type, in one statement.
* **delivery**: due messages are leased (``for update skip locked``; per member only the earliest
  pending one is due, the later ones wait until it is finished) and posted, each in a task of
  its own, at most ``webhook_concurrency_per_endpoint`` per endpoint and process: a slow or dead
  endpoint fills its own slots, never another's. The outcomes are written in one statement per
  round, then each member's next message is made due. One aiohttp session per process keeps its
  connections alive between messages; its resolver refuses non-public addresses
  (konvert.events.destinations) unless they are allowed.

A publishing step holds its cursor's row lock while it works, so processes running it at once
take turns (the others pass it over) and never send a batch twice at the same time. Nothing here
runs in a request's transaction: publishing never delays the ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import aiohttp
import asyncpg
import msgspec

from konvert.events import destinations, rules, store
from konvert.events.model import EncodedEnvelope
from konvert.ledger import events
from konvert.ledger.book import writing
from konvert.observability import ThrottledLog
from konvert.problems import unreachable_kind
from konvert.vault import Vault

if TYPE_CHECKING:
    from konvert.services import Services

log = logging.getLogger("konvert.events")
unavailable_log = ThrottledLog(log)

_encode = msgspec.json.Encoder().encode
# An attempt's lease lasts its timeout and this much more before another process may retry it.
_LEASE_MARGIN_SECONDS = 30.0
# A process leases up to this many times an endpoint's concurrency at once: the messages beyond
# it wait for a slot in the process (leased longer for it), so that a round of leasing serves
# many attempts rather than the one whose slot just came free.
_LEASED_PER_SLOT = 4
# How long a stopping process waits for its attempts in flight.
_CLOSE_WAIT_SECONDS = 3.0
# Outcomes that wake the publisher for a round (fewer wait for the poll interval or for leases to
# run low, whichever comes first).
_OUTCOMES_PER_ROUND = 32
# How often a process looks for messages left waiting by a process that died (the first round
# looks at once).
_SWEEP_SECONDS = 60.0
# What an endpoint's answer may hold before konvert stops reading it.
_ANSWER_BYTES_MAX = 64 * 1024
# The longest error text kept with a message.
_ERROR_CHARS_MAX = 500


def envelope_json(row: asyncpg.Record) -> bytes:
    """An outbox row (konvert.events.store) as the JSON it is sent as."""
    return _encode(
        EncodedEnvelope(
            id=rules.event_id_text(row["event_id"]),
            type=row["type"],
            occurred_at=row["occurred_at"],
            member_id=row["member_id"],
            sequence=row["sequence"],
            data=msgspec.Raw(row["data"].encode()),
        )
    )


async def sequence(services: Services, look_first: bool = True, past_member_uid: int = 0) -> store.Sequenced:
    """Number the next batch of committed events, from the members past ``past_member_uid`` on
    (none numbered: none was there, or another process is at it). ``look_first``: see whether
    there are any without a lock first."""
    none = store.Sequenced(0, past_member_uid)
    if look_first and not await store.has_work(services.pool, "sequencer"):
        return none
    try:
        async with services.pool.acquire() as conn, conn.transaction():
            head = await store.lock_cursor(conn, "sequencer")
            if head is None:
                return none
            return await store.sequence_events(conn, head, services.settings.events_batch_size, past_member_uid)
    except store.NumberedMeanwhile as exc:  # rolled back; the next batch starts from what committed
        log.warning("numbering events starts over", extra={"reason": str(exc)})
        return none


async def publish_stream(services: Services, look_first: bool = True) -> int:
    """Add the next batch of events to the Redis Stream; returns how many (0: none, or another
    process is at it). ``look_first``: see whether there are any without a lock first."""
    settings = services.settings
    if look_first and not await store.has_work(services.pool, "stream"):
        return 0
    async with services.pool.acquire() as conn, conn.transaction():
        after = await store.lock_cursor(conn, "stream")
        if after is None:
            return 0
        rows = await store.select_events_after(conn, after, settings.events_batch_size)
        if not rows:
            return 0
        async with services.redis.pipeline(transaction=False) as pipe:
            for row in rows:
                fields = {"id": rules.event_id_text(row["event_id"]), "type": row["type"], "event": envelope_json(row)}
                pipe.xadd(settings.events_stream_key, fields, maxlen=settings.events_stream_maxlen, approximate=True)  # type: ignore[arg-type]
            await pipe.execute()
        await store.move_cursor(conn, "stream", rows[-1]["position"])
    return len(rows)


async def fan_out(services: Services, look_first: bool = True) -> int:
    """Turn the next batch of events into webhook messages; returns how many events."""
    if look_first and not await store.has_work(services.pool, "webhooks"):
        return 0
    async with services.pool.acquire() as conn, conn.transaction():
        after = await store.lock_cursor(conn, "webhooks")
        if after is None:
            return 0
        done = await store.fan_out(conn, after, services.settings.events_batch_size, services.clock())
    # After the commit: an outcome finishing a member's message at the same time may not have
    # seen the waiting ones (store.make_next_due).
    await store.make_next_due(services.pool, done.waiting, services.clock())
    return done.events


class Publisher:
    """This process's webhook deliveries in flight, and the outcomes not yet written."""

    def __init__(self, services: Services) -> None:
        self._services = services
        # One HTTP client per process, made on first use (it belongs to the running event loop):
        # keep-alive connections, no limit of its own (each endpoint's slots limit its attempts).
        self._client: aiohttp.ClientSession | None = None
        # Messages leased by this process per endpoint (sending or waiting for a slot), and the
        # endpoint's slots.
        self._in_flight: dict[str, int] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._outcomes: list[tuple[str, store.Outcome]] = []
        # Whether the last batch of a step was full: then the next takes its lock at once.
        self._backlog = {"sequencer": False, "stream": False, "webhooks": False}
        self.woken = asyncio.Event()
        self._swept_at: float | None = None
        # Where this process's next numbering batch starts (store.sequence_events).
        self._sequenced_past = 0

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def round(self) -> int:
        """One round of every step; returns how much it did (0: nothing was due)."""
        worked = 0
        for step in (self._sequence, self._stream, self._fan_out, self._sweep, self.deliver, self.flush):
            try:
                worked += await step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # one step's failure (Redis down) must not stop the others
                if (kind := unreachable_kind(exc)) is None:
                    log.exception("publishing events failed; retrying")
                else:  # a round every poll interval: a line now and then, no traceback
                    unavailable_log.warning("publishing events waits; retrying", kind, error=str(exc)[:200])
        return worked

    @property
    def behind(self) -> bool:
        """Whether the last round found a full batch of events to number, publish or fan out."""
        return any(self._backlog.values())

    def _did(self, step: str, done: int) -> int:
        """A full batch means more: the step's next batch takes its lock at once."""
        self._backlog[step] = done >= self._services.settings.events_batch_size
        return done

    async def _sequence(self) -> int:
        done = await sequence(self._services, not self._backlog["sequencer"], self._sequenced_past)
        self._sequenced_past = done.last_member_uid
        return self._did("sequencer", done.numbered)

    async def _stream(self) -> int:
        return self._did("stream", await publish_stream(self._services, not self._backlog["stream"]))

    async def _fan_out(self) -> int:
        return self._did("webhooks", await fan_out(self._services, not self._backlog["webhooks"]))

    async def _sweep(self) -> int:
        """Now and then, the messages a process that died left waiting (store.make_stranded_due)."""
        loop = asyncio.get_running_loop()
        if self._swept_at is not None and loop.time() - self._swept_at < _SWEEP_SECONDS:
            return 0
        self._swept_at = loop.time()
        return await store.make_stranded_due(self._services.pool, self._services.clock())

    async def deliver(self) -> int:
        """Lease due messages for endpoints with free slots and start their attempts."""
        services = self._services
        limit = services.settings.webhook_concurrency_per_endpoint * _LEASED_PER_SLOT
        now = services.clock()
        # An endpoint with more than half of its leases out waits for the rest: leasing a few at a
        # time would cost a round of statements per message.
        busy = [endpoint for endpoint, count in self._in_flight.items() if count > limit // 2]
        # Long enough for the attempts waiting for a slot, each up to its timeout.
        lease_seconds = services.settings.webhook_timeout_seconds * (_LEASED_PER_SLOT + 1) + _LEASE_MARGIN_SECONDS
        lease_until = now + timedelta(seconds=lease_seconds)
        started = 0
        vault = services.shared(Vault)
        for endpoint in await store.select_due_endpoints(services.pool, now, busy):
            # Opened before leasing: a secret that does not open (KONVERT_SECRET_KEY missing) fails
            # the round before it holds messages back for a lease's time.
            secrets = rules.signing_secrets(
                vault.open_one(endpoint["secret"]),
                vault.open_one(endpoint["previous_secret"]) if endpoint["previous_secret"] else None,
                endpoint["previous_secret_expires_at"],
                now,
            )
            free = limit - self._in_flight.get(endpoint["endpoint_id"], 0)
            messages = await store.claim_messages(
                services.pool,
                endpoint["endpoint_id"],
                now,
                free,
                lease_until,
                one_by_one=services.settings.lock_one_by_one,
            )
            if not messages:
                continue
            rows = await store.select_events(
                services.pool, [store.EventKey(m["member_uid"], m["event_id"]) for m in messages]
            )
            for message in messages:
                self._start(endpoint, secrets, message, rows[message["event_id"]])
            started += len(messages)
        return started

    def _start(
        self, endpoint: asyncpg.Record, secrets: list[str], message: asyncpg.Record, event: asyncpg.Record
    ) -> None:
        endpoint_id = endpoint["endpoint_id"]
        self._in_flight[endpoint_id] = self._in_flight.get(endpoint_id, 0) + 1
        if endpoint_id not in self._slots:
            self._slots[endpoint_id] = asyncio.Semaphore(self._services.settings.webhook_concurrency_per_endpoint)
        task = asyncio.create_task(self._attempt(endpoint, secrets, message, event))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _session(self) -> aiohttp.ClientSession:
        if self._client is None:
            settings = self._services.settings
            connector = aiohttp.TCPConnector(
                limit=0,
                resolver=None if settings.webhook_allow_private_addresses else destinations.PublicResolver(),
            )
            self._client = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=settings.webhook_timeout_seconds),
                auto_decompress=False,
            )
        return self._client

    async def _post(self, url: str, body: bytes, headers: dict[str, str]) -> int:
        """POST a message; the endpoint's HTTP status."""
        refused = destinations.literal_refused(self._services.settings, url)
        if refused is not None:
            raise destinations.DestinationRefused(refused)
        async with self._session().post(url, data=body, headers=headers, allow_redirects=False) as response:
            # Read to its end (a short answer, as receivers give), so that the connection is kept
            # for the next message; a long one is cut off with its connection.
            read = 0
            async for chunk in response.content.iter_any():
                read += len(chunk)
                if read > _ANSWER_BYTES_MAX:
                    response.close()
                    break
            return response.status

    async def _attempt(
        self, endpoint: asyncpg.Record, secrets: list[str], message: asyncpg.Record, event: asyncpg.Record
    ) -> None:
        services = self._services
        body = envelope_json(event)
        status: int | None = None
        error: str | None = None
        try:
            async with self._slots[endpoint["endpoint_id"]]:
                # Signed once its turn came, with the wall clock's time: receivers refuse timestamps
                # far from theirs.
                signed_at = datetime.now(UTC)
                headers = rules.signed_headers(rules.event_id_text(event["event_id"]), body, secrets, signed_at)
                status = await self._post(endpoint["url"], body, headers)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            error = f"{type(exc).__name__}: {exc}"[:_ERROR_CHARS_MAX]
        finally:
            self._in_flight[endpoint["endpoint_id"]] -= 1
        now = services.clock()
        if status is not None and 200 <= status < 300:
            outcome = store.Outcome(message["member_uid"], message["message_id"], "delivered", None, status, None, now)
        else:
            error = error or f"HTTP {status}"
            after = rules.after_failure(services.settings, message["attempts"], message["first_attempt_at"], now)
            state = "pending" if after.next_attempt_at is not None else "failed"
            outcome = store.Outcome(
                message["member_uid"], message["message_id"], state, after.next_attempt_at, status, error, now
            )
        self._outcomes.append((endpoint["endpoint_id"], outcome))
        # The next round, once it has enough to do: outcomes to write together, or leases to take.
        limit = services.settings.webhook_concurrency_per_endpoint * _LEASED_PER_SLOT
        if len(self._outcomes) >= _OUTCOMES_PER_ROUND or self._in_flight[endpoint["endpoint_id"]] <= limit // 2:
            self.woken.set()

    async def flush(self) -> int:
        """Write the outcomes of finished attempts, and what they say of their endpoints."""
        if not self._outcomes:
            return 0
        done, self._outcomes = self._outcomes, []
        services = self._services
        now = services.clock()
        try:
            await store.record_outcomes(services.pool, [outcome for _, outcome in done])
        except BaseException:
            self._outcomes[:0] = done  # written with the next round's
            raise
        # After the commit, as for a fan-out: each member's next message is due.
        finished = [store.MessageKey(o.member_uid, o.message_id) for _, o in done if o.status != "pending"]
        await store.make_next_due(services.pool, finished, now)
        succeeded = {endpoint for endpoint, o in done if o.status == "delivered"}
        failed = {endpoint for endpoint, _ in done} - succeeded
        await store.mark_endpoints(services.pool, sorted(succeeded), sorted(failed), now)
        if failed:
            await disable_failing_endpoints(services)
        return len(done)

    async def aclose(self) -> None:
        """Let the attempts in flight finish for a moment and write their outcomes; an attempt cut
        short is made again once its lease runs out."""
        try:
            if self._tasks:
                _, unfinished = await asyncio.wait(self._tasks, timeout=_CLOSE_WAIT_SECONDS)
                for task in unfinished:
                    task.cancel()
                await asyncio.gather(*unfinished, return_exceptions=True)
            await self.flush()
        finally:
            if self._client is not None:
                await self._client.close()


async def disable_failing_endpoints(services: Services) -> list[str]:
    """Disable endpoints every attempt to which failed for ``webhook_disable_after_seconds``,
    announcing each (webhook_endpoint.disabled) in the same transaction."""
    now = services.clock()
    failing_before = now - timedelta(seconds=services.settings.webhook_disable_after_seconds)
    async with writing(services) as book:
        disabled = await store.disable_failing_endpoints(book.conn, failing_before)
        for row in disabled:
            data = events.EndpointDisabled(
                endpoint_id=row["endpoint_id"], failing_since=row["failing_since"], last_error=row["last_error"]
            )
            book.announce(None, "webhook_endpoint.disabled", data)
    for row in disabled:
        log.warning(
            "webhook endpoint disabled: every attempt failed for too long", extra={"endpoint": row["endpoint_id"]}
        )
    return [row["endpoint_id"] for row in disabled]


async def run_forever(services: Services) -> None:
    """A service process's publisher: rounds back to back while it is a batch or more behind,
    else a round every poll interval (or as soon as an attempt finishes). A round costs a dozen
    statements whether it finds one event or a batch: under a steady trickle of writes, rounds
    back to back would spend them on an event or two each."""
    publisher = services.shared(Publisher)
    interval = services.settings.events_poll_interval_seconds
    while True:
        publisher.woken.clear()
        if await publisher.round() and publisher.behind:
            continue
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(publisher.woken.wait(), interval)


async def publish_all(services: Services, wait_seconds: float = 30.0) -> int:
    """Number and publish every event committed, then send every message due, until nothing more
    is due and no attempt is in flight (``konvert events publish``, and tests); returns how much
    was done. Events another process is numbering, and a number a publisher cannot pass yet (see
    konvert.events.store), are waited for, ``wait_seconds`` at most."""
    publisher = services.shared(Publisher)
    deadline = asyncio.get_running_loop().time() + wait_seconds
    total = 0
    while True:
        publisher.woken.clear()
        worked = await publisher.round()
        total += worked
        if worked:
            continue
        if publisher.in_flight:
            # Until an attempt finishes: its slot and its outcome are the next round's work.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(publisher.woken.wait(), services.settings.webhook_timeout_seconds)
        elif await store.unpublished(services.pool) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(services.settings.events_poll_interval_seconds)
        else:
            return total


async def prune(services: Services, now: datetime | None = None) -> int:
    """The job that prunes delivered events older than ``events_retention_days`` (one batch)."""
    moment = now or services.clock()
    before = moment - timedelta(days=services.settings.events_retention_days)
    batch = services.settings.jobs_batch_size
    pruned = await store.prune_events(services.pool, before, batch, one_by_one=services.settings.lock_one_by_one)
    await store.prune_lot_notices(services.pool, before, batch)
    return pruned
