"""Group commit and batched lookups against real PostgreSQL: shared commits and queries, isolated
failures, durable results, reads that see the writes before them; and purchases written as one
transaction per batch."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import asyncpg
import msgspec
import pytest

from konvert import composition
from konvert.batching import BatchedLookups, GroupCommit
from konvert.earning.model import RefundIn
from konvert.earning.refunds import refund_purchase
from konvert.earning.service import post_purchase, write_purchases
from konvert.errors import ConcurrentWrite, IdempotencyConflict, InsufficientPoints, Unprocessable
from konvert.idempotency import Outcome
from konvert.ledger import store as ledger_store
from konvert.ledger.book import writing
from konvert.program import parse_program
from konvert.redemption.model import RedemptionIn, RewardIn
from konvert.redemption.service import put_reward, redeem
from tests.conftest import TEST_PROGRAM, balance_key, cached_available, make_settings, spend_points
from tests.integration.test_purchases import (
    batched_writes,
    held_before_commit,
    line,
    posting,
    purchase,
    until_waiting_for_locks,
)


async def _let_the_loop_run(turns: int = 20) -> None:
    """Some turns of the event loop: whatever was about to start (a batch, a lookup) has started."""
    for _ in range(turns):
        await asyncio.sleep(0)


@pytest.fixture
async def table(database_url):
    """A scratch table: value must be positive, so a negative item is a database error."""
    name = f"gc_{uuid.uuid4().hex[:10]}"
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    await pool.execute(f"create table {name} (item int primary key, value int not null check (value > 0), txid bigint)")
    yield pool, name
    await pool.execute(f"drop table {name}")
    await pool.close()


def committer(pool, table, calls):
    """A group commit into the scratch table: each batch in one transaction of its own; a zero is
    refused without a database error, a negative value aborts the transaction. Records the items
    of every call of ``write``."""

    async def write(items):
        calls.append([item_id for item_id, _ in items])
        results = []
        async with pool.acquire() as conn, conn.transaction():
            for item_id, value in items:
                if value == 0:
                    results.append(Unprocessable("zero is refused before writing"))
                    continue
                results.append(
                    await conn.fetchval(
                        f"insert into {table} (item, value, txid) values ($1, $2, txid_current()) returning item",
                        item_id,
                        value,
                    )
                )
        return results

    return GroupCommit(write, sort_key=lambda item: item[0], batch_size_max=50, batches_in_flight_max=1)


async def test_concurrent_writes_share_commits(table):
    pool, name = table
    calls: list[list[int]] = []
    group = committer(pool, name, calls)
    seen: list[int] = []

    async def submit(item_id):
        result = await group.submit((item_id, 1))
        # Visible from another connection: the commit happened before the result was handed out.
        seen.append(await pool.fetchval(f"select count(*) from {name} where item = $1", item_id))
        return result

    try:
        results = await asyncio.gather(*(submit(i) for i in range(200)))
    finally:
        await group.aclose()

    assert sorted(results) == list(range(200))
    assert seen == [1] * 200
    transactions = await pool.fetchval(f"select count(distinct txid) from {name}")
    assert transactions == len(calls) < 200


async def test_a_refused_item_fails_alone_and_its_neighbours_commit(table):
    pool, name = table
    calls: list[list[int]] = []
    group = committer(pool, name, calls)
    together, alone = batched_writes("together"), batched_writes("alone")
    try:
        results = await asyncio.gather(
            *(group.submit((i, 0 if i == 7 else 1)) for i in range(20)), return_exceptions=True
        )
    finally:
        await group.aclose()

    assert isinstance(results[7], Unprocessable)
    assert [r for i, r in enumerate(results) if i != 7] == [i for i in range(20) if i != 7]
    assert await pool.fetchval(f"select count(*) from {name}") == 19
    # A refusal needs no rollback: the batch committed with it, nothing was written again alone.
    assert calls == [list(range(20))]
    assert (batched_writes("together") - together, batched_writes("alone") - alone) == (20, 0)


async def test_a_database_error_fails_only_its_own_item(table):
    pool, name = table
    calls: list[list[int]] = []
    group = committer(pool, name, calls)
    together, alone = batched_writes("together"), batched_writes("alone")
    try:
        results = await asyncio.gather(
            *(group.submit((i, -1 if i == 3 else 1)) for i in range(20)), return_exceptions=True
        )
    finally:
        await group.aclose()

    assert isinstance(results[3], asyncpg.CheckViolationError)
    assert all(r == i for i, r in enumerate(results) if i != 3)
    assert await pool.fetchval(f"select count(*) from {name} where item <> 3") == 19
    # The batch rolled back whole, then each item was written alone, in a transaction of its own.
    assert calls == [list(range(20))] + [[i] for i in range(20)]
    assert await pool.fetchval(f"select count(distinct txid) from {name}") == 19
    assert (batched_writes("together") - together, batched_writes("alone") - alone) == (0, 20)


async def test_an_item_that_meets_a_concurrent_write_alone_is_tried_once_more():
    """Written alone after its batch failed, an item that raises ConcurrentWrite (a concurrent
    request took what it was written against) gets a second try; a second ConcurrentWrite is its
    answer (503), never a third try."""
    calls: list[list[str]] = []
    concurrent = {"lucky": 1, "unlucky": 2}  # how many times each meets a concurrent write alone

    async def write(items):
        calls.append(list(items))
        if len(items) > 1:
            raise ConnectionResetError("the batch's connection was lost")
        (item,) = items
        if concurrent.get(item, 0) > 0:
            concurrent[item] -= 1
            raise ConcurrentWrite("taken meanwhile")
        return [item.upper()]

    group = GroupCommit(write, sort_key=lambda item: item, batch_size_max=10, batches_in_flight_max=1)
    try:
        results = await asyncio.gather(
            *(group.submit(item) for item in ("lucky", "plain", "unlucky")), return_exceptions=True
        )
    finally:
        await group.aclose()

    # The batch failed; alone, "lucky" met a concurrent write once and went through on its second
    # try, "unlucky" met one twice and got the second as its answer.
    assert results[:2] == ["LUCKY", "PLAIN"]
    assert isinstance(results[2], ConcurrentWrite)
    assert calls == [["lucky", "plain", "unlucky"], ["lucky"], ["lucky"], ["plain"], ["unlucky"], ["unlucky"]]


async def test_aclose_writes_what_is_queued(table):
    pool, name = table
    group = committer(pool, name, [])
    pending = [asyncio.ensure_future(group.submit((i, 1))) for i in range(30)]
    await asyncio.sleep(0)  # one turn of the loop: every submission is queued, none written yet

    await group.aclose()

    assert await pool.fetchval(f"select count(*) from {name}") == 30
    assert sorted(await asyncio.wait_for(asyncio.gather(*pending), 1)) == list(range(30))


async def test_a_write_whose_request_goes_away_is_written_all_the_same(table):
    pool, name = table
    group = committer(pool, name, [])
    leaving = asyncio.ensure_future(group.submit((1, 1)))
    staying = asyncio.ensure_future(group.submit((2, 1)))
    await asyncio.sleep(0)  # both queued
    leaving.cancel()

    assert await asyncio.wait_for(staying, 10) == 2
    await group.aclose()

    assert leaving.cancelled()
    # Its client went away, not its write: a retry of the request will find it and replay it.
    assert sorted(await pool.fetchval(f"select array_agg(item) from {name}")) == [1, 2]


def held_batches(*, overlap_after_seconds, batch_size_max=50):
    """A group commit whose first batch is held until ``release`` is set; records each batch, and
    sets ``first_started`` once the first is in flight."""
    release, first_started = asyncio.Event(), asyncio.Event()
    batches: list[list[int]] = []

    async def write(items):
        batches.append(list(items))
        if len(batches) == 1:
            first_started.set()
            await asyncio.wait_for(release.wait(), 10)
        return list(items)

    group = GroupCommit(
        write,
        sort_key=lambda item: item,
        batch_size_max=batch_size_max,
        batches_in_flight_max=4,
        overlap_after_seconds=overlap_after_seconds,
    )
    return group, batches, release, first_started


async def test_postings_that_arrive_while_a_batch_is_in_flight_wait_and_go_together():
    group, batches, release, first_started = held_batches(overlap_after_seconds=10)
    try:
        first = asyncio.ensure_future(group.submit(0))
        await asyncio.wait_for(first_started.wait(), 10)
        later = [asyncio.ensure_future(group.submit(i)) for i in range(1, 11)]
        await _let_the_loop_run()
        assert batches == [[0]]  # four slots, but no second batch beside a young one
        release.set()  # the batch in flight finishing starts the next at once
        assert await asyncio.wait_for(asyncio.gather(first, *later), 1) == list(range(11))
    finally:
        release.set()
        await group.aclose()

    assert batches == [[0], list(range(1, 11))]


async def test_a_full_batch_starts_beside_one_in_flight_without_waiting():
    group, batches, release, first_started = held_batches(overlap_after_seconds=10, batch_size_max=5)
    try:
        first = asyncio.ensure_future(group.submit(0))
        await asyncio.wait_for(first_started.wait(), 10)
        later = [asyncio.ensure_future(group.submit(i)) for i in range(1, 13)]
        # Two full batches of five go beside the held one; the last two wait to grow.
        assert await asyncio.wait_for(asyncio.gather(*later[:10]), 1) == list(range(1, 11))
        await _let_the_loop_run()
        assert not any(future.done() for future in later[10:])
        release.set()
        assert await asyncio.wait_for(asyncio.gather(first, *later[10:]), 1) == [0, 11, 12]
    finally:
        release.set()
        await group.aclose()

    assert batches == [[0], [1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12]]


async def test_a_batch_in_flight_longer_than_the_overlap_time_gets_one_beside_it():
    group, batches, release, first_started = held_batches(overlap_after_seconds=0.05)
    try:
        first = asyncio.ensure_future(group.submit(0))
        await asyncio.wait_for(first_started.wait(), 10)
        later = [asyncio.ensure_future(group.submit(i)) for i in range(1, 6)]
        assert await asyncio.wait_for(asyncio.gather(*later), 2) == list(range(1, 6))  # first still held
        assert not first.done()
        release.set()
        assert await first == 0
    finally:
        release.set()
        await group.aclose()

    assert batches == [[0], list(range(1, 6))]


# --- batched lookups ---------------------------------------------------------------------------


@pytest.fixture
async def values(table):
    """The scratch table with items 0..99, value = item + 1; a lookup divides by (value - 50), so
    looking up item 49 is a database error."""
    pool, name = table
    await pool.executemany(f"insert into {name} (item, value) values ($1, $2)", [(i, i + 1) for i in range(100)])
    return pool, name


def lookups(pool, name, *, batches_in_flight_max=4, before_answer=None):
    """Looks items up in the scratch table, recording every batch of keys it was asked for; a
    value PostgreSQL refuses sends the batch's keys alone, as the balance reads do."""
    sql = f"select item, value, 100 / (value - 50) as ratio from {name} where item = any($1::int[])"
    asked: list[list[int]] = []

    async def many(keys):
        asked.append(list(keys))
        rows = await pool.fetch(sql, keys)
        if before_answer is not None:
            await before_answer()
        return {row["item"]: row["value"] for row in rows}

    async def one(key):
        asked.append([key])
        rows = await pool.fetch(sql, [key])
        return rows[0]["value"] if rows else None

    batched = BatchedLookups(
        many,
        look_up_one=one,
        alone_on=(asyncpg.DataError,),
        batch_size_max=30,
        batches_in_flight_max=batches_in_flight_max,
    )
    return batched, asked


