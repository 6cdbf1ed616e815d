"""Regression tests from the review of the money paths: each pinned a defect the review found
(first failing, then fixed): system accounts and rollbacks, tiers in group-committed batches,
refunds after expiry, bad input reaching PostgreSQL, replays, and the balance cache's protocol.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import time
from datetime import timedelta
from typing import Any

import asyncpg
import msgspec
import pytest
from litestar.testing import AsyncTestClient

from konvert import auth, composition
from konvert.app import create_app
from konvert.cache import BalanceCache
from konvert.earning import service as earning
from konvert.earning.model import PurchaseIn, RefundIn
from konvert.earning.refunds import refund_purchase
from konvert.errors import ConcurrentWrite
from konvert.idempotency import Outcome
from konvert.ledger.book import writing
from konvert.ledger.jobs import expire_due_lots
from konvert.program import parse_program
from konvert.redis_client import create_redis
from konvert.services import Services
from tests.conftest import TEST_PROGRAM, cached_entry, make_settings, run_job
from tests.integration.test_purchases import (
    batched_writes,
    held_before_commit,
    line,
    posting,
    purchase,
    until,
    until_waiting_for_locks,
)


async def _admin_key(database_url: str) -> str:
    conn = await asyncpg.connect(database_url)
    try:
        return (await auth.insert_key(conn, "review", ["admin"]))[0]
    finally:
        await conn.close()


@pytest.fixture
async def fresh_api(fresh_database_url, redis_url, program):
    """An app of its own on an empty, migrated database (system accounts not created yet)."""
    settings = make_settings(fresh_database_url, redis_url)
    headers = {"Authorization": f"Bearer {await _admin_key(fresh_database_url)}"}
    async with AsyncTestClient(create_app(settings, program)) as client:

        async def post(path: str, body: dict[str, Any] | None = None):
            return await client.post(path, json=body, headers=headers)

        client.post_json = post
        client.database_url = fresh_database_url
        yield client


# --- 1. system account ids cached from a rolled-back transaction ---------------------------


async def test_a_refused_first_adjustment_does_not_break_later_adjustments(fresh_api):
    refused = await fresh_api.post_json(
        "/v1/members/ann/adjustments", {"adjustment_id": "a1", "points": -10, "reason_code": "correction"}
    )
    assert (refused.status_code, refused.json()["code"]) == (409, "insufficient_points")

    credit = await fresh_api.post_json(
        "/v1/members/ann/adjustments", {"adjustment_id": "a2", "points": 10, "reason_code": "goodwill"}
    )
    assert credit.status_code == 201, credit.text


# --- 2. inputs that give 500 ---------------------------------------------------------------


async def test_a_refused_first_purchase_does_not_break_the_partners_later_purchases(fresh_api):
    lines = [line(str(i), 100_000, 10**12) for i in range(100)]  # total 10^19 > 2^63: refused
    refused = await fresh_api.post_json("/v1/purchases", purchase("ann", "p1", *lines))
    assert refused.status_code >= 400

    ok = await fresh_api.post_json("/v1/purchases", purchase("ann", "p2"))
    assert ok.status_code == 201, ok.text


async def test_a_purchase_whose_total_overflows_bigint_is_a_4xx(fresh_api):
    assert (await fresh_api.post_json("/v1/purchases", purchase("bob", "p0"))).status_code == 201
    lines = [line(str(i), 100_000, 10**12) for i in range(100)]  # total 10^19 > 2^63
    response = await fresh_api.post_json("/v1/purchases", purchase("ann", "p1", *lines))
    assert 400 <= response.status_code < 500, response.text


async def test_an_activity_cursor_beyond_bigint_is_a_4xx_not_500(client, admin_headers, post, new_id):
    member = new_id("m")
    assert (await post("/v1/purchases", purchase(member, new_id("p")))).status_code == 201
    cursor = base64.urlsafe_b64encode(b"t" + b"9" * 25).decode().rstrip("=")
    response = await client.get(f"/v1/members/{member}/activity", params={"cursor": cursor}, headers=admin_headers)
    assert 400 <= response.status_code < 500, response.text


async def test_a_purchase_at_the_start_of_year_one_is_a_4xx(fresh_api):
    assert (await fresh_api.post_json("/v1/purchases", purchase("bob", "p0"))).status_code == 201
    body = purchase("ann", "p1", occurred_at="0001-01-01T00:00:00+14:00")
    response = await fresh_api.post_json("/v1/purchases", body)
    assert 400 <= response.status_code < 500, response.text


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/purchases", purchase("ann", "p\u0000x")),
        ("/v1/members/ann/redemptions", {"redemption_id": "x1", "points": 1, "note": "a\u0000b"}),
        ("/v1/members/ann/adjustments", {"adjustment_id": "a\u0000", "points": 1, "reason_code": "goodwill"}),
    ],
    ids=["purchase_id", "redemption-note", "adjustment_id"],
)
async def test_a_nul_character_in_a_text_field_is_a_4xx(fresh_api, path, body):
    assert (await fresh_api.post_json("/v1/purchases", purchase("ann", "p0"))).status_code == 201
    response = await fresh_api.post_json(path, body)
    assert 400 <= response.status_code < 500, response.text


async def test_a_failed_first_redemption_does_not_break_later_redemptions(fresh_api):
    assert (await fresh_api.post_json("/v1/purchases", purchase("ann", "p0"))).status_code == 201
    failed = await fresh_api.post_json(
        "/v1/members/ann/redemptions", {"redemption_id": "x1", "points": 1, "note": "a\u0000"}
    )
    assert failed.status_code >= 400

    ok = await fresh_api.post_json("/v1/members/ann/redemptions", {"redemption_id": "x2", "points": 1})
    assert ok.status_code == 201, ok.text


# --- 3. idempotency ------------------------------------------------------------------------


async def test_concurrent_identical_adjustments_apply_once_and_all_get_the_replay(post, balance, new_id):
    member = new_id("m")
    body = {"adjustment_id": new_id("a"), "points": 100, "reason_code": "goodwill"}
    responses = await asyncio.gather(*(post(f"/v1/members/{member}/adjustments", body) for _ in range(10)))
    assert (await balance(member))["available"] == 100
    assert [r.status_code for r in responses] == [201] * 10, [r.text for r in responses if r.status_code != 201]


# --- 4. refund after expiry ----------------------------------------------------------------


async def test_refunding_a_purchase_whose_points_expired_does_not_take_them_again(
    post, balance, clock, services, new_id
):
    member, first = new_id("m"), new_id("p")
    assert (await post("/v1/purchases", purchase(member, first, line("1", 1, 10000)))).status_code == 201
    clock.advance(days=100)
    assert (await post("/v1/purchases", purchase(member, new_id("p"), line("1", 1, 10000)))).status_code == 201

    await run_job(expire_due_lots, services, services.clock() + timedelta(days=266))  # only the first lot
    assert (await balance(member))["available"] == 100

    refund = await post(f"/v1/purchases/{first}/refunds", {"refund_id": "r1", "amount": 10000})
    assert refund.status_code == 201, refund.text
    # The first purchase's 100 points are already gone (expired); the second purchase's stay.
    assert (await balance(member))["available"] == 100


# --- 5. tiers in the group-commit path -----------------------------------------------------

TIER_PROGRAM = (
    TEST_PROGRAM
    + """
