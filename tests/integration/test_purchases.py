"""Purchases, refunds, idempotency, vesting and balances against real PostgreSQL and Redis.

The test program (conftest.TEST_PROGRAM): 1 point per EUR, books x2, gift cards excluded,
return window 14 days, negative balances allowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest import mock

import asyncpg
import msgspec
import pytest
from prometheus_client import REGISTRY

from konvert.earning import store as earning_store
from konvert.earning.model import PurchaseIn
from konvert.earning.service import check_purchase, write_purchases
from konvert.errors import KonvertError
from konvert.idempotency import Outcome
from konvert.ledger.balances import BalanceReads, read_balance
from konvert.ledger.jobs import vest_due_lots
from konvert.services import Services
from tests.conftest import balance_key, cached_available, cached_entry, run_job, spend_points

NOW = datetime.now(UTC)
# Older than the 14-day return window: the points are available at once.
SETTLED = (NOW - timedelta(days=30)).isoformat()
RECENT = (NOW - timedelta(minutes=1)).isoformat()


def line(line_id: str, quantity: int, unit_price: int, category: str = "toys", sku: str = "SKU") -> dict[str, Any]:
    return {
        "line_id": line_id,
        "sku": sku,
        "category": category,
        "quantity": quantity,
        "unit_price": unit_price,
    }


def purchase(
    member_id: str, purchase_id: str, *lines: dict[str, Any], occurred_at: str = SETTLED, **extra: Any
) -> dict[str, Any]:
    return {
        "purchase_id": purchase_id,
        "member_id": member_id,
        "partner": "webshop",
        "currency": "EUR",
        "occurred_at": occurred_at,
        "lines": list(lines) or [line("1", 1, 10000)],
        **extra,
    }


# --- helpers shared with test_batching, test_regressions and test_audit ---------------------


def posting(services: Services, body: dict[str, Any]) -> PurchaseIn:
    """A purchase as write_purchases takes it: validated, and checked as post_purchase would."""
    purchase_in = msgspec.convert(body, PurchaseIn)
    check_purchase(services, purchase_in)
    return purchase_in


class HeldWrite:
    """A write_purchases held open after it recorded its purchases (see ``held_before_commit``)."""

    task: asyncio.Task[list[Outcome | KonvertError]]
    rolling_back = False

    def roll_back(self) -> None:
        """At the end of the block, roll back instead of committing."""
        self.rolling_back = True


class _RolledBack(Exception):
    pass


@contextlib.asynccontextmanager
async def held_before_commit(services: Services, postings: list[PurchaseIn]) -> AsyncIterator[HeldWrite]:
    """``write_purchases(services, postings)`` paused after it recorded its purchases, before its
    commit: inside the block its members, lots and purchase ids are written and locked, not
    committed. At the end of the block it commits (or rolls back); ``held.task`` has its outcome.
    At least one of the postings must be new (a batch of replays records nothing)."""
    real_insert = earning_store.insert_purchases
    recorded, release = asyncio.Event(), asyncio.Event()
    held = HeldWrite()

    async def insert_and_hold(conn: asyncpg.Connection, rows: list[earning_store.PurchaseRow]) -> int:
        inserted = await real_insert(conn, rows)
        recorded.set()
        await release.wait()
        if held.rolling_back:
            raise _RolledBack
        return inserted

    # Only this write is held: the patch is gone once it has recorded its purchases.
    with mock.patch.object(earning_store, "insert_purchases", insert_and_hold):
        held.task = asyncio.create_task(write_purchases(services, postings))
        waiting = asyncio.ensure_future(recorded.wait())
        await asyncio.wait({held.task, waiting}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if held.task.done():
            held.task.result()  # it failed before recording anything: raise its error here
        assert recorded.is_set(), "the held write never recorded its purchases"
    try:
        yield held
    finally:
        release.set()
        await asyncio.gather(held.task, return_exceptions=True)


async def until(pool: asyncpg.Pool, query: str, *args: object, within_seconds: float = 10.0) -> None:
    """Until ``query`` is true. Each look is a transaction of its own: within one, PostgreSQL
    keeps showing the pg_stat_activity it saw first."""
    deadline = time.monotonic() + within_seconds
    while not await pool.fetchval(query, *args):
        assert time.monotonic() < deadline, f"never true: {query} {args}"
        await asyncio.sleep(0.01)


async def until_waiting_for_locks(pool: asyncpg.Pool, count: int) -> None:
    """Until ``count`` backends of this database wait for a lock (a row, a purchase id)."""
    await until(
        pool,
        "select count(*) >= $1 from pg_stat_activity where datname = current_database() and wait_event_type = 'Lock'",
        count,
    )


def batched_writes(how: str) -> float:
    """konvert_batched_writes_total{how}: group-committed writes, "together" or "alone"."""
    return REGISTRY.get_sample_value("konvert_batched_writes_total", {"how": how}) or 0.0


@pytest.fixture
async def transfers_of(database_url):
    async def transfers_of(member_id: str) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(database_url)
        try:
            return await conn.fetch(
                """
                select t.code, t.amount from transfers t join members m using (member_uid)
                where m.member_id = $1 order by t.transfer_id
                """,
                member_id,
            )
        finally:
            await conn.close()

    return transfers_of


# --- earning -------------------------------------------------------------------------------


async def test_purchase_earns_points_per_line_with_the_rules_applied(post, balance, new_id):
    member = new_id("m")
    body = purchase(
        member,
        new_id("p"),
        line("a", 2, 1299, "books"),
        line("b", 1, 10000),
        line("c", 1, 5000, "gift-cards"),
    )

    response = await post("/v1/purchases", body)

    assert response.status_code == 201, response.text
    result = response.json()
    # 25.98 EUR of books x2 = 51.96 -> 51 (floor per line); 100 EUR of toys -> 100; gift cards -> 0.
    assert [(line["line_id"], line["points"]) for line in result["lines"]] == [("a", 51), ("b", 100), ("c", 0)]
    assert result["points"] == 151
    assert result["status"] == "available"
    kinds = [rule["kind"] for rule in result["lines"][0]["rules"]]
    assert kinds == ["rate", "category", "rounding"]
    assert result["lines"][2]["rules"] == [{"kind": "excluded", "ref": "gift-cards"}]
    assert "idempotent-replayed" not in response.headers
    assert (await balance(member))["available"] == 151
    assert (await balance(member))["lifetime_earned"] == 151


async def test_shipping_and_tax_earn_nothing(post, new_id):
    body = purchase(new_id("m"), new_id("p"), line("a", 1, 1000), shipping=5000, tax=2000)
    response = await post("/v1/purchases", body)
    assert response.json()["points"] == 10


async def test_preview_computes_the_same_points_and_writes_nothing(client, admin_headers, post, new_id):
    member = new_id("m")
    body = purchase(member, new_id("p"), line("a", 2, 1299, "books"), line("b", 1, 10000))

    preview = await post("/v1/purchases/preview", body)

    assert preview.status_code == 200
    assert preview.json()["points"] == 151
    missing = await client.get(f"/v1/members/{member}/balance", headers=admin_headers)
    assert missing.status_code == 404
    assert missing.json()["code"] == "member_not_found"
    posted = await post("/v1/purchases", body)
    assert posted.json()["lines"] == preview.json()["lines"]


async def test_unknown_partner_and_currency_are_refused_and_write_nothing(client, admin_headers, post, new_id):
    member = new_id("m")
    unknown_partner = await post("/v1/purchases", purchase(member, new_id("p"), partner="nowhere"))
    unknown_currency = await post("/v1/purchases", purchase(member, new_id("p"), currency="JPY"))
    assert (unknown_partner.status_code, unknown_partner.json()["code"]) == (422, "unknown_partner")
    assert (unknown_currency.status_code, unknown_currency.json()["code"]) == (422, "unsupported_currency")
    assert (await client.get(f"/v1/members/{member}/balance", headers=admin_headers)).status_code == 404


async def test_purchase_from_the_future_is_refused(post, new_id):
    body = purchase(new_id("m"), new_id("p"), occurred_at=(NOW + timedelta(days=2)).isoformat())
    response = await post("/v1/purchases", body)
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "occurred_at"


# --- idempotency ---------------------------------------------------------------------------


async def test_concurrent_balance_reads_that_miss_the_cache_share_queries_and_get_their_own_balance(
    client, post, balance, redis_client, admin_headers, new_id
):
    members = [new_id("m") for _ in range(24)]
    for n, member in enumerate(members):
        assert (
            await post("/v1/purchases", purchase(member, new_id("p"), line("1", 1, 1000 * (n + 1))))
        ).status_code == 201
    expected = {member: await balance(member) for member in members}
    services = client.app.state.services
    await services.cache.wait_filled()  # no fill of those reads lands after the delete
    await redis_client.delete(*(balance_key(member) for member in members))
    lookups = services.shared(BalanceReads).lookups
    # The app's pool at full size first: requests that each wait for a new PostgreSQL connection
    # (their API key is looked up first) would reach the balance lookup spread over tens of
    # milliseconds on a loaded machine, which is not what this test is about.
    pool = services.pool
    await asyncio.gather(*(pool.fetchval("select 1") for _ in range(pool.get_max_size())))
    # Concurrent for certain: a connection each, opened first, every request written in one
    # turn of the loop (a pooled HTTP client may have to reconnect some and send them late).
    connections = [await asyncio.open_connection(client.base_url.host, client.base_url.port) for _ in members]
    batches_before, keys_before = lookups.batches, lookups.keys_looked_up

    try:
        for (_, writer), member in zip(connections, members, strict=True):
            writer.write(
                f"GET /v1/members/{member}/balance HTTP/1.1\r\nhost: test\r\n"
                f"authorization: {admin_headers['Authorization']}\r\nconnection: close\r\n\r\n".encode()
            )
        responses = await asyncio.wait_for(asyncio.gather(*(reader.read() for reader, _ in connections)), 30)
    finally:
        for _, writer in connections:
            writer.close()
        await asyncio.gather(*(writer.wait_closed() for _, writer in connections), return_exceptions=True)

    assert all(response.startswith(b"HTTP/1.1 200 ") for response in responses)
    read = [msgspec.json.decode(response.split(b"\r\n\r\n", 1)[1]) for response in responses]
    assert dict(zip(members, read, strict=True)) == expected
    assert len({b["available"] + b["pending"] for b in read}) == len(members)  # all different
    assert lookups.keys_looked_up - keys_before == len(members)
    assert lookups.batches - batches_before <= len(members) // 2


async def test_replay_returns_the_original_response_and_credits_once(post, balance, transfers_of, new_id):
    member = new_id("m")
    body = purchase(member, new_id("p"))
    first = await post("/v1/purchases", body)
    replay = await post("/v1/purchases", body)

    assert replay.status_code == first.status_code == 201
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == first.content
    assert (await balance(member))["available"] == 100
    assert [t["code"] for t in await transfers_of(member)] == ["earn"]


async def test_same_purchase_id_with_a_different_body_is_a_conflict(post, balance, new_id):
    member = new_id("m")
    purchase_id = new_id("p")
    await post("/v1/purchases", purchase(member, purchase_id))

    conflict = await post("/v1/purchases", purchase(member, purchase_id, line("1", 2, 10000)))

    assert conflict.status_code == 409
    assert conflict.json()["code"] == "idempotency_conflict"
    assert (await balance(member))["available"] == 100


async def test_a_purchase_id_posted_again_for_a_new_member_is_a_conflict_and_creates_no_member(
    client, admin_headers, post, balance, services, new_id
):
    owner, newcomer = new_id("m"), new_id("m")
    purchase_id = new_id("p")
    assert (await post("/v1/purchases", purchase(owner, purchase_id))).status_code == 201

    conflict = await post("/v1/purchases", purchase(newcomer, purchase_id))

    assert (conflict.status_code, conflict.json()["code"]) == (409, "idempotency_conflict")
    missing = await client.get(f"/v1/members/{newcomer}/balance", headers=admin_headers)
    assert (missing.status_code, missing.json()["code"]) == (404, "member_not_found")
    assert await services.pool.fetchval("select count(*) from members where member_id = $1", newcomer) == 0
    assert (await balance(owner))["available"] == 100


async def test_a_batch_with_a_conflicting_posting_for_a_new_member_records_the_others_and_creates_not_that_member(
    post, balance, services, new_id
):
    from konvert.errors import IdempotencyConflict

    owner, taken = new_id("m"), new_id("p")
    assert (await post("/v1/purchases", purchase(owner, taken))).status_code == 201
    tag = new_id("t")
    newcomers = [f"{tag}-{n}" for n in ("a", "b", "c", "d")]  # in member order, as the batcher sorts
    conflicting = newcomers[1]
    postings = [
        posting(services, purchase(member, taken if member == conflicting else new_id("p"))) for member in newcomers
    ]

    outcomes = await write_purchases(services, postings)

    assert isinstance(outcomes[1], IdempotencyConflict)
    recorded = [outcomes[i] for i in (0, 2, 3)]
    assert all(isinstance(o, Outcome) and not o.replayed for o in recorded), outcomes
    assert [msgspec.json.decode(o.body)["member_id"] for o in recorded] == [newcomers[i] for i in (0, 2, 3)]
    for member in (newcomers[0], newcomers[2], newcomers[3]):
        assert (await balance(member))["available"] == 100
    assert await services.pool.fetchval("select count(*) from members where member_id = $1", conflicting) == 0
    owners = await services.pool.fetch(
        "select m.member_id from purchases p join members m using (member_uid) where p.purchase_id = $1", taken
    )
    assert [r["member_id"] for r in owners] == [owner]


async def test_purchase_ids_are_unique_per_partner(post, balance, new_id):
    member = new_id("m")
    purchase_id = new_id("p")
    await post("/v1/purchases", purchase(member, purchase_id))
    other_partner = await post("/v1/purchases", purchase(member, purchase_id, partner="store-berlin"))
    assert other_partner.status_code == 201
    assert "idempotent-replayed" not in other_partner.headers
    assert (await balance(member))["available"] == 200


async def test_fifty_concurrent_duplicates_apply_once(post, balance, transfers_of, new_id):
    member = new_id("m")
    body = purchase(member, new_id("p"), line("1", 3, 3333))

    responses = await asyncio.gather(*(post("/v1/purchases", body) for _ in range(50)))

    assert {r.status_code for r in responses} == {201}
    assert sum("idempotent-replayed" not in r.headers for r in responses) == 1
    assert len({r.content for r in responses}) == 1
    assert (await balance(member))["available"] == 99
    assert [t["code"] for t in await transfers_of(member)] == ["earn"]


async def test_concurrent_first_purchases_of_one_member_create_it_once(post, balance, new_id):
    member = new_id("m")
    responses = await asyncio.gather(*(post("/v1/purchases", purchase(member, new_id("p"))) for _ in range(20)))
    assert {r.status_code for r in responses} == {201}
    assert (await balance(member))["available"] == 2000


# --- vesting -------------------------------------------------------------------------------


async def test_points_are_pending_in_the_return_window_then_vest(
    client, admin_headers, post, balance, services, new_id
):
    member = new_id("m")
    response = await post("/v1/purchases", purchase(member, new_id("p"), occurred_at=RECENT))
    assert response.json()["status"] == "pending"
    before = await balance(member)
    assert (before["available"], before["pending"]) == (0, 100)

    await run_job(vest_due_lots, services, NOW + timedelta(days=13))
    assert (await balance(member))["pending"] == 100  # still inside the window
    assert await run_job(vest_due_lots, services, NOW + timedelta(days=15)) >= 1

    after = await balance(member)
    assert (after["available"], after["pending"], after["lifetime_earned"]) == (100, 0, 100)
    activity = (await client.get(f"/v1/members/{member}/activity", headers=admin_headers)).json()["items"]
    assert activity[0]["code"] == "vest"
    assert (activity[0]["bucket"], activity[0]["from_bucket"], activity[0]["delta"]) == (
        "available",
        "pending",
        0,
    )


async def test_vesting_twice_at_once_moves_points_once(post, balance, services, new_id):
    member = new_id("m")
    await post("/v1/purchases", purchase(member, new_id("p"), occurred_at=RECENT))
    later = NOW + timedelta(days=15)
    await asyncio.gather(vest_due_lots(services, now=later), vest_due_lots(services, now=later))
    assert (await balance(member))["available"] == 100


async def test_vesting_passes_over_a_member_another_transaction_holds(post, balance, services, new_id, caplog):
    held, free = new_id("m"), new_id("m")
    for member in (held, free):
        await post("/v1/purchases", purchase(member, new_id("p"), occurred_at=RECENT))
    later = NOW + timedelta(days=15)
    async with services.pool.acquire() as conn, conn.transaction():
        await conn.execute("select 1 from members where member_id = $1 for update", held)
        # A purchase, or another process's job, holds the member: vesting goes on without it.
        while await asyncio.wait_for(vest_due_lots(services, now=later), 10):
            pass
        during = [(await balance(m))["available"] for m in (held, free)]
    assert during == [0, 100]
    await vest_due_lots(services, now=later)
    assert (await balance(held))["available"] == 100
    # Vested by the batch's one statement, not by the one-by-one fallback.
    assert not any("batch failed" in r.getMessage() for r in caplog.records)


async def test_vesting_repays_a_refund_debt_from_the_points_it_makes_available(post, balance, services, new_id):
    member, settled = new_id("m"), new_id("p")
    await post("/v1/purchases", purchase(member, settled))  # 100 points, available at once
    await post("/v1/purchases", purchase(member, new_id("p"), occurred_at=RECENT))  # 100 pending
    await spend_points(services, member, 100, code="redeem", cause_type="test", cause_ref=settled, reason="t")
    refund = await post(f"/v1/purchases/{settled}/refunds", {"refund_id": "r1", "amount": 10000})
    assert refund.json()["points"] == 100  # spent already: a debt of 100

    await vest_due_lots(services, now=NOW + timedelta(days=15))

    row = await services.pool.fetchrow(
        """select m.points_available, m.points_pending, m.points_debt,
                  (select sum(remaining) from lots l where l.member_uid = m.member_uid and l.state = 'available') as lots
           from members m where member_id = $1""",
        member,
    )
    assert (row["points_available"], row["points_pending"], row["points_debt"], row["lots"]) == (0, 0, 0, 0)
    assert (await balance(member))["available"] == 0


async def test_a_member_that_fails_to_vest_holds_up_no_one_else(post, balance, services, new_id, caplog, monkeypatch):
    from konvert.ledger import jobs as ledger_jobs

    broken, fine = new_id("m"), new_id("m")
    for member in (broken, fine):
        await post("/v1/purchases", purchase(member, new_id("p"), occurred_at=RECENT))
    # A member whose pending account cannot be found: the batch's one statement fails for it.
    hide = "update accounts set name = $2 where name = $3 and member_uid = (select member_uid from members where member_id = $1)"
    await services.pool.execute(hide, broken, "pending-hidden", "pending")
    later = NOW + timedelta(days=15)
    try:
        # Until nothing more vests: other tests' lots fall due too, maybe more than a batch.
        while await vest_due_lots(services, now=later):
            pass
        assert [(await balance(m))["available"] for m in (broken, fine)] == [0, 100]
        assert any("vesting batch failed" in r.getMessage() for r in caplog.records)
    finally:
        await services.pool.execute(hide, broken, "pending", "pending-hidden")
    # The member that failed is passed over for a while (its lots would fail every batch) ...
    caplog.clear()
    while await vest_due_lots(services, now=later):
        pass
    assert (await balance(broken))["available"] == 0
    assert not any("batch failed" in r.getMessage() for r in caplog.records)
    # ... and then tried again.
    monkeypatch.setattr(ledger_jobs, "RETRY_FAILED_MEMBERS_AFTER_SECONDS", 0.0)
    await vest_due_lots(services, now=later)
    assert (await balance(broken))["available"] == 100


# --- refunds -------------------------------------------------------------------------------


async def test_partial_refunds_by_line_claw_back_exactly_what_was_earned(post, balance, new_id):
    member = new_id("m")
    purchase_id = new_id("p")
    await post("/v1/purchases", purchase(member, purchase_id, line("a", 3, 1000, "books"), line("b", 1, 550)))
    assert (await balance(member))["available"] == 65  # 30 EUR books x2 = 60, 5.50 EUR -> 5

    first = await post(
        f"/v1/purchases/{purchase_id}/refunds",
        {"refund_id": "r1", "lines": [{"line_id": "a", "quantity": 1}]},
    )
    assert first.status_code == 201, first.text
    assert (first.json()["points"], first.json()["amount"]) == (20, 1000)
    assert (await balance(member))["available"] == 45

    rest = await post(
        f"/v1/purchases/{purchase_id}/refunds",
        {"refund_id": "r2", "lines": [{"line_id": "a", "quantity": 2}, {"line_id": "b", "quantity": 1}]},
    )
    assert rest.json()["points"] == 45
    assert rest.json()["refundable_amount"] == 0
    final = await balance(member)
    assert (final["available"], final["lifetime_earned"]) == (0, 0)

    too_much = await post(
        f"/v1/purchases/{purchase_id}/refunds",
        {"refund_id": "r3", "lines": [{"line_id": "b", "quantity": 1}]},
    )
    assert (too_much.status_code, too_much.json()["code"]) == (422, "refund_exceeds_purchase")


async def test_refund_by_amount_is_proportional_and_sums_to_the_purchase(post, balance, new_id):
    member = new_id("m")
    purchase_id = new_id("p")
    await post("/v1/purchases", purchase(member, purchase_id, line("a", 1, 10000)))

    part = await post(f"/v1/purchases/{purchase_id}/refunds", {"refund_id": "r1", "amount": 2550})
    assert part.json()["points"] == 25  # floor(100 * 2550 / 10000)
    rest = await post(f"/v1/purchases/{purchase_id}/refunds", {"refund_id": "r2", "amount": 7450})
    assert rest.json()["points"] == 75
    assert (await balance(member))["available"] == 0


async def test_refund_beyond_the_purchase_is_refused_and_changes_nothing(client, admin_headers, post, balance, new_id):
    member = new_id("m")
    purchase_id = new_id("p")
    await post("/v1/purchases", purchase(member, purchase_id, line("a", 1, 10000), shipping=500))
    before_activity = (await client.get(f"/v1/members/{member}/activity", headers=admin_headers)).json()

    refused = await post(f"/v1/purchases/{purchase_id}/refunds", {"refund_id": "r1", "amount": 10501})

    assert refused.status_code == 422
    assert refused.json()["code"] == "refund_exceeds_purchase"
    assert (await balance(member))["available"] == 100
    after_activity = (await client.get(f"/v1/members/{member}/activity", headers=admin_headers)).json()
    assert after_activity == before_activity
    # The refund id was not used up by the refused attempt.
    accepted = await post(f"/v1/purchases/{purchase_id}/refunds", {"refund_id": "r1", "amount": 10500})
    assert accepted.status_code == 201
    assert accepted.json()["points"] == 100


async def test_refund_replay_and_conflict(post, balance, new_id):
    member = new_id("m")
    purchase_id = new_id("p")
    await post("/v1/purchases", purchase(member, purchase_id))
    body = {"refund_id": "r1", "amount": 5000}
    first = await post(f"/v1/purchases/{purchase_id}/refunds", body)
    replay = await post(f"/v1/purchases/{purchase_id}/refunds", body)
    conflict = await post(f"/v1/purchases/{purchase_id}/refunds", {"refund_id": "r1", "amount": 4000})

    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == first.content
    assert (conflict.status_code, conflict.json()["code"]) == (409, "idempotency_conflict")
    assert (await balance(member))["available"] == 50


async def test_concurrent_refunds_never_exceed_the_purchase(post, balance, new_id):
    member = new_id("m")
    purchase_id = new_id("p")
    await post("/v1/purchases", purchase(member, purchase_id, line("a", 1, 10000)))

    responses = await asyncio.gather(
        *(post(f"/v1/purchases/{purchase_id}/refunds", {"refund_id": f"r{i}", "amount": 3000}) for i in range(10))
    )

    accepted = [r for r in responses if r.status_code == 201]
    assert len(accepted) == 3  # 3 x 30 EUR fit in 100 EUR; a fourth would exceed it
    assert {r.json()["code"] for r in responses if r.status_code != 201} == {"refund_exceeds_purchase"}
    assert (await balance(member))["available"] == 100 - 3 * 30


async def test_refund_errors(post, new_id):
    member = new_id("m")
    purchase_id = new_id("p")
    await post("/v1/purchases", purchase(member, purchase_id))

    unknown_purchase = await post(f"/v1/purchases/{new_id('nope')}/refunds", {"refund_id": "r", "amount": 1})
    unknown_line = await post(
        f"/v1/purchases/{purchase_id}/refunds", {"refund_id": "r", "lines": [{"line_id": "x", "quantity": 1}]}
    )
    both = await post(
        f"/v1/purchases/{purchase_id}/refunds",
        {"refund_id": "r", "amount": 1, "lines": [{"line_id": "1", "quantity": 1}]},
    )
    zero = await post(f"/v1/purchases/{purchase_id}/refunds", {"refund_id": "r", "amount": 0})

    assert (unknown_purchase.status_code, unknown_purchase.json()["code"]) == (404, "purchase_not_found")
    assert (unknown_line.status_code, unknown_line.json()["code"]) == (422, "unprocessable")
    assert both.status_code == 422
    assert zero.status_code == 422 and zero.json()["errors"][0]["field"] == "amount"


async def test_refund_takes_pending_points_first(post, balance, new_id):
    member = new_id("m")
    settled, recent = new_id("p"), new_id("p")
    await post("/v1/purchases", purchase(member, settled))
    await post("/v1/purchases", purchase(member, recent, occurred_at=RECENT))
    assert ((b := await balance(member))["available"], b["pending"]) == (100, 100)

    await post(f"/v1/purchases/{recent}/refunds", {"refund_id": "r1", "amount": 4000})

    after = await balance(member)
    assert (after["available"], after["pending"]) == (100, 60)


async def test_refund_of_spent_points_may_go_negative_and_is_repaid_by_later_points(post, balance, services, new_id):
    member = new_id("m")
    purchase_id = new_id("p")
    await post("/v1/purchases", purchase(member, purchase_id))
    await spend_points(services, member, 80, code="redeem", cause_type="test", cause_ref=new_id("spend"), reason="test")

    refund = await post(f"/v1/purchases/{purchase_id}/refunds", {"refund_id": "r1", "amount": 10000})

    assert (refund.json()["points"], refund.json()["shortfall"]) == (100, 0)
    assert (await balance(member))["available"] == -80
    await post("/v1/purchases", purchase(member, new_id("p")))
    assert (await balance(member))["available"] == 20


async def test_refund_of_spent_points_stops_at_zero_when_negative_balances_are_off(
    client, admin_headers, services: Services, new_id
):
    strict = msgspec.structs.replace(
        services.program,
        points=msgspec.structs.replace(services.program.points, allow_negative_balance=False),
    )
    # Its own per-process state: the shared batcher must not write with this program afterwards.
    strict_services = dataclasses.replace(services, program=strict, _shared={})
    member = new_id("m")
    purchase_id = new_id("p")
    from konvert.earning.model import RefundIn
    from konvert.earning.refunds import refund_purchase
    from konvert.earning.service import Purchases, post_purchase

    try:
        await post_purchase(strict_services, msgspec.convert(purchase(member, purchase_id), PurchaseIn, strict=False))
    finally:
        await strict_services.shared(Purchases).aclose()
    await spend_points(strict_services, member, 80, code="redeem", cause_type="test", cause_ref=new_id("s"), reason="t")

    outcome = await refund_purchase(strict_services, purchase_id, RefundIn(refund_id="r1", amount=10000))

    result = msgspec.json.decode(outcome.body)
    assert (result["points"], result["shortfall"]) == (20, 80)
    balance = (await client.get(f"/v1/members/{member}/balance", headers=admin_headers)).json()
    assert balance["available"] == 0


async def test_spending_more_than_available_is_refused(post, balance, services, new_id):
    from konvert.errors import InsufficientPoints

    member = new_id("m")
    await post("/v1/purchases", purchase(member, new_id("p")))
    with pytest.raises(InsufficientPoints):
        await spend_points(services, member, 101, code="redeem", cause_type="test", cause_ref="x", reason="t")
    assert (await balance(member))["available"] == 100


# --- balance cache -------------------------------------------------------------------------


async def test_a_write_caches_the_balance_it_committed_where_one_is_read(
    services: Services, post, balance, redis_client, new_id
):
    member = new_id("m")
    await post("/v1/purchases", purchase(member, new_id("p")))
    # Nobody read the member's balance: the purchase left a tombstone, and read no balance.
    assert await cached_available(redis_client, member) == (1, None)
    assert (await balance(member))["available"] == 100
    await services.cache.wait_filled()
    assert await cached_available(redis_client, member) == (1, 100)

    # Now that it is read, the next purchase caches the balance it committed: the read after it hits.
    await post("/v1/purchases", purchase(member, new_id("p")))
    version, body = await cached_entry(redis_client, member)
    assert version == 2
    # Exactly what a read from PostgreSQL gives, and what the API answers.
    from_database = msgspec.to_builtins(await read_balance(services, member))
    assert msgspec.json.decode(body) == from_database
    assert from_database["available"] == 200
    assert await balance(member) == from_database


async def test_a_slow_reader_cannot_put_an_older_balance_back(services: Services, post, balance, new_id):
    member = new_id("m")
    await post("/v1/purchases", purchase(member, new_id("p")))
    old = await balance(member)
    await post("/v1/purchases", purchase(member, new_id("p")))

    # A reader that read version N before the write committed tries to cache it afterwards.
    await services.cache.put_many([(member, old["version"], msgspec.json.encode(old))])

    assert (await balance(member))["available"] == 200


async def test_balances_are_right_after_redis_is_flushed(client, post, balance, redis_client, new_id):
    member = new_id("m")
    await post("/v1/purchases", purchase(member, new_id("p")))
    await balance(member)
    await client.app.state.services.cache.wait_filled()
    # Redis forgets every balance cached in this database, tombstones included (as a FLUSHDB
    # would, without touching anyone else's keys).
    async for key in redis_client.scan_iter(match=balance_key("*"), count=1000):
        await redis_client.unlink(key)
    assert not await redis_client.exists(balance_key(member))
    assert (await balance(member))["available"] == 100


# --- activity ------------------------------------------------------------------------------


async def test_activity_pages_newest_first(client, admin_headers, post, new_id):
    member = new_id("m")
    for cents in (1000, 2000, 3000, 4000, 5000):
        await post("/v1/purchases", purchase(member, new_id("p"), line("1", 1, cents)))

    seen, cursor = [], None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = (await client.get(f"/v1/members/{member}/activity", params=params, headers=admin_headers)).json()
        seen.extend(item["amount"] for item in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [50, 40, 30, 20, 10]


async def test_activity_rejects_bad_cursors_and_page_sizes(client, admin_headers, post, new_id):
    member = new_id("m")
    await post("/v1/purchases", purchase(member, new_id("p")))
    bad_cursor = await client.get(f"/v1/members/{member}/activity", params={"cursor": "zzz"}, headers=admin_headers)
    too_big = await client.get(f"/v1/members/{member}/activity", params={"limit": 10_000}, headers=admin_headers)
    assert (bad_cursor.status_code, bad_cursor.json()["errors"][0]["field"]) == (422, "cursor")
    assert too_big.status_code in (400, 422)
    assert too_big.json()["code"] == "validation_failed"


async def test_refund_activity_links_back_to_the_earn(client, admin_headers, post, new_id):
    member = new_id("m")
    purchase_id = new_id("p")
    earned = (await post("/v1/purchases", purchase(member, purchase_id))).json()
    await post(f"/v1/purchases/{purchase_id}/refunds", {"refund_id": "r1", "amount": 1000, "reason": "damaged"})

    items = (await client.get(f"/v1/members/{member}/activity", headers=admin_headers)).json()["items"]

    assert items[0]["code"] == "refund"
    assert items[0]["reverses_transfer_id"] == earned["transfer_id"]
    assert items[0]["reason"] == "damaged"
    assert items[0]["cause"] == {"type": "refund", "ref": f"webshop/{purchase_id}/r1"}
    assert items[0]["delta"] == -10


async def test_the_service_vests_points_by_itself(database_url, redis_url, program, make_key, new_id):
    """The background job in the service process (not only `konvert jobs run`) vests points."""
    from litestar.testing import AsyncTestClient

    from konvert.app import create_app
    from tests.conftest import make_settings

    headers = {"Authorization": f"Bearer {await make_key('admin')}"}
    member = new_id("m")
    settings = make_settings(database_url, redis_url, jobs_interval_seconds=0.2)
    async with AsyncTestClient(create_app(settings, program)) as client:
        await client.post("/v1/purchases", json=purchase(member, new_id("p"), occurred_at=RECENT), headers=headers)
        services = client.app.state.services
        real_clock = services.clock
        services.clock = lambda: real_clock() + timedelta(days=15)
        for _ in range(100):
            balance = (await client.get(f"/v1/members/{member}/balance", headers=headers)).json()
            if balance["available"] == 100:
                break
            await asyncio.sleep(0.05)
    assert (balance["available"], balance["pending"]) == (100, 0)


async def test_jobs_run_command_vests_due_points(client, post, balance, database_url, redis_url, settings, new_id):
    import os
    import subprocess
    import sys

    member = new_id("m")
    await post("/v1/purchases", purchase(member, new_id("p"), occurred_at=RECENT))
    # Let the return window pass: the lot fell due a minute ago.
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            """
            update lots set vests_at = now() - interval '1 minute'
            where member_uid = (select member_uid from members where member_id = $1)
            """,
            member,
        )
    finally:
        await conn.close()
    assert (await balance(member))["pending"] == 100  # and cached by the service
    await client.app.state.services.cache.wait_filled()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KONVERT_")}
    # The service's cache prefix: the job invalidates the balances the service cached.
    env |= {
        "KONVERT_DATABASE_URL": database_url,
        "KONVERT_REDIS_URL": redis_url,
        "KONVERT_REDIS_KEY_PREFIX": settings.redis_key_prefix,
    }

    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "konvert", "jobs", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    counts = dict(line.split(": ") for line in result.stdout.splitlines())
    assert set(counts) == {
        "vested_lots",
        "released_holds",
        "expired_lots",
        "tiers_reevaluated",
        "parked_deliveries_dropped",
        "expiring_soon_announced",
        "events_pruned",
    }
    assert int(counts["vested_lots"]) >= 1
    after = await balance(member)
    assert (after["available"], after["pending"]) == (100, 0)


async def test_a_jobs_run_stops_after_its_row_budget_whatever_the_batch_size(
    post, balance, database_url, redis_url, program, new_id
):
    from konvert import composition, jobs
    from tests.conftest import make_settings

    members = [new_id("m") for _ in range(7)]
    for member in members:
        posted = await post("/v1/purchases", purchase(member, new_id("p"), occurred_at=RECENT))
        assert posted.status_code == 201, posted.text
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            """
            update lots set vests_at = now() - interval '1 minute'
            where member_uid in (select member_uid from members where member_id = any($1::text[]))
            """,
            members,
        )
    finally:
        await conn.close()
    services = await composition.open_services(make_settings(database_url, redis_url, jobs_batch_size=2), program)
    try:
        counts = await jobs.run_once(services, rows_max=5)
        # A budget of rows, not of batches: three batches of two, the last one past the budget.
        assert counts["vested_lots"] == 6
        # The next run continues where this one stopped.
        await jobs.run_once(services)
    finally:
        await services.close()
    assert [(await balance(member))["pending"] for member in members] == [0] * 7


async def test_writes_still_invalidate_after_redis_forgets_its_scripts(post, balance, redis_client, new_id):
    member = new_id("m")
    await post("/v1/purchases", purchase(member, new_id("p")))
    first = await balance(member)
    await redis_client.script_flush()

    await post("/v1/purchases", purchase(member, new_id("p")))

    assert await cached_available(redis_client, member) == (first["version"] + 1, 200)
    assert (await balance(member))["available"] == 200


@pytest.mark.parametrize("one_by_one", [False, True], ids=["together", "one_by_one"])
async def test_a_job_batch_passes_over_held_members_and_still_comes_back_full(post, services, new_id, one_by_one):
    """A batch that finds lots of members a request holds looks further, so that it comes back
    short only when nothing more is due: konvert.jobs runs batches until one does. Members locked
    in one statement or one by one (KONVERT_LOCK_MEMBERS), alike."""
    from konvert.ledger import batches

    members = [new_id("m") for _ in range(4)]
    for member in members:
        await post("/v1/purchases", purchase(member, new_id("p"), occurred_at=RECENT))
    uids = [await services.pool.fetchval("select member_uid from members where member_id = $1", m) for m in members]
    # Only these members' lots, oldest first, as the jobs' own statements find theirs.
    find = f"""
        select member_uid, lot_id from lots
        where member_uid = any('{{{",".join(map(str, uids))}}}'::bigint[]) and state = 'pending'
          and vests_at <= $1 and member_uid <> all($3::bigint[])
        order by lot_id limit $2
    """
    later = NOW + timedelta(days=15)
    async with services.pool.acquire() as holder, holder.transaction():
        await holder.execute("select 1 from members where member_uid = $1 for update", uids[0])
        async with services.pool.acquire() as conn, conn.transaction():
            due = await batches.lock_due(conn, find, later, 3, (), one_by_one=one_by_one)
    assert sorted(row["member_uid"] for row in due) == sorted(uids[1:])