def held_answers():
    """``before_answer`` for ``lookups``: the first lookup's answer waits for ``release``;
    ``queried`` is set once it has run its query."""
    queried, release = asyncio.Event(), asyncio.Event()

    async def hold_the_first_answer():
        if not queried.is_set():
            queried.set()
            await release.wait()

    return hold_the_first_answer, queried, release


async def test_concurrent_lookups_share_queries_and_each_gets_its_own_value(values):
    pool, name = values
    batched, asked = lookups(pool, name, batches_in_flight_max=1)
    keys = [*range(48), *range(51, 100), 500, 7, 7]  # 500 is not there; 7 is asked for three times

    found = await asyncio.gather(*(batched.get(key) for key in keys))

    assert found == [*(k + 1 for k in range(48)), *(k + 1 for k in range(51, 100)), None, 8, 8]
    assert sorted(k for batch in asked for k in batch) == sorted({*keys})  # each key once
    assert [len(batch) for batch in asked] == [30, 30, 30, 8]  # 98 keys, 30 at most per lookup
    assert (batched.batches, batched.keys_looked_up) == (4, 98)


async def test_a_failed_batch_looks_its_keys_up_one_by_one(values):
    pool, name = values
    batched, asked = lookups(pool, name)

    found = await asyncio.gather(*(batched.get(key) for key in (10, 49, 60)), return_exceptions=True)

    assert found[0] == 11 and found[2] == 61
    assert isinstance(found[1], asyncpg.DivisionByZeroError)
    assert asked[0] == [10, 49, 60] and sorted(asked[1:]) == [[10], [49], [60]]
    with pytest.raises(asyncpg.DivisionByZeroError):  # alone, its error is its own
        await batched.get(49)