[tiers]
window_days = 365
downgrade_grace_days = 0

[[tiers.levels]]
name = "Bronze"
min_points = 0

[[tiers.levels]]
name = "Silver"
min_points = 100
multiplier = 2
"""
)


@pytest.fixture
async def tier_services(database_url, redis_url, redis_client):
    """Services with tiers; their purchase batcher starts with the first posting."""
    services = await composition.open_services(make_settings(database_url, redis_url), parse_program(TIER_PROGRAM))
    yield services
    await services.close()


def _purchase_in(member: str, purchase_id: str, euros: int) -> PurchaseIn:
    return msgspec.convert(purchase(member, purchase_id, line("1", 1, euros * 100)), PurchaseIn)


def _posting(services: Services, member: str, purchase_id: str, euros: int) -> PurchaseIn:
    """The same, checked for write_purchases."""
    return posting(services, purchase(member, purchase_id, line("1", 1, euros * 100)))


async def _member_tier(services: Services, member: str) -> asyncpg.Record:
    return await services.pool.fetchrow(
        "select tier, tier_qualifying_points, points_available from members where member_id = $1", member
    )


async def test_a_retried_purchase_in_the_same_batch_does_not_raise_the_tier_of_its_neighbour(tier_services, new_id):
    member = new_id("m")
    first, second = f"a-{new_id('p')}", f"b-{new_id('p')}"
    await earning.post_purchase(tier_services, _purchase_in(member, first, 50))  # 50 points, Bronze

    # A checkout retries `first` (same body) while posting `second`: both land in one batch.
    replayed, posted = await asyncio.gather(
        earning.post_purchase(tier_services, _purchase_in(member, first, 50)),
        earning.post_purchase(tier_services, _purchase_in(member, second, 10)),
    )

    assert replayed.replayed
    # The member has 50 qualifying points, below Silver (100): the second purchase earns x1.
    assert msgspec.json.decode(posted.body)["points"] == 10


async def test_concurrent_batches_for_one_member_do_not_lose_a_tier_upgrade(tier_services, new_id):
    services = tier_services
    member = new_id("m")
    await earning.post_purchase(services, _purchase_in(member, new_id("p"), 50))  # 50 points, Bronze
    together, alone = batched_writes("together"), batched_writes("alone")

    # Batch A (uncommitted) makes the member Silver: 50 + 60 = 110 ...
    async with held_before_commit(services, [_posting(services, member, new_id("p"), 60)]):
        # ... while batch B, as the batcher writes it, waits for the member A holds.
        b = asyncio.ensure_future(earning.post_purchase(services, _purchase_in(member, new_id("p"), 10)))
        await until_waiting_for_locks(services.pool, 1)
        assert not b.done()
    outcome_b = await b

    row = await _member_tier(services, member)
    # B reads the member only once A committed: 10 EUR x 2 = 20, 130 qualifying points, Silver.
    assert msgspec.json.decode(outcome_b.body)["points"] == 20
    assert (row["tier"], row["tier_qualifying_points"]) == ("Silver", 130)
    # Locked before it read: B was written in its batch, never retried alone.
    assert (batched_writes("together") - together, batched_writes("alone") - alone) == (1, 0)


async def test_a_replay_in_a_batch_does_not_lock_members_out_of_order(tier_services, new_id):
    services = tier_services
    m1, m2 = f"a-{new_id('m')}", f"b-{new_id('m')}"
    old = new_id("p")
    await earning.post_purchase(services, _purchase_in(m1, old, 10))  # m1 first: the lower member_uid
    await earning.post_purchase(services, _purchase_in(m2, new_id("p"), 10))

    # Batch B holds m1 ...
    async with writing(services) as book_b:
        await book_b.lock(ids=[m1])
        # ... while batch A = [m1 replay, m2 new] locks its members: it must not hold m2 while it
        # waits for m1.
        batch_a = [_posting(services, m1, old, 10), _posting(services, m2, new_id("p"), 10)]
        a = asyncio.ensure_future(earning.write_purchases(services, batch_a))
        await until_waiting_for_locks(services.pool, 1)
        try:
            await asyncio.wait_for(book_b.lock(ids=[m2]), 10)  # B goes on to m2
        except asyncpg.DeadlockDetectedError:
            pytest.fail("batch B deadlocked with batch A")
    (results,) = await asyncio.gather(a, return_exceptions=True)

    assert not isinstance(results, asyncpg.DeadlockDetectedError), "batch A deadlocked with batch B"
    replayed, posted = results
    assert (replayed.replayed, posted.replayed) == (True, False)


async def test_batches_posting_one_purchase_id_for_different_members_do_not_deadlock(tier_services, new_id):
    """Two batches that both hold purchase ids the other posts (for other members: a client's
    mistake) insert them in one order, so one waits for the other instead of both for each other."""
    services = tier_services
    tag = new_id("t")
    x, w, y = f"a-{tag}", f"b-{tag}", f"c-{tag}"

    def postings(*pairs: tuple[str, str]) -> list[PurchaseIn]:
        return [_posting(services, f"{member}-{tag}", purchase_id, 10) for member, purchase_id in pairs]

    batch_a = postings(("a", x), ("b", w), ("c", y))  # by member, as the batcher sorts them
    batch_b = postings(("d", y), ("e", x))  # by member too: y comes first here
    # Another request holds w (uncommitted, and rolled back in the end): batch A inserts x, then waits for w ...
    async with held_before_commit(services, postings(("f", w))) as blocker:
        blocker.roll_back()
        a = asyncio.ensure_future(earning.write_purchases(services, batch_a))
        await until_waiting_for_locks(services.pool, 1)
        # ... while batch B takes y in its member order and then waits for A's x. Once w is free,
        # A would wait for B's y: a deadlock, unless both insert in purchase id order.
        b = asyncio.ensure_future(earning.write_purchases(services, batch_b))
        await until_waiting_for_locks(services.pool, 2)
    results = await asyncio.gather(a, b, return_exceptions=True)

    assert not any(isinstance(r, asyncpg.DeadlockDetectedError) for r in results), results
    # A wrote its three purchases; B found both of its ids taken and committed nothing.
    assert isinstance(results[0], list) and [type(o) for o in results[0]] == [Outcome] * 3, results[0]
    assert isinstance(results[1], ConcurrentWrite), results[1]
    owners = await services.pool.fetch(
        "select purchase_id, m.member_id from purchases p join members m using (member_uid)"
        " where purchase_id = any($1::text[]) order by purchase_id",
        [x, w, y],
    )
    assert [(r["purchase_id"], r["member_id"]) for r in owners] == [(x, f"a-{tag}"), (w, f"b-{tag}"), (y, f"c-{tag}")]
    created = await services.pool.fetchval(
        "select count(*) from members where member_id = any($1::text[])", [f"{m}-{tag}" for m in "def"]
    )
    assert created == 0  # B's members and the rolled-back blocker's were never created


async def test_a_refund_locks_the_member_before_the_purchase(tier_services, new_id):
    """An erasure locks the member, then rewrites its purchases; a refund that locked the
    purchase first and then waited for the member could deadlock with it."""
    services = tier_services
    member, purchase_id = new_id("m"), new_id("p")
    await earning.post_purchase(services, _purchase_in(member, purchase_id, 50))
    refund_in = msgspec.convert({"refund_id": "r1", "amount": 1000}, RefundIn)
    async with services.pool.acquire() as holder:
        held = holder.transaction()
        await held.start()
        await holder.execute("select from members where member_id = $1 for update", member)
        refund = asyncio.create_task(refund_purchase(services, purchase_id, refund_in))
        try:
            await until(  # the refund waits for the member
                services.pool,
                "select count(*) > 0 from pg_stat_activity where datname = current_database()"
                " and wait_event_type = 'Lock' and pid <> $1",
                holder.get_server_pid(),
            )
            # While the refund waits for the member, it holds no lock on the purchase.
            async with services.pool.acquire() as probe, probe.transaction():
                await probe.execute("select from purchases where purchase_id = $1 for update nowait", purchase_id)
        finally:
            await held.rollback()
            outcome = await refund
    assert msgspec.json.decode(outcome.body)["points"] == 10


class _OnOneConnection:
    """A pool that lends only ``conn``: a use case's transaction becomes a savepoint of the
    caller's, so the caller can look at what it did before it commits."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    @contextlib.asynccontextmanager
    async def acquire(self):
        yield self._conn


