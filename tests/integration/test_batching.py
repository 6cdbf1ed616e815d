"""Group commit and batched lookups against real PostgreSQL: shared commits and queries, isolated
failures, durable results, reads that see the writes before them."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from konvert.batching import BatchedLookups, GroupCommit
from konvert.errors import Unprocessable


@pytest.fixture
async def table(database_url):
    """A scratch table: value must be positive, so a negative item is a database error."""
    name = f"gc_{uuid.uuid4().hex[:10]}"
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    await pool.execute(
        f"create table {name} (item int primary key, value int not null check (value > 0), txid bigint)"
    )
    yield pool, name
    await pool.execute(f"drop table {name}")
    await pool.close()


def committer(pool, table, committed_seen):
    async def write(conn, item):
        item_id, value = item
        if value == 0:
            raise Unprocessable("zero is refused before writing")
        return await conn.fetchval(
            f"insert into {table} (item, value, txid) values ($1, $2, txid_current()) returning item",
            item_id,
            value,
        )

    async def after_commit(item_ids):
        # Visible from another connection: the commit happened before the results are handed out.
        for item_id in item_ids:
            committed_seen.append(await pool.fetchval(f"select count(*) from {table} where item = $1", item_id))

    return GroupCommit(
        pool, write, after_commit, sort_key=lambda item: item[0], batch_size_max=50, batches_in_flight_max=1
    )


async def test_concurrent_writes_share_commits(table):
    pool, name = table
    seen: list[int] = []
    group = committer(pool, name, seen)
    group.start()
    try:
        results = await asyncio.gather(*(group.submit((i, 1)) for i in range(200)))
    finally:
        await group.stop()

    assert sorted(results) == list(range(200))
    assert seen == [1] * 200
    transactions = await pool.fetchval(f"select count(distinct txid) from {name}")
    assert transactions == group.batches_written < 200


async def test_a_refused_item_fails_alone_and_its_neighbours_commit(table):
    pool, name = table
    group = committer(pool, name, [])
    group.start()
    try:
        results = await asyncio.gather(
            *(group.submit((i, 0 if i == 7 else 1)) for i in range(20)), return_exceptions=True
        )
    finally:
        await group.stop()

    assert isinstance(results[7], Unprocessable)
    assert [r for i, r in enumerate(results) if i != 7] == [i for i in range(20) if i != 7]
    assert await pool.fetchval(f"select count(*) from {name}") == 19


async def test_a_database_error_fails_only_its_own_item(table):
    pool, name = table
    group = committer(pool, name, [])
    group.start()
    try:
        results = await asyncio.gather(
            *(group.submit((i, -1 if i == 3 else 1)) for i in range(20)), return_exceptions=True
        )
    finally:
        await group.stop()

    assert isinstance(results[3], asyncpg.CheckViolationError)
    assert all(r == i for i, r in enumerate(results) if i != 3)
    assert await pool.fetchval(f"select count(*) from {name} where item <> 3") == 19


async def test_stop_writes_what_is_queued(table):
    pool, name = table
    group = committer(pool, name, [])
    group.start()
    pending = [asyncio.ensure_future(group.submit((i, 1))) for i in range(30)]
    await asyncio.sleep(0)
    await group.stop()
    assert sorted(await asyncio.gather(*pending)) == list(range(30))
    assert await pool.fetchval(f"select count(*) from {name}") == 30


def held_batches(pool, *, overlap_after_seconds, batch_size_max=50):
    """A group commit whose first batch is held until ``release`` is set; records each batch."""
    release = asyncio.Event()
    batches: list[list[int]] = []

    async def write_batch(items):
        batches.append(list(items))
        if len(batches) == 1:
            await asyncio.wait_for(release.wait(), 10)
        return list(items)

    async def nothing(_):
        return None

    group = GroupCommit(
        pool,
        nothing,
        nothing,
        sort_key=lambda item: item,
        batch_size_max=batch_size_max,
        batches_in_flight_max=4,
        overlap_after_seconds=overlap_after_seconds,
        write_batch=write_batch,
    )
    return group, batches, release


async def test_postings_that_arrive_while_a_batch_is_in_flight_wait_and_go_together(table):
    pool, _ = table
    group, batches, release = held_batches(pool, overlap_after_seconds=10)
    group.start()
    try:
        first = asyncio.ensure_future(group.submit(0))
        await asyncio.sleep(0.05)
        later = [asyncio.ensure_future(group.submit(i)) for i in range(1, 11)]
        await asyncio.sleep(0.2)
        assert batches == [[0]]  # four slots, but no second batch beside a young one
        release.set()  # the batch in flight finishing starts the next at once
        assert await asyncio.wait_for(asyncio.gather(first, *later), 1) == list(range(11))
    finally:
        release.set()
        await group.stop()

    assert batches == [[0], list(range(1, 11))]


async def test_a_full_batch_starts_beside_one_in_flight_without_waiting(table):
    pool, _ = table
    group, batches, release = held_batches(pool, overlap_after_seconds=10, batch_size_max=5)
    group.start()
    try:
        first = asyncio.ensure_future(group.submit(0))
        await asyncio.sleep(0.05)
        later = [asyncio.ensure_future(group.submit(i)) for i in range(1, 13)]
        # Two full batches of five go beside the held one; the last two wait to grow.
        assert await asyncio.wait_for(asyncio.gather(*later[:10]), 1) == list(range(1, 11))
        assert not any(future.done() for future in later[10:])
        release.set()
        assert await asyncio.wait_for(asyncio.gather(first, *later[10:]), 1) == [0, 11, 12]
    finally:
        release.set()
        await group.stop()

    assert batches == [[0], [1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12]]


async def test_a_batch_in_flight_longer_than_the_overlap_time_gets_one_beside_it(table):
    pool, _ = table
    group, batches, release = held_batches(pool, overlap_after_seconds=0.05)
    group.start()
    try:
        first = asyncio.ensure_future(group.submit(0))
        await asyncio.sleep(0.01)
        later = [asyncio.ensure_future(group.submit(i)) for i in range(1, 6)]
        assert await asyncio.wait_for(asyncio.gather(*later), 2) == list(range(1, 6))  # first still held
        assert not first.done()
        release.set()
        assert await first == 0
    finally:
        release.set()
        await group.stop()

    assert batches == [[0], list(range(1, 6))]


# --- batched lookups ---------------------------------------------------------------------------


@pytest.fixture
async def values(table):
    """The scratch table with items 0..99, value = item + 1; a lookup divides by (value - 50), so
    looking up item 49 is a database error."""
    pool, name = table
    await pool.executemany(
        f"insert into {name} (item, value) values ($1, $2)", [(i, i + 1) for i in range(100)]
    )
    return pool, name


def lookups(pool, name, *, batches_in_flight_max=4, before_answer=None):
    """Looks items up in the scratch table, recording every batch of keys it was asked for."""
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

    batched = BatchedLookups(many, one, batch_size_max=30, batches_in_flight_max=batches_in_flight_max)
    return batched, asked


async def test_concurrent_lookups_share_queries_and_each_gets_its_own_value(values):
    pool, name = values
    batched, asked = lookups(pool, name, batches_in_flight_max=1)
    keys = [*range(48), *range(51, 100), 500, 7, 7]  # 500 is not there; 7 is asked for three times

    found = await asyncio.gather(*(batched.get(key) for key in keys))

    assert found == [*(k + 1 for k in range(48)), *(k + 1 for k in range(51, 100)), None, 8, 8]
    assert sorted(k for batch in asked for k in batch) == sorted({*keys})  # each key once
    assert [len(batch) for batch in asked] == [30, 30, 30, 8]  # 98 keys, 30 at most per lookup


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

    batched = BatchedLookups(many, one, batch_size_max=30, batches_in_flight_max=4)
    found = await asyncio.gather(*(batched.get(key) for key in range(5)), return_exceptions=True)

    assert all(isinstance(f, asyncpg.QueryCanceledError) for f in found)
    assert asked == [[0, 1, 2, 3, 4]]  # not five more queries against a database that is struggling


async def test_a_lookup_asked_for_after_a_write_sees_it_even_while_one_is_in_flight(values):
    pool, name = values
    queried, release = asyncio.Event(), asyncio.Event()

    async def hold_the_first_answer():
        if not queried.is_set():
            queried.set()
            await release.wait()

    batched, asked = lookups(pool, name, before_answer=hold_the_first_answer)

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
    release = asyncio.Event()
    batched, asked = lookups(pool, name, batches_in_flight_max=1, before_answer=release.wait)

    first = asyncio.ensure_future(batched.get(0))
    while not asked:
        await asyncio.sleep(0.001)
    later = [asyncio.ensure_future(batched.get(key)) for key in range(1, 21)]
    await asyncio.sleep(0.05)
    assert asked == [[0]]  # the one slot is taken: the later keys wait
    release.set()

    assert await asyncio.wait_for(asyncio.gather(first, *later), 10) == list(range(1, 22))
    assert asked == [[0], list(range(1, 21))]


async def test_a_request_that_goes_away_does_not_cancel_the_lookup_others_wait_for(values):
    pool, name = values
    release = asyncio.Event()
    batched, _ = lookups(pool, name, before_answer=release.wait)

    leaving, staying = asyncio.ensure_future(batched.get(3)), asyncio.ensure_future(batched.get(3))
    await asyncio.sleep(0.05)
    leaving.cancel()
    release.set()

    assert await asyncio.wait_for(staying, 10) == 4
    assert leaving.cancelled()
    await asyncio.wait_for(batched.wait_idle(), 10)


# --- purchases written as one pipelined batch --------------------------------------------------


def _postings_settled(how: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("konvert_purchase_batch_postings_total", {"how": how}) or 0.0


def _posting(services, member_id, purchase_id, cents):
    import msgspec

    from konvert.earning.model import PurchaseIn
    from konvert.earning.service import Posting, check_purchase

    body = {
        "purchase_id": purchase_id, "member_id": member_id, "partner": "webshop", "currency": "EUR",
        "occurred_at": "2026-01-01T10:00:00Z",
        "lines": [{"line_id": "1", "sku": "S", "category": "toys", "quantity": 1, "unit_price": cents}],
    }  # fmt: skip
    purchase = msgspec.convert(body, PurchaseIn)
    check_purchase(services, purchase)
    return Posting(purchase)


@pytest.fixture
async def tier_services(database_url, redis_url, redis_client):
    from konvert.program import parse_program
    from konvert.services import Services
    from tests.conftest import TEST_PROGRAM, make_settings

    program = parse_program(
        TEST_PROGRAM
        + '\n[tiers]\n[[tiers.levels]]\nname = "Bronze"\nmin_points = 0\n'
        + '[[tiers.levels]]\nname = "Silver"\nmin_points = 100\nmultiplier = 2\n'
    )
    services = await Services.open(make_settings(database_url, redis_url), program)
    yield services
    await services.close()


async def test_a_batch_carries_a_members_tier_from_one_purchase_to_the_next(tier_services, new_id):
    import msgspec

    from konvert.earning.service import write_purchases

    member = new_id("m")
    postings = [
        _posting(tier_services, member, new_id("p"), 10000),
        _posting(tier_services, member, new_id("p"), 1000),
    ]
    async with tier_services.pool.acquire() as conn, conn.transaction():
        settled = await write_purchases(tier_services, conn, postings)
    first, second = settled[0], settled[1]

    # The first purchase lifts the member to Silver, so the second already earns double.
    assert msgspec.json.decode(first.outcome.body)["points"] == 100
    second_body = msgspec.json.decode(second.outcome.body)
    assert second_body["points"] == 20
    assert {"kind": "tier", "ref": "Silver", "factor": "2"} in second_body["lines"][0]["rules"]
    row = await tier_services.pool.fetchrow(
        "select tier, tier_qualifying_points, points_available from members where member_id = $1", member
    )
    assert tuple(row) == ("Silver", 120, 120)


async def test_duplicates_within_one_batch_replay_or_conflict_alone(services, new_id):
    from konvert.earning.service import write_purchases
    from konvert.errors import IdempotencyConflict

    member, purchase_id = new_id("m"), new_id("p")
    original = _posting(services, member, purchase_id, 5000)
    same = _posting(services, member, purchase_id, 5000)
    different = _posting(services, member, purchase_id, 7000)
    other = _posting(services, member, new_id("p"), 1000)
    async with services.pool.acquire() as conn, conn.transaction():
        outcomes = await write_purchases(services, conn, [original, same, different, other])

    assert sorted(outcomes) == [0, 1, 2, 3]  # every posting settled in one round
    assert not outcomes[0].outcome.replayed
    assert outcomes[1].outcome.replayed and outcomes[1].outcome.body == outcomes[0].outcome.body
    assert isinstance(outcomes[2], IdempotencyConflict)
    assert not outcomes[3].outcome.replayed
    available = await services.pool.fetchval(
        "select points_available from members where member_id = $1", member
    )
    assert available == 60


async def test_a_batch_commits_without_a_transaction_of_its_own(services, new_id):
    """The batch's write statement commits by itself: once it returns, others see every row."""
    from konvert.earning.service import write_purchase_batch

    members = [new_id("m") for _ in range(3)]
    outcomes = await write_purchase_batch(
        services, [_posting(services, m, new_id("p"), 1000) for m in members]
    )

    assert [o.outcome.replayed for o in outcomes] == [False, False, False]
    rows = await services.pool.fetch(
        "select m.member_id, m.points_available, m.version, count(p.*) as purchases"
        " from members m join purchases p using (member_uid) where m.member_id = any($1::text[])"
        " group by m.member_id, m.points_available, m.version order by m.member_id",
        members,
    )
    assert [(r["points_available"], r["purchases"]) for r in rows] == [(10, 1)] * 3
    # Each outcome names the version its member reached, which the cache is invalidated with.
    assert sorted(o.version for o in outcomes) == sorted(r["version"] for r in rows)