async def test_a_lookup_that_times_out_fails_all_its_requests_without_retrying_them(values):
    pool, _ = values
    asked: list[list[int]] = []

    async def many(keys):
        asked.append(list(keys))
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("set local statement_timeout = '50ms'")
            await conn.fetch("select pg_sleep(1)")
        return {}

    async def one(key):
        asked.append([key])
        return key

    batched = BatchedLookups(
        many, look_up_one=one, alone_on=(asyncpg.DataError,), batch_size_max=30, batches_in_flight_max=4
    )
    found = await asyncio.gather(*(batched.get(key) for key in range(5)), return_exceptions=True)

    assert all(isinstance(f, asyncpg.QueryCanceledError) for f in found)
    assert asked == [[0, 1, 2, 3, 4]]  # not five more queries against a database that is struggling


async def test_a_lookup_asked_for_after_a_write_sees_it_even_while_one_is_in_flight(values):
    pool, name = values
    hold, queried, release = held_answers()
    batched, asked = lookups(pool, name, before_answer=hold)

    first = asyncio.ensure_future(batched.get(5))
    await asyncio.wait_for(queried.wait(), 10)  # the first lookup has run its query
    await pool.execute(f"update {name} set value = 1000 where item = 5")
    second = asyncio.ensure_future(batched.get(5))
    assert await asyncio.wait_for(second, 10) == 1000  # a lookup of its own, not the one in flight
    release.set()

    assert await asyncio.wait_for(first, 10) == 6
    assert asked == [[5], [5]]