async def test_a_purchase_updates_its_member_in_place(tier_services, new_id):
    """A purchase that leaves its member's tier as it was changes no indexed column of the member
    (tier_evaluated_at is the daily tier job's), so PostgreSQL rewrites the row on its page
    without new index entries (a HOT update): at 1,000,000 members each purchase wrote 0.7 fewer
    full pages to the WAL (sql/0010)."""
    services = tier_services
    member = new_id("m")
    await earning.post_purchase(services, _purchase_in(member, new_id("p"), 100))  # Silver from here on
    # This backend's counts of updates not yet reported (earlier transactions' included).
    counts = (
        "select pg_stat_get_xact_tuples_updated('members'::regclass) as updated,"
        " pg_stat_get_xact_tuples_hot_updated('members'::regclass) as hot"
    )
    purchase_in = _posting(services, member, new_id("p"), 10)
    async with services.pool.acquire() as conn, conn.transaction():
        before = await conn.fetchrow(counts)
        on_conn = dataclasses.replace(services, pool=_OnOneConnection(conn))
        written = await earning.write_purchases(on_conn, [purchase_in])
        after = await conn.fetchrow(counts)
        member_row = await conn.fetchrow("select tier, tier_evaluated_at from members where member_id = $1", member)
    assert [type(o) for o in written] == [Outcome]
    assert (after["updated"] - before["updated"], after["hot"] - before["hot"]) == (1, 1)
    assert (member_row["tier"], member_row["tier_evaluated_at"]) == ("Silver", None)