async def test_a_purchase_id_taken_meanwhile_by_another_member_writes_nothing_of_its_round(
    tier_services, new_id
):
    """A's uncommitted purchase holds the id when batch B reads it as free. B's statement then
    waits for A and finds the id taken: B had carried the tier that purchase would have earned
    into the member's next purchase, so the statement aborts whole and B's postings are written
    one by one: the raced one is refused, the next earns at the tier the member really has."""
    import msgspec

    from konvert.earning.service import write_purchase_batch, write_purchases
    from konvert.errors import IdempotencyConflict

    services = tier_services
    alone_before = _postings_settled("alone")
    raced = new_id("p")
    owner, other = f"a-{new_id('m')}", f"b-{new_id('m')}"
    async with services.pool.acquire() as conn_a:
        tx_a = conn_a.transaction()
        await tx_a.start()
        await write_purchases(services, conn_a, [_posting(services, owner, raced, 1000)])
        # For `other`, `raced` (100 points) would lift it to Silver (x2) before its next purchase.
        postings = [
            _posting(services, other, raced, 10000),
            _posting(services, other, f"z-{new_id('p')}", 1000),
        ]
        batch_b = asyncio.create_task(write_purchase_batch(services, postings))
        await asyncio.sleep(0.5)  # B has read `raced` as free and waits on A's insert
        assert not batch_b.done()
        await tx_a.commit()
        refused, written = await batch_b

    assert isinstance(refused, IdempotencyConflict)
    assert msgspec.json.decode(written.outcome.body)["points"] == 10  # Bronze: x1
    row = await services.pool.fetchrow(
        "select tier, tier_qualifying_points, points_available from members where member_id = $1", other
    )
    assert tuple(row) == ("Bronze", 10, 10)
    assert _postings_settled("alone") - alone_before == 2  # what operators see in /metrics