async def test_keys_asked_for_while_the_slots_are_busy_go_together_in_the_next_lookup(values):
    pool, name = values
    hold, queried, release = held_answers()
    batched, asked = lookups(pool, name, batches_in_flight_max=1, before_answer=hold)

    first = asyncio.ensure_future(batched.get(0))
    await asyncio.wait_for(queried.wait(), 10)
    later = [asyncio.ensure_future(batched.get(key)) for key in range(1, 21)]
    await _let_the_loop_run()
    assert asked == [[0]]  # the one slot is taken: the later keys wait
    release.set()

    assert await asyncio.wait_for(asyncio.gather(first, *later), 10) == list(range(1, 22))
    assert asked == [[0], list(range(1, 21))]


async def test_a_request_that_goes_away_does_not_cancel_the_lookup_others_wait_for(values):
    pool, name = values
    hold, queried, release = held_answers()
    batched, asked = lookups(pool, name, before_answer=hold)

    leaving, staying = asyncio.ensure_future(batched.get(3)), asyncio.ensure_future(batched.get(3))
    await asyncio.wait_for(queried.wait(), 10)  # both wait for the one lookup in flight
    leaving.cancel()
    release.set()

    assert await asyncio.wait_for(staying, 10) == 4
    assert leaving.cancelled()
    assert asked == [[3]]
    await asyncio.wait_for(batched.aclose(), 10)