async def test_a_purchase_whose_member_lacks_the_account_writes_nothing(tier_services, new_id):
    """Without foreign keys, nothing but the statement itself stops a purchase written without
    its earn transfer: a member missing the account to credit fails it whole."""
    services = tier_services
    member = new_id("m")
    await earning.post_purchase(services, _purchase_in(member, new_id("p"), 10))
    before = await _member_tier(services, member)
    await services.pool.execute(
        "update accounts set name = 'gone:' || name where name in ('pending', 'available')"
        " and member_uid = (select member_uid from members where member_id = $1)",
        member,
    )
    purchase_id = new_id("p")
    with pytest.raises(asyncpg.NotNullViolationError):
        await earning.write_purchases(services, [_posting(services, member, purchase_id, 10)])
    assert await services.pool.fetchval("select count(*) from purchases where purchase_id = $1", purchase_id) == 0
    assert await _member_tier(services, member) == before


async def test_a_purchase_locks_no_account(tier_services, new_id):
    """Every earn transfer debits the partner's one "issued" account. Its foreign key checks used
    to lock that row (FOR KEY SHARE) in every purchase, so all concurrent purchases shared a lock
    on one row, and each locked its member's account too (sql/0011). A transaction holding
    those rows no longer holds up a purchase."""
    services = tier_services
    member = new_id("m")
    await earning.post_purchase(services, _purchase_in(member, new_id("p"), 10))  # the accounts exist
    async with services.pool.acquire() as holder:
        held = holder.transaction()
        await held.start()
        locked = await holder.fetch(
            "select a.account_id from accounts a join members m using (member_uid) where m.member_id = $1"
            " for update of a",
            member,
        )
        locked += await holder.fetch("select account_id from system_accounts where name = 'issued:webshop' for update")
        assert len(locked) == 5  # the member's four and the partner's
        posted = asyncio.create_task(earning.post_purchase(services, _purchase_in(member, new_id("p"), 10)))
        try:
            done, _ = await asyncio.wait({posted}, timeout=5)
            assert posted in done, "the purchase waited for a lock on an account"
        finally:
            await held.rollback()
            outcome = await posted
    assert msgspec.json.decode(outcome.body)["points"] == 10