async def test_a_posting_written_alone_that_races_another_member_for_its_id_is_refused(services, new_id):
    """The transaction-per-posting path meets the raced id too: it tries again once the other
    request committed, and answers 409 as for any reused id (not a 5xx)."""
    from konvert.earning.service import post_purchase, write_purchases
    from konvert.errors import IdempotencyConflict

    assert services.purchases is None  # so post_purchase writes alone
    raced = new_id("p")
    async with services.pool.acquire() as conn_a:
        tx_a = conn_a.transaction()
        await tx_a.start()
        await write_purchases(services, conn_a, [_posting(services, f"a-{new_id('m')}", raced, 1000)])
        alone = asyncio.create_task(
            post_purchase(services, _posting(services, f"b-{new_id('m')}", raced, 2000).purchase)
        )
        await asyncio.sleep(0.5)
        assert not alone.done()
        await tx_a.commit()
        with pytest.raises(IdempotencyConflict):
            await alone


async def test_a_round_that_fails_after_its_commit_keeps_what_it_wrote(services, new_id, monkeypatch):
    """A round commits its purchases, then loses its connection while looking up a replay. The
    committed posting still gets its own (first, not replayed) outcome and cache version; the
    rest is settled alone, where a replay invalidates the cache at the member's version."""
    from konvert.earning import store
    from konvert.earning.service import write_purchase_batch

    lookup = store.select_purchase_replay
    failures = []

    async def drops_once(conn, partner, purchase_id):
        if not failures:
            failures.append(purchase_id)
            raise ConnectionResetError("connection lost")  # a network failure: outside the machine's control
        return await lookup(conn, partner, purchase_id)

    monkeypatch.setattr(store, "select_purchase_replay", drops_once)
    member, purchase_id = new_id("m"), new_id("p")
    first, again = await write_purchase_batch(
        services,
        [_posting(services, member, purchase_id, 1000), _posting(services, member, purchase_id, 1000)],
    )

    assert failures == [purchase_id]
    version = await services.pool.fetchval("select version from members where member_id = $1", member)
    assert (first.outcome.replayed, first.version) == (False, version)
    assert (again.outcome.replayed, again.version) == (True, version)
    assert again.outcome.body == first.outcome.body