# --- purchases written as one transaction per batch --------------------------------------------


def _tier_program():
    return parse_program(
        TEST_PROGRAM
        + '\n[tiers]\n[[tiers.levels]]\nname = "Bronze"\nmin_points = 0\n'
        + '[[tiers.levels]]\nname = "Silver"\nmin_points = 100\nmultiplier = 2\n'
    )


@pytest.fixture
async def tier_services(database_url, redis_url, redis_client):
    services = await composition.open_services(make_settings(database_url, redis_url), _tier_program())
    yield services
    await services.close()


@pytest.fixture(params=["together", "one_by_one"])
async def locking_services(request, database_url, redis_url, redis_client, program):
    """Services that lock several members in one statement, or with a statement each
    (KONVERT_LOCK_MEMBERS)."""
    settings = make_settings(database_url, redis_url, lock_members=request.param)
    services = await composition.open_services(settings, program)
    yield services
    await services.close()


def _euros(services, member_id, purchase_id, euros):
    """A checked purchase of one toy for ``euros`` (1 point per euro at Bronze)."""
    return posting(services, purchase(member_id, purchase_id, line("1", 1, euros * 100)))


async def test_a_batch_carries_a_members_tier_from_one_purchase_to_the_next(tier_services, new_id):
    member = new_id("m")
    first, second = await write_purchases(
        tier_services, [_euros(tier_services, member, new_id("p"), 100), _euros(tier_services, member, new_id("p"), 10)]
    )

    # The first purchase lifts the member to Silver, so the second already earns double.
    assert msgspec.json.decode(first.body)["points"] == 100
    second_body = msgspec.json.decode(second.body)
    assert second_body["points"] == 20
    assert {"kind": "tier", "ref": "Silver", "factor": "2"} in second_body["lines"][0]["rules"]
    row = await tier_services.pool.fetchrow(
        "select tier, tier_qualifying_points, points_available from members where member_id = $1", member
    )
    assert tuple(row) == ("Silver", 120, 120)


async def test_members_are_locked_in_member_uid_order_each_only_after_the_one_before(locking_services, new_id):
    """Together or one by one, a writer that waits for a member holds none after it, so two
    writers never wait for each other in a circle."""
    services = locking_services
    members = sorted(new_id("m") for _ in range(2))
    await write_purchases(services, [_euros(services, m, new_id("p"), 10) for m in members])
    first, second = [
        await services.pool.fetchval("select member_uid from members where member_id = $1", m) for m in members
    ]
    assert first < second  # created in this order

    async def lock_both() -> list[int]:
        async with writing(services) as book:
            return [member.uid for member in await book.lock(uids=[second, first])]

    async with services.pool.acquire() as holder, holder.transaction():
        await holder.execute("select 1 from members where member_uid = $1 for update", first)
        locking = asyncio.ensure_future(lock_both())
        await until_waiting_for_locks(services.pool, 1)
        async with services.pool.acquire() as other, other.transaction():
            taken = await other.fetchval(
                "select member_uid from members where member_uid = $1 for update nowait", second
            )
        assert taken == second
    assert await asyncio.wait_for(locking, 10) == [first, second]