# --- 6. Redis: the cache's connection and a Redis that does not answer ----------------------


class FakeRedis:
    """A RESP2 server (it refuses HELLO, as an old Redis does) that answers AUTH slowly and MGET
    with a cached balance naming the database the connection is on; counts its connections."""

    def __init__(self, auth_delay: float = 0.0, silent: bool = False) -> None:
        self.auth_delay, self.silent = auth_delay, silent
        self.server: asyncio.AbstractServer | None = None
        self.connections = 0

    async def __aenter__(self) -> FakeRedis:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import hiredis

        self.connections += 1
        parser, db = hiredis.Reader(), b"0"
        try:
            while data := await reader.read(65536):
                if self.silent:
                    continue  # a black hole: accepts, never answers
                parser.feed(data)
                while (command := parser.gets()) is not False:
                    name = command[0].upper()
                    if name == b"HELLO":
                        writer.write(b"-ERR unknown command 'HELLO'\r\n")
                    elif name == b"AUTH":
                        await asyncio.sleep(self.auth_delay)
                        writer.write(b"+OK\r\n")
                    elif name == b"SELECT":
                        db = command[1]
                        writer.write(b"+OK\r\n")
                    elif name == b"MGET":
                        entry = b"1|db" + db
                        writer.write(b"*%d\r\n" % (len(command) - 1))
                        writer.write(b"$%d\r\n%s\r\n" % (len(entry), entry) * (len(command) - 1))
                    else:
                        writer.write(b"+OK\r\n")
                    await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