async def test_a_purchase_that_repays_a_refund_debt_is_written_alone_and_repays_it(services, new_id):
    from konvert.earning.model import RefundIn
    from konvert.earning.service import refund_purchase, write_purchase_batch
    from konvert.ledger.service import spend_points

    member, bought = new_id("m"), new_id("p")
    await write_purchase_batch(services, [_posting(services, member, bought, 1000)])  # 10 points, available
    await spend_points(services, member, 10, code="redeem", cause_type="test", cause_ref=bought, reason="t")
    await refund_purchase(services, bought, RefundIn(refund_id="r1", amount=1000))  # takes 10 back: a debt
    debt = await services.pool.fetchval("select points_debt from members where member_id = $1", member)
    assert debt == 10
    alone_before = _postings_settled("alone")

    (posted,) = await write_purchase_batch(
        services, [_posting(services, member, new_id("p"), 3000)]
    )  # 30 points

    assert _postings_settled("alone") - alone_before == 1
    row = await services.pool.fetchrow(
        """select m.points_available, m.points_debt, m.version,
                  (select sum(remaining) from lots l where l.member_uid = m.member_uid and l.state = 'available') as lots
           from members m where member_id = $1""",
        member,
    )
    # Repaid in the purchase's own transaction: the lots agree with the balance at once.
    assert (row["points_available"], row["points_debt"], row["lots"]) == (20, 0, 20)
    assert posted.version == row["version"]