async def test_a_member_renamed_by_an_erasure_while_a_writer_waits_is_not_the_one_its_id_named(
    locking_services, new_id
):
    services = locking_services
    member = new_id("m")
    await write_purchases(services, [_euros(services, member, new_id("p"), 10)])
    uid = await services.pool.fetchval("select member_uid from members where member_id = $1", member)

    async def lock_by_id() -> list[str]:
        async with writing(services) as book:
            return [locked.id for locked in await book.lock(ids=[member])]

    async with services.pool.acquire() as eraser, eraser.transaction():
        await eraser.execute("select 1 from members where member_uid = $1 for update", uid)
        await ledger_store.rename_member(eraser, uid, new_id("erased"), datetime.now(UTC))
        locking = asyncio.ensure_future(lock_by_id())  # finds the id's member, then waits for it
        await until_waiting_for_locks(services.pool, 1)

    assert await asyncio.wait_for(locking, 10) == []


async def test_duplicates_within_one_batch_replay_or_conflict_alone(services, new_id):
    member, purchase_id = new_id("m"), new_id("p")
    original = _euros(services, member, purchase_id, 50)
    same = _euros(services, member, purchase_id, 50)
    different = _euros(services, member, purchase_id, 70)
    other = _euros(services, member, new_id("p"), 10)

    outcomes = await write_purchases(services, [original, same, different, other])

    assert len(outcomes) == 4  # every posting settled in the one transaction
    assert isinstance(outcomes[0], Outcome) and not outcomes[0].replayed
    assert outcomes[1].replayed and outcomes[1].body == outcomes[0].body
    assert isinstance(outcomes[2], IdempotencyConflict)
    assert isinstance(outcomes[3], Outcome) and not outcomes[3].replayed
    available = await services.pool.fetchval("select points_available from members where member_id = $1", member)
    assert available == 60


async def test_a_batch_commits_in_one_transaction_and_tombstones_each_members_balance(
    locking_services, redis_client, new_id
):
    """Once write_purchases returns, others see every row, written by one transaction; the
    cached balance of each member (none was read) is tombstoned at the version that transaction
    gave it."""
    services = locking_services
    members = [new_id("m") for _ in range(3)]

    outcomes = await write_purchases(services, [_euros(services, m, new_id("p"), 10) for m in sorted(members)])

    assert [o.replayed for o in outcomes] == [False, False, False]
    rows = await services.pool.fetch(
        "select m.member_id, m.points_available, m.version, count(p.*) as purchases"
        " from members m join purchases p using (member_uid) where m.member_id = any($1::text[])"
        " group by m.member_id, m.points_available, m.version order by m.member_id",
        members,
    )
    assert [(r["points_available"], r["purchases"]) for r in rows] == [(10, 1)] * 3
    xmins = await services.pool.fetchval(
        "select count(distinct p.xmin::text) from purchases p join members m using (member_uid)"
        " where m.member_id = any($1::text[])",
        members,
    )
    assert xmins == 1
    for row in rows:
        assert await cached_available(redis_client, row["member_id"]) == (row["version"], None)


async def test_a_purchase_id_taken_meanwhile_by_another_member_fails_the_batch_and_its_postings_go_alone(
    tier_services, new_id
):
    """A's uncommitted purchase holds the id when batch B reads it as free. B's insert then
    waits for A and finds the id taken: B had carried the tier that purchase would have earned
    into the member's next purchase, so B commits nothing (ConcurrentWrite) and its postings are
    written one by one: the raced one is refused, the next earns at the tier the member really has."""
    services = tier_services
    raced = new_id("p")
    owner, other = f"a-{new_id('m')}", f"b-{new_id('m')}"
    together, alone = batched_writes("together"), batched_writes("alone")
    async with held_before_commit(services, [_euros(services, owner, raced, 10)]):
        # For `other`, `raced` (100 points) would lift it to Silver (x2) before its next purchase.
        batch_b = asyncio.gather(
            post_purchase(services, _euros(services, other, raced, 100)),
            post_purchase(services, _euros(services, other, f"z-{new_id('p')}", 10)),
            return_exceptions=True,
        )
        await until_waiting_for_locks(services.pool, 1)  # B waits on A's purchase id
        assert not batch_b.done()
    refused, written = await batch_b

    assert isinstance(refused, IdempotencyConflict)
    assert msgspec.json.decode(written.body)["points"] == 10  # Bronze: x1
    row = await services.pool.fetchrow(
        "select tier, tier_qualifying_points, points_available from members where member_id = $1", other
    )
    assert tuple(row) == ("Bronze", 10, 10)
    owners = await services.pool.fetch(
        "select m.member_id from purchases p join members m using (member_uid) where p.purchase_id = $1", raced
    )
    assert [r["member_id"] for r in owners] == [owner]
    # What operators see in /metrics: B's two postings went alone, none together.
    assert (batched_writes("together") - together, batched_writes("alone") - alone) == (0, 2)