async def test_concurrent_cached_reads_share_one_connection_on_the_urls_database(database_url):
    """Balance reads that arrive while the cache's connection authenticates share its pipeline,
    and every one of them runs on the URL's database."""
    async with FakeRedis(auth_delay=0.2) as fake:
        url = f"redis://user:secret@127.0.0.1:{fake.port}/5"
        settings = make_settings(database_url, url, redis_timeout_seconds=2.0)
        client = create_redis(settings.redis_url, settings.redis_timeout_seconds)
        cache = BalanceCache.for_settings(client, settings)
        try:
            found = await asyncio.gather(*(cache.get(f"m{i}") for i in range(10)))
            assert found == [b"db5"] * 10
            assert fake.connections == 1
        finally:
            await cache.aclose()
            await client.aclose()


async def test_writes_do_not_wait_for_a_silent_redis_once_per_member(database_url, program, new_id):
    async with FakeRedis(silent=True) as fake:
        settings = make_settings(database_url, f"redis://127.0.0.1:{fake.port}/0", redis_timeout_seconds=0.2)
        services = await composition.open_services(settings, program)
        try:
            postings = [msgspec.convert(purchase(new_id("m"), new_id("p")), PurchaseIn) for _ in range(20)]
            started = time.monotonic()
            await asyncio.gather(*(earning.post_purchase(services, p) for p in postings))
            elapsed = time.monotonic() - started
        finally:
            await services.close()
    # A batch's invalidations share one round trip: a dead Redis costs a batch one timeout, not
    # one per write.
    assert elapsed < 1.0, f"20 purchases took {elapsed:.1f}s with Redis not answering"


@pytest.mark.parametrize("scripts_forgotten", [False, True])
async def test_a_batch_s_invalidations_leave_each_member_s_latest_version(
    redis_client, settings, new_id, scripts_forgotten
):
    cache = BalanceCache.for_settings(redis_client, settings)
    first, second, third = (new_id("m") for _ in range(3))
    try:
        await cache.put_many([(first, 3, b'{"version": 3}')])
        await cache.put_many([(third, 9, b'{"version": 9}')])  # newer than the write below
        if scripts_forgotten:
            await redis_client.script_flush()

        # A batch wrote twice to the first member, once to the second.
        await cache.invalidate_many([(first, 5), (second, 2), (first, 4), (third, 8)])

        assert await cached_entry(redis_client, first) == (5, None)
        assert await cached_entry(redis_client, second) == (2, None)
        assert await cached_entry(redis_client, third) == (9, b'{"version": 9}')
        # A slower reader's older balance stays out; the written version's goes in.
        await cache.put_many([(first, 4, b'{"version": 4}')])
        assert await cache.get(first) is None
        await cache.put_many([(first, 5, b'{"version": 5}')])
        assert await cache.get(first) == b'{"version": 5}'
    finally:
        await cache.aclose()


async def test_a_write_whose_tombstone_failed_still_keeps_an_older_balance_out(redis_client, settings, new_id):
    writer = BalanceCache.for_settings(redis_client, settings)  # the process that wrote
    reader = BalanceCache.for_settings(redis_client, settings)  # another worker, serving reads
    member = new_id("m")
    try:
        # The reader read version 1 from PostgreSQL just before the write committed version 2.
        # The writer's breaker is open after a transient Redis hiccup: its tombstone must be
        # written all the same ...
        writer._skip_until = time.monotonic() + 1.0
        await writer.invalidate_many([(member, 2)])
        # ... then the slower reader puts what it read, and it must never be served.
        await reader.put_many([(member, 1, b'{"available": 0, "version": 1}')])
        assert await reader.get(member) is None, "a balance older than a committed write is served"
    finally:
        await writer.aclose()
        await reader.aclose()