async def test_a_raced_purchase_id_commits_nothing_and_alone_is_refused_after_one_more_try(services, new_id):
    """A batch of one that meets the raced id raises ConcurrentWrite and commits nothing (its new
    member is not created); through the batcher it is tried once more once the other request
    committed, and answers 409 as for any reused id (not a 5xx)."""
    raced = new_id("p")
    newcomer = f"b-{new_id('m')}"
    async with held_before_commit(services, [_euros(services, f"a-{new_id('m')}", raced, 10)]):
        direct = asyncio.ensure_future(write_purchases(services, [_euros(services, newcomer, raced, 20)]))
        await until_waiting_for_locks(services.pool, 1)
    with pytest.raises(ConcurrentWrite):
        await direct
    assert await services.pool.fetchval("select count(*) from members where member_id = $1", newcomer) == 0

    raced = new_id("p")
    async with held_before_commit(services, [_euros(services, f"a-{new_id('m')}", raced, 10)]):
        batched = asyncio.ensure_future(post_purchase(services, _euros(services, newcomer, raced, 20)))
        await until_waiting_for_locks(services.pool, 1)
    with pytest.raises(IdempotencyConflict):
        await batched
    assert await services.pool.fetchval("select count(*) from members where member_id = $1", newcomer) == 0


async def test_a_replay_caches_over_the_balance_a_lost_answer_may_have_left(services, redis_client, new_id):
    """A batch committed, but its answer (and its cache refresh) was lost: a slower reader then
    cached an older balance. The client's retry replays the purchase and caches the member's
    balance at its current version, so the older balance is served no more."""
    member, purchase_id = new_id("m"), new_id("p")
    (first,) = await write_purchases(services, [_euros(services, member, purchase_id, 10)])
    version = await services.pool.fetchval("select version from members where member_id = $1", member)
    # The invalidation never happened, and a reader put the balance it read before the write.
    await redis_client.delete(balance_key(member))
    assert await services.cache.put_many([(member, version - 1, b'{"available": 0}')])
    assert await services.cache.get(member) == b'{"available": 0}'

    (again,) = await write_purchases(services, [_euros(services, member, purchase_id, 10)])

    assert (first.replayed, again.replayed, again.body) == (False, True, first.body)
    assert await cached_available(redis_client, member) == (version, 10)
    served = await services.cache.get(member)
    assert served is not None and msgspec.json.decode(served)["available"] == 10


async def test_a_purchase_that_repays_a_refund_debt_is_written_together_and_repays_it(services, redis_client, new_id):
    member, bought = new_id("m"), new_id("p")
    await write_purchases(services, [_euros(services, member, bought, 10)])  # 10 points, available
    await spend_points(services, member, 10, code="redeem", cause_type="test", cause_ref=bought, reason="t")
    await refund_purchase(services, bought, RefundIn(refund_id="r1", amount=1000))  # takes 10 back: a debt
    debt = await services.pool.fetchval("select points_debt from members where member_id = $1", member)
    assert debt == 10
    together, alone = batched_writes("together"), batched_writes("alone")

    posted = await post_purchase(services, _euros(services, member, new_id("p"), 30))  # 30 points

    assert msgspec.json.decode(posted.body)["points"] == 30
    # In its batch's one transaction: no transaction of its own any more.
    assert (batched_writes("together") - together, batched_writes("alone") - alone) == (1, 0)
    row = await services.pool.fetchrow(
        """select m.points_available, m.points_debt, m.version,
                  (select sum(remaining) from lots l
                   where l.member_uid = m.member_uid and l.state = 'available') as lots
           from members m where member_id = $1""",
        member,
    )
    # Repaid in the purchase's own transaction: the lots agree with the balance at once.
    assert (row["points_available"], row["points_debt"], row["lots"]) == (20, 0, 20)
    assert await cached_available(redis_client, member) == (row["version"], None)


# --- redemptions ---------------------------------------------------------------------------


async def test_concurrent_redemptions_share_transactions_and_a_refusal_fails_alone(locking_services, new_id):
    services = locking_services
    members = sorted(new_id("m") for _ in range(3))
    await write_purchases(services, [_euros(services, m, new_id("p"), 10) for m in members])  # 10 points each
    # Two of 4 points for each member, and a third for the first: 12 of its 10 points.
    wanted = [(m, new_id("r")) for m in members for _ in range(2)] + [(members[0], new_id("r"))]

    outcomes = await asyncio.gather(
        *(redeem(services, m, RedemptionIn(redemption_id=r, points=4)) for m, r in wanted), return_exceptions=True
    )

    refused = [o for o in outcomes if isinstance(o, Exception)]
    assert [type(o) for o in refused] == [InsufficientPoints], refused
    rows = await services.pool.fetch(
        "select member_id, points_available from members where member_id = any($1::text[])", members
    )
    assert {r["member_id"]: r["points_available"] for r in rows} == dict.fromkeys(members, 2)
    # The first redemption found no batch in flight and went alone; the others waited and went
    # together: fewer commits than redemptions.
    xmins = await services.pool.fetchval(
        "select count(distinct r.xmin::text) from redemptions r join members m using (member_uid)"
        " where m.member_id = any($1::text[])",
        members,
    )
    assert xmins < 6


async def test_a_refused_reward_in_a_batch_keeps_its_stock(services, new_id):
    poor, rich, reward_id = new_id("m"), new_id("m"), new_id("reward")
    await write_purchases(services, [_euros(services, m, new_id("p"), e) for m, e in sorted([(poor, 10), (rich, 50)])])
    await put_reward(services, reward_id, RewardIn(name="mug", cost_points=30, stock=5))

    poor_try, rich_try = await asyncio.gather(
        redeem(services, poor, RedemptionIn(redemption_id=new_id("r"), reward_id=reward_id)),
        redeem(services, rich, RedemptionIn(redemption_id=new_id("r"), reward_id=reward_id)),
        return_exceptions=True,
    )

    assert isinstance(poor_try, InsufficientPoints) and isinstance(rich_try, Outcome)
    # The refusal gave up no unit of the stock: only the rich member's redemption took one.
    assert await services.pool.fetchval("select stock from rewards where reward_id = $1", reward_id) == 4


async def test_a_redemption_repeated_within_a_batch_answers_as_its_replay(services, new_id):
    member, first_id = new_id("m"), new_id("r")
    await write_purchases(services, [_euros(services, member, new_id("p"), 10)])
    same = RedemptionIn(redemption_id=first_id, points=3)
    other_body = RedemptionIn(redemption_id=first_id, points=4)

    # A batch in flight first, so that the three go into the next one together.
    ahead = asyncio.ensure_future(redeem(services, member, RedemptionIn(redemption_id=new_id("r"), points=1)))
    once, again, conflicting = await asyncio.gather(
        redeem(services, member, same),
        redeem(services, member, same),
        redeem(services, member, other_body),
        return_exceptions=True,
    )
    await ahead

    assert isinstance(once, Outcome) and isinstance(again, Outcome), (once, again)
    assert (once.replayed, again.replayed, again.body) == (False, True, once.body)
    assert isinstance(conflicting, IdempotencyConflict)
    # Spent once: 1 point ahead, 3 for the redemption.
    assert await services.pool.fetchval("select points_available from members where member_id = $1", member) == 6
