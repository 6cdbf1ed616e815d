"""Rewards, redemptions, holds, expiry, tiers and adjustments against real PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

import asyncpg
import msgspec
import pytest
import redis.asyncio as redis
from litestar.testing import AsyncTestClient

from konvert import composition
from konvert.app import create_app
from konvert.ledger import batches
from konvert.ledger.audit import run_audit
from konvert.ledger.book import writing
from konvert.ledger.jobs import expire_due_lots
from konvert.program import parse_program
from konvert.redemption.model import RedemptionIn
from konvert.redemption.service import redeem, release_timed_out_holds
from konvert.services import Services
from konvert.settings import Settings
from konvert.tiers.service import reevaluate_due
from konvert.tiers.store import FIND_DUE_MEMBERS, select_qualifying_points
from tests.conftest import TEST_PROGRAM, make_settings, run_job
from tests.integration.test_purchases import NOW, RECENT, line, purchase


async def _forget_cached(redis_client: redis.Redis, settings: Settings) -> None:
    """What a Redis that restarted empty would have of this database's keys: nothing (the
    other databases' keys, and everything else in this Redis, are left alone)."""
    async for key in redis_client.scan_iter(match=f"{settings.redis_key_prefix}:*", count=1000):
        await redis_client.unlink(key)


@pytest.fixture
def api(client, admin_headers, services):
    """Small helpers around the shared app client, with an admin key.

    ``api.services`` is the ``services`` fixture: jobs run on the test's own event loop, since
    the test client serves the app on another one.
    """

    class Api:
        async def post(self, path: str, body: dict[str, Any] | None = None):
            if body is None:
                return await client.post(path, headers=admin_headers)
            return await client.post(path, json=body, headers=admin_headers)

        async def put(self, path: str, body: dict[str, Any]):
            return await client.put(path, json=body, headers=admin_headers)

        async def get(self, path: str, **params: Any):
            return await client.get(path, params=params, headers=admin_headers)

        async def balance(self, member_id: str) -> dict[str, Any]:
            response = await self.get(f"/v1/members/{member_id}/balance")
            assert response.status_code == 200, response.text
            return response.json()

        async def earn(self, member_id: str, purchase_id: str, euros: int) -> dict[str, Any]:
            response = await self.post("/v1/purchases", purchase(member_id, purchase_id, line("1", 1, euros * 100)))
            assert response.status_code == 201, response.text
            return response.json()

    api = Api()
    api.services = services
    return api


# --- rewards -------------------------------------------------------------------------------


async def test_rewards_catalog_lists_only_what_can_be_redeemed_now(api, new_id):
    live, inactive, sold_out, later = (new_id("r") for _ in range(4))
    await api.put(f"/v1/rewards/{live}", {"name": "Mug", "cost_points": 100, "stock": 3})
    await api.put(f"/v1/rewards/{inactive}", {"name": "Old", "cost_points": 100, "active": False})
    await api.put(f"/v1/rewards/{sold_out}", {"name": "Gone", "cost_points": 100, "stock": 0})
    await api.put(
        f"/v1/rewards/{later}",
        {"name": "Soon", "cost_points": 100, "available_from": (NOW + timedelta(days=3)).isoformat()},
    )

    listed = {r["reward_id"] for r in (await api.get("/v1/rewards")).json()["items"]}

    assert live in listed
    assert not {inactive, sold_out, later} & listed


async def test_put_reward_validates_and_replaces(api, new_id):
    reward_id = new_id("r")
    bad = await api.put(f"/v1/rewards/{reward_id}", {"name": "Mug", "cost_points": 0})
    assert (bad.status_code, bad.json()["errors"][0]["field"]) == (422, "cost_points")
    first = await api.put(f"/v1/rewards/{reward_id}", {"name": "Mug", "cost_points": 100})
    second = await api.put(f"/v1/rewards/{reward_id}", {"name": "Big mug", "cost_points": 150})
    assert first.status_code == second.status_code == 200
    assert (second.json()["name"], second.json()["cost_points"]) == ("Big mug", 150)


async def test_program_file_rewards_are_seeded(redis_url, database_url):
    program = parse_program(
        TEST_PROGRAM + '\n[[rewards]]\nreward_id = "seeded-coffee"\nname = "Coffee"\ncost_points = 150\n'
    )
    async with AsyncTestClient(create_app(make_settings(database_url, redis_url), program)) as client:
        key = await _admin_key(database_url)
        rewards = (await client.get("/v1/rewards", headers={"Authorization": f"Bearer {key}"})).json()["items"]
    assert "seeded-coffee" in {r["reward_id"] for r in rewards}


async def _admin_key(database_url: str) -> str:
    from konvert import auth

    conn = await asyncpg.connect(database_url)
    try:
        return (await auth.insert_key(conn, "t", ["admin"]))[0]
    finally:
        await conn.close()


# --- redeeming -----------------------------------------------------------------------------


async def test_redeeming_a_reward_spends_its_cost_and_takes_stock(api, new_id):
    member, reward = new_id("m"), new_id("r")
    await api.earn(member, new_id("p"), 500)
    await api.put(f"/v1/rewards/{reward}", {"name": "Mug", "cost_points": 120, "stock": 2})

    response = await api.post(f"/v1/members/{member}/redemptions", {"redemption_id": new_id("x"), "reward_id": reward})

    assert response.status_code == 201, response.text
    assert (response.json()["points"], response.json()["status"]) == (120, "captured")
    assert (await api.balance(member))["available"] == 380
    listed = {r["reward_id"]: r for r in (await api.get("/v1/rewards")).json()["items"]}
    assert listed[reward]["stock"] == 1
    activity = (await api.get(f"/v1/members/{member}/activity")).json()["items"]
    assert (activity[0]["code"], activity[0]["delta"], activity[0]["reason"]) == (
        "redeem",
        -120,
        f"reward {reward}",
    )


async def test_redemption_replay_and_conflict(api, new_id):
    member = new_id("m")
    await api.earn(member, new_id("p"), 500)
    body = {"redemption_id": new_id("x"), "points": 100}
    first = await api.post(f"/v1/members/{member}/redemptions", body)
    replay = await api.post(f"/v1/members/{member}/redemptions", body)
    conflict = await api.post(f"/v1/members/{member}/redemptions", body | {"points": 50})
    assert replay.headers["idempotent-replayed"] == "true" and replay.content == first.content
    assert (conflict.status_code, conflict.json()["code"]) == (409, "idempotency_conflict")
    assert (await api.balance(member))["available"] == 400


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"reward_id": "no-such-reward"}, 404, "reward_not_found"),
        ({"points": 0}, 422, "validation_failed"),
        ({"points": -5}, 422, "validation_failed"),
        ({"points": 10, "reward_id": "x"}, 422, "validation_failed"),
        ({}, 422, "validation_failed"),
        ({"points": 1001}, 409, "insufficient_points"),
    ],
)
async def test_bad_redemptions_are_refused_and_change_nothing(api, new_id, body, status, code):
    member = new_id("m")
    await api.earn(member, new_id("p"), 1000)

    response = await api.post(f"/v1/members/{member}/redemptions", {"redemption_id": new_id("x")} | body)

    assert (response.status_code, response.json()["code"]) == (status, code)
    assert (await api.balance(member))["available"] == 1000
    assert (await api.get(f"/v1/members/{member}/redemptions")).json()["items"] == []


async def test_redeeming_for_an_unknown_member_is_404(api, new_id):
    response = await api.post(f"/v1/members/{new_id('ghost')}/redemptions", {"redemption_id": new_id("x"), "points": 1})
    assert (response.status_code, response.json()["code"]) == (404, "member_not_found")


async def test_hundred_concurrent_redemptions_never_overdraw(api, new_id):
    member = new_id("m")
    await api.earn(member, new_id("p"), 1000)

    responses = await asyncio.gather(
        *(
            api.post(f"/v1/members/{member}/redemptions", {"redemption_id": new_id("x"), "points": 100})
            for _ in range(100)
        )
    )

    assert sum(r.status_code == 201 for r in responses) == 10
    assert {r.json()["code"] for r in responses if r.status_code != 201} == {"insufficient_points"}
    assert (await api.balance(member))["available"] == 0


async def test_concurrent_duplicates_of_one_redemption_spend_once_and_replay(api, database_url, new_id):
    member = new_id("m")
    await api.earn(member, new_id("p"), 1000)
    redemption = RedemptionIn(redemption_id=new_id("x"), points=100, note="twenty tries")

    # Straight to the use case, all at once: twenty transactions queue on the member's lock.
    outcomes = await asyncio.gather(*(redeem(api.services, member, redemption) for _ in range(20)))

    assert len({outcome.body for outcome in outcomes}) == 1  # the replays return the original response
    assert sum(outcome.replayed for outcome in outcomes) == 19
    assert (await api.balance(member))["available"] == 900
    conn = await asyncpg.connect(database_url)
    try:
        transfer_id = msgspec.json.decode(outcomes[0].body)["transfer_id"]
        transfer = await conn.fetchrow(
            "select code, amount, cause_ref, reason from transfers where transfer_id = $1", transfer_id
        )
        taken = await conn.fetchval("select sum(amount) from lot_entries where transfer_id = $1", transfer_id)
        spends = await conn.fetchval(
            "select count(*) from transfers where cause_type = 'redemption' and cause_ref = $1",
            redemption.redemption_id,
        )
    finally:
        await conn.close()
    assert dict(transfer) == {
        "code": "redeem",
        "amount": 100,
        "cause_ref": redemption.redemption_id,
        "reason": "points payment: twenty tries",
    }
    assert (taken, spends) == (100, 1)


async def test_concurrent_redemptions_never_take_stock_below_zero(api, new_id):
    member, reward = new_id("m"), new_id("r")
    await api.earn(member, new_id("p"), 10000)
    await api.put(f"/v1/rewards/{reward}", {"name": "Rare", "cost_points": 10, "stock": 5})

    responses = await asyncio.gather(
        *(
            api.post(f"/v1/members/{member}/redemptions", {"redemption_id": new_id("x"), "reward_id": reward})
            for _ in range(20)
        )
    )

    assert sum(r.status_code == 201 for r in responses) == 5
    assert {r.json()["code"] for r in responses if r.status_code != 201} == {"out_of_stock"}
    assert (await api.balance(member))["available"] == 10000 - 50


# --- holds ---------------------------------------------------------------------------------


async def test_hold_reserves_points_until_captured(api, new_id):
    member, redemption_id = new_id("m"), new_id("x")
    await api.earn(member, new_id("p"), 500)

    held = await api.post(
        f"/v1/members/{member}/redemptions", {"redemption_id": redemption_id, "points": 200, "hold": True}
    )

    assert held.json()["status"] == "held"
    assert ((b := await api.balance(member))["available"], b["held"]) == (300, 200)
    captured = await api.post(f"/v1/redemptions/{redemption_id}/capture")
    again = await api.post(f"/v1/redemptions/{redemption_id}/capture")
    assert captured.status_code == 200 and captured.json()["status"] == "captured"
    assert again.json() == captured.json()
    assert ((b := await api.balance(member))["available"], b["held"]) == (300, 0)
    late_release = await api.post(f"/v1/redemptions/{redemption_id}/release")
    assert (late_release.status_code, late_release.json()["code"]) == (409, "hold_not_active")


async def test_released_hold_returns_the_same_lots(api, services, new_id):
    member = new_id("m")
    await api.earn(member, new_id("p"), 100)
    await api.earn(member, new_id("p"), 100)
    before = await api.balance(member)
    redemption_id = new_id("x")

    await api.post(f"/v1/members/{member}/redemptions", {"redemption_id": redemption_id, "points": 150, "hold": True})
    during = await api.balance(member)
    released = await api.post(f"/v1/redemptions/{redemption_id}/release")

    assert released.json()["status"] == "released"
    assert during["expiring"] != before["expiring"]
    after = await api.balance(member)
    assert (after["available"], after["held"], after["expiring"]) == (200, 0, before["expiring"])
    captured = await api.post(f"/v1/redemptions/{redemption_id}/capture")
    assert (captured.status_code, captured.json()["code"]) == (409, "hold_not_active")


async def test_hold_times_out_and_is_released_by_the_job_even_after_a_restart(
    api, clock, database_url, redis_url, program, redis_client, new_id
):
    member, redemption_id = new_id("m"), new_id("x")
    await api.earn(member, new_id("p"), 500)
    await api.post(f"/v1/members/{member}/redemptions", {"redemption_id": redemption_id, "points": 300, "hold": True})

    # A "restart": new services on the same database, and Redis forgets everything.
    settings = make_settings(database_url, redis_url)
    await _forget_cached(redis_client, settings)
    restarted = await composition.open_services(settings, program)
    try:
        await release_timed_out_holds(restarted, now=restarted.clock() + timedelta(seconds=60))
        assert (await api.balance(member))["held"] == 300  # not yet timed out
        assert await release_timed_out_holds(restarted, now=restarted.clock() + timedelta(seconds=901)) >= 1
    finally:
        await restarted.close()

    assert ((b := await api.balance(member))["available"], b["held"]) == (500, 0)
    redemption = (await api.get(f"/v1/members/{member}/redemptions")).json()["items"][0]
    assert redemption["status"] == "expired"
    clock.advance(seconds=901)
    capture = await api.post(f"/v1/redemptions/{redemption_id}/capture")
    assert (capture.status_code, capture.json()["code"]) == (409, "hold_not_active")


async def test_capture_after_timeout_is_refused_even_before_the_job_runs(api, clock, new_id):
    member, redemption_id = new_id("m"), new_id("x")
    await api.earn(member, new_id("p"), 500)
    await api.post(f"/v1/members/{member}/redemptions", {"redemption_id": redemption_id, "points": 300, "hold": True})
    clock.advance(seconds=901)

    capture = await api.post(f"/v1/redemptions/{redemption_id}/capture")

    assert (capture.status_code, capture.json()["code"]) == (409, "hold_not_active")
    assert (await api.balance(member))["held"] == 300  # the job, not the refused capture, releases it


async def test_captures_racing_timeouts_settle_each_hold_exactly_once(api, clock, new_id):
    member = new_id("m")
    await api.earn(member, new_id("p"), 1000)
    ids = [new_id("x") for _ in range(10)]
    for redemption_id in ids:
        await api.post(
            f"/v1/members/{member}/redemptions", {"redemption_id": redemption_id, "points": 100, "hold": True}
        )
    services = api.services
    at_timeout = services.clock() + timedelta(seconds=900)

    results = await asyncio.gather(
        *(api.post(f"/v1/redemptions/{rid}/capture") for rid in ids),
        release_timed_out_holds(services, now=at_timeout),
        release_timed_out_holds(services, now=at_timeout),
    )

    statuses = {
        r["redemption_id"]: r["status"] for r in (await api.get(f"/v1/members/{member}/redemptions")).json()["items"]
    }
    captured = sum(s == "captured" for s in statuses.values())
    expired = sum(s == "expired" for s in statuses.values())
    assert captured + expired == 10
    assert sum(r.status_code == 200 for r in results[:10]) == captured
    balance = await api.balance(member)
    assert (balance["available"], balance["held"]) == (100 * expired, 0)


async def test_concurrent_holds_never_overdraw(api, new_id):
    member = new_id("m")
    await api.earn(member, new_id("p"), 1000)
    responses = await asyncio.gather(
        *(
            api.post(
                f"/v1/members/{member}/redemptions",
                {"redemption_id": new_id("x"), "points": 300, "hold": True},
            )
            for _ in range(10)
        )
    )
    assert sum(r.status_code == 201 for r in responses) == 3
    assert ((b := await api.balance(member))["available"], b["held"]) == (100, 900)


async def test_cancelling_a_captured_redemption_returns_points_and_stock(api, new_id):
    member, reward, redemption_id = new_id("m"), new_id("r"), new_id("x")
    await api.earn(member, new_id("p"), 500)
    await api.put(f"/v1/rewards/{reward}", {"name": "Mug", "cost_points": 100, "stock": 1})
    await api.post(f"/v1/members/{member}/redemptions", {"redemption_id": redemption_id, "reward_id": reward})

    cancelled = await api.post(f"/v1/redemptions/{redemption_id}/cancel")

    assert cancelled.json()["status"] == "cancelled"
    assert (await api.balance(member))["available"] == 500
    assert {r["reward_id"]: r["stock"] for r in (await api.get("/v1/rewards")).json()["items"]}[reward] == 1


async def test_unknown_redemption_is_404(api, new_id):
    response = await api.post(f"/v1/redemptions/{new_id('x')}/capture")
    assert (response.status_code, response.json()["code"]) == (404, "redemption_not_found")


# --- expiry --------------------------------------------------------------------------------


async def test_points_expire_lot_by_lot_soonest_first_and_spending_takes_them_first(api, clock, new_id):
    member = new_id("m")
    await api.earn(member, new_id("p"), 100)  # lot A, expires in 365 days
    clock.advance(days=100)
    await api.earn(member, new_id("p"), 50)  # lot B, expires 100 days later
    services = api.services

    # Spending takes from the soonest-expiring lot first: 30 of A's 100.
    await api.post(f"/v1/members/{member}/redemptions", {"redemption_id": new_id("x"), "points": 30})
    expiring = (await api.balance(member))["expiring"]
    assert [e["points"] for e in expiring] == [70, 50]

    await run_job(expire_due_lots, services, services.clock() + timedelta(days=264))
    assert (await api.balance(member))["available"] == 120  # nothing due yet
    await run_job(expire_due_lots, services, services.clock() + timedelta(days=266))
    assert (await api.balance(member))["available"] == 50  # A's 70 expired, B untouched
    await run_job(expire_due_lots, services, services.clock() + timedelta(days=366))
    balance = await api.balance(member)
    assert (balance["available"], balance["expiring"]) == (0, [])

    items = (await api.get(f"/v1/members/{member}/activity")).json()["items"]
    expiries = [(i["amount"], i["reason"].startswith("points expired on")) for i in items if i["code"] == "expire"]
    assert expiries == [(50, True), (70, True)]


async def test_balance_lists_points_expiring_within_a_window(api, clock, new_id):
    member = new_id("m")
    await api.earn(member, new_id("p"), 100)
    clock.advance(days=200)
    await api.earn(member, new_id("p"), 40)

    soon = (await api.get(f"/v1/members/{member}/balance", expiring_within_days=170)).json()["expiring"]
    all_of_them = (await api.get(f"/v1/members/{member}/balance", expiring_within_days=400)).json()["expiring"]

    assert [e["points"] for e in soon] == [100]
    assert [e["points"] for e in all_of_them] == [100, 40]
    bad = await api.get(f"/v1/members/{member}/balance", expiring_within_days=-1)
    assert bad.status_code in (400, 422)


async def test_expiry_is_safe_to_run_twice_at_once(api, new_id):
    member = new_id("m")
    await api.earn(member, new_id("p"), 100)
    services = api.services
    later = services.clock() + timedelta(days=400)
    await asyncio.gather(expire_due_lots(services, now=later), expire_due_lots(services, now=later))
    assert (await api.balance(member))["available"] == 0
    items = (await api.get(f"/v1/members/{member}/activity")).json()["items"]
    assert [i["code"] for i in items] == ["expire", "earn"]


async def _expiry_rows(services: Services, member_id: str) -> dict[str, Any]:
    """What expiry wrote for a member, without ids: its transfers, lot entries, lots, balances."""
    transfers = await services.pool.fetch(
        """select t.amount, d.name as debit, c.name as credit, t.cause_type, t.reason from transfers t
           join every_account d on d.account_id = t.debit_account_id
           join every_account c on c.account_id = t.credit_account_id
           join members m on m.member_uid = t.member_uid
           where m.member_id = $1 and t.code = 'expire' order by t.amount""",
        member_id,
    )
    entries = await services.pool.fetch(
        """select e.amount, (e.transfer_id is not null) as with_transfer from lot_entries e
           join members m on m.member_uid = e.member_uid where m.member_id = $1 and e.kind = 'expire'
           order by e.amount""",
        member_id,
    )
    lots = await services.pool.fetch(
        """select l.amount, l.remaining, l.state from lots l join members m on m.member_uid = l.member_uid
           where m.member_id = $1 order by l.amount""",
        member_id,
    )
    member = await services.pool.fetchrow(
        "select points_available, points_pending, version from members where member_id = $1", member_id
    )
    return {
        "transfers": [tuple(r) for r in transfers],
        "entries": [tuple(r) for r in entries],
        "lots": [tuple(r) for r in lots],
        "member": tuple(member),
    }


async def test_expiry_in_batches_writes_what_expiring_one_member_at_a_time_wrote(api, new_id, caplog):
    services = api.services
    alone, batched = new_id("m"), new_id("m")
    for member in (alone, batched):
        await api.earn(member, new_id("p"), 100)  # available at once
        pending = purchase(member, new_id("p"), line("1", 1, 5000), occurred_at=RECENT)
        assert (await api.post("/v1/purchases", pending)).json()["status"] == "pending"
        await api.post(f"/v1/members/{member}/redemptions", {"redemption_id": new_id("x"), "points": 30})
    later = services.clock() + timedelta(days=400)
    member_uid = await services.pool.fetchval("select member_uid from members where member_id = $1", alone)

    async with writing(services) as book:  # the way a member of a failed batch expires: on its own
        assert await book.expire(await book.member_by_uid(member_uid), later) == 2
    while await expire_due_lots(services, now=later) >= services.settings.jobs_batch_size:
        pass

    # The batch's one statement expired them, not the one-by-one fallback.
    assert not any("batch failed" in r.getMessage() for r in caplog.records)
    rows = {member: await _expiry_rows(services, member) for member in (alone, batched)}
    assert rows[batched] == rows[alone]
    assert rows[batched]["transfers"][0][:4] == (50, "pending", "expired", "lot")
    assert rows[batched]["transfers"][1][:4] == (70, "available", "expired", "lot")
    assert rows[batched]["transfers"][1][4].startswith("points expired on ")
    assert rows[batched]["lots"] == [(50, 0, "expired"), (100, 0, "expired")]
    balance = await api.balance(batched)
    assert (balance["available"], balance["pending"]) == (0, 0)


async def test_expiry_passes_over_a_member_another_transaction_holds(api, new_id):
    services = api.services
    held, free = new_id("m"), new_id("m")
    for member in (held, free):
        await api.earn(member, new_id("p"), 100)
    later = services.clock() + timedelta(days=400)
    async with services.pool.acquire() as conn, conn.transaction():
        await conn.execute("select 1 from members where member_id = $1 for update", held)
        while await asyncio.wait_for(expire_due_lots(services, now=later), 10):
            pass
        during = [(await api.balance(m))["available"] for m in (held, free)]
    assert during == [100, 0]
    await expire_due_lots(services, now=later)
    assert (await api.balance(held))["available"] == 0


# --- tiers ---------------------------------------------------------------------------------

TIER_PROGRAM = (
    TEST_PROGRAM
    + """
[tiers]
window_days = 365
downgrade_grace_days = {grace}

[[tiers.levels]]
name = "Bronze"
min_points = 0

[[tiers.levels]]
name = "Silver"
min_points = 100
multiplier = 2
"""
)


def _plan_nodes(plan: dict[str, Any]) -> list[str]:
    return [plan["Node Type"], *(node for child in plan.get("Plans", ()) for node in _plan_nodes(child))]


@pytest.mark.parametrize(
    "statement, args",
    [
        (batches.FIND_DUE_PENDING_LOTS, (NOW, 1000, [])),
        (batches.FIND_EXPIRING_LOTS, (NOW, 1000, [])),
        (FIND_DUE_MEMBERS, (NOW, 1000, [])),
    ],
    ids=["vesting", "expiry", "tiers"],
)
async def test_each_job_takes_its_batch_in_index_order_without_sorting_what_is_due(database_url, statement, args):
    # Sorting would read every due row for every batch: lots due at one instant (a nightly
    # import's), or a day's tiered members, read again batch after batch. Sorting is made as
    # costly as PostgreSQL can make it, so a plan that still sorts has no index in the order
    # (this shows the index can give the order, not that the generic plan picks it at normal
    # costs).
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await conn.execute("set local enable_sort = off; set local enable_incremental_sort = off")
            await conn.execute("set local plan_cache_mode = force_generic_plan")
            plan = json.loads(await conn.fetchval(f"explain (format json) {statement}", *args))[0]["Plan"]
    finally:
        await conn.close()

    nodes = _plan_nodes(plan)
    assert not {"Sort", "Incremental Sort"} & set(nodes), nodes
    assert nodes[0] == "Limit", nodes


@pytest.fixture(params=[0, 30], ids=["no-grace", "grace-30-days"])
async def tier_api(request, database_url, redis_url, make_key):
    program = parse_program(TIER_PROGRAM.replace("{grace}", str(request.param)))
    headers = {"Authorization": f"Bearer {await make_key('admin')}"}
    settings = make_settings(database_url, redis_url)
    async with AsyncTestClient(create_app(settings, program)) as client:
        client.grace_days, client.admin, client.settings, client.program = (
            request.param,
            headers,
            settings,
            program,
        )
        yield client


async def _reevaluate_all(services: Services) -> None:
    while await reevaluate_due(services) == services.settings.jobs_batch_size:
        pass


async def test_tiers_rise_with_earning_and_multiply_later_purchases(tier_api, new_id):
    member = new_id("m")
    first = await tier_api.post(
        "/v1/purchases", json=purchase(member, new_id("p"), line("1", 1, 10000)), headers=tier_api.admin
    )
    assert first.json()["points"] == 100  # earned as Bronze

    balance = (await tier_api.get(f"/v1/members/{member}/balance", headers=tier_api.admin)).json()
    assert balance["tier"]["name"] == "Silver"
    assert (balance["tier"]["next_tier"], balance["tier"]["points_to_next_tier"]) == (None, None)

    second = await tier_api.post(
        "/v1/purchases", json=purchase(member, new_id("p"), line("1", 1, 1000)), headers=tier_api.admin
    )
    assert second.json()["points"] == 20
    assert {"kind": "tier", "ref": "Silver", "factor": "2"} in second.json()["lines"][0]["rules"]


async def test_refund_of_the_qualifying_purchase_lowers_the_tier_after_the_grace_period(tier_api, new_id):
    member, purchase_id = new_id("m"), new_id("p")
    await tier_api.post(
        "/v1/purchases", json=purchase(member, purchase_id, line("1", 1, 10000)), headers=tier_api.admin
    )

    await tier_api.post(
        f"/v1/purchases/{purchase_id}/refunds",
        json={"refund_id": "r1", "amount": 5000},
        headers=tier_api.admin,
    )

    tier = (await tier_api.get(f"/v1/members/{member}/balance", headers=tier_api.admin)).json()["tier"]
    assert tier["qualifying_points"] == 50
    if tier_api.grace_days == 0:
        assert tier["name"] == "Bronze"
        return
    assert (tier["name"], tier["below_tier_since"] is not None) == ("Silver", True)
    services = await composition.open_services(tier_api.settings, tier_api.program)
    try:
        real_clock = services.clock
        services.clock = lambda: real_clock() + timedelta(days=29)
        await _reevaluate_all(services)
        assert (await tier_api.get(f"/v1/members/{member}/balance", headers=tier_api.admin)).json()["tier"][
            "name"
        ] == "Silver"
        services.clock = lambda: real_clock() + timedelta(days=60)
        await _reevaluate_all(services)
    finally:
        await services.close()
    tier = (await tier_api.get(f"/v1/members/{member}/balance", headers=tier_api.admin)).json()["tier"]
    assert (tier["name"], tier["below_tier_since"]) == ("Bronze", None)


async def test_qualifying_points_are_the_window_s_purchases_less_their_own_refunds(tier_api, new_id, database_url):
    member, old, recent = new_id("m"), new_id("p"), new_id("p")
    earned = {}
    for purchase_id in (old, recent):
        response = await tier_api.post(
            "/v1/purchases", json=purchase(member, purchase_id, line("1", 1, 10000)), headers=tier_api.admin
        )
        earned[purchase_id] = response.json()["points"]
    clawed = {old: 0, recent: 0}
    for purchase_id, refund_id, amount in ((old, "r1", 3000), (recent, "r1", 2000), (recent, "r2", 1000)):
        response = await tier_api.post(
            f"/v1/purchases/{purchase_id}/refunds",
            json={"refund_id": refund_id, "amount": amount},
            headers=tier_api.admin,
        )
        clawed[purchase_id] += response.json()["points"]
    assert all(clawed.values())  # both purchases had points clawed back
    conn = await asyncpg.connect(database_url)
    try:
        # The older purchase leaves the window: neither it nor its refund counts any more.
        await conn.execute(
            "update purchases set created_at = created_at - interval '400 days' where purchase_id = $1", old
        )
        member_uid = await conn.fetchval("select member_uid from members where member_id = $1", member)
        since = await conn.fetchval("select now() - interval '365 days'")
        in_window = (await select_qualifying_points(conn, [member_uid], since))[member_uid]
        both = (await select_qualifying_points(conn, [member_uid], since - timedelta(days=100)))[member_uid]
    finally:
        await conn.close()
    assert in_window == earned[recent] - clawed[recent]
    assert both == sum(earned.values()) - sum(clawed.values())


@pytest.mark.parametrize("lock_members", ["together", "one_by_one"])
async def test_the_tier_job_passes_over_members_another_transaction_holds(tier_api, new_id, database_url, lock_members):
    held, free = new_id("m"), new_id("m")
    for member in (held, free):
        await tier_api.post(
            "/v1/purchases", json=purchase(member, new_id("p"), line("1", 1, 10000)), headers=tier_api.admin
        )
    members = "select member_id, version, tier_evaluated_at is not null from members where member_id = any($1)"
    services = await composition.open_services(tier_api.settings.replace(lock_members=lock_members), tier_api.program)
    conn = await asyncpg.connect(database_url)
    try:
        before = {r[0]: tuple(r[1:]) for r in await conn.fetch(members, [held, free])}
        assert before[held][1] is before[free][1] is False  # due: never evaluated by the job
        async with conn.transaction():
            await conn.execute("select 1 from members where member_id = $1 for update", held)
            # Another process's job (or a purchase) holds the member: this one goes on without it.
            await asyncio.wait_for(_reevaluate_all(services), 10)
            during = {r[0]: tuple(r[1:]) for r in await conn.fetch(members, [held, free])}
        await _reevaluate_all(services)
        after = {r[0]: tuple(r[1:]) for r in await conn.fetch(members, [held, free])}
    finally:
        await conn.close()
        await services.close()
    assert (during[held][1], during[free][1]) == (False, True)
    # Evaluated by the next run; still Silver on the same points, so no balance version moved.
    assert after == {member: (before[member][0], True) for member in (held, free)}


async def test_the_tier_job_takes_a_batch_least_recently_evaluated_first(tier_api, new_id, database_url):
    older, newer = new_id("m"), new_id("m")
    for member in (older, newer):
        await tier_api.post(
            "/v1/purchases", json=purchase(member, new_id("p"), line("1", 1, 10000)), headers=tier_api.admin
        )
    services = await composition.open_services(tier_api.settings, tier_api.program)
    one_at_a_time = await composition.open_services(
        make_settings(tier_api.settings.database_url, tier_api.settings.redis_url, jobs_batch_size=1),
        tier_api.program,
    )
    conn = await asyncpg.connect(database_url)
    try:
        await _reevaluate_all(services)  # nothing else is due now
        for member, days in ((newer, 2), (older, 3)):
            await conn.execute(
                "update members set tier_evaluated_at = now() - make_interval(days => $2) where member_id = $1",
                member,
                days,
            )
        assert await reevaluate_due(one_at_a_time) == 1
        due = await conn.fetch(
            "select member_id from members where member_id = any($1) and tier_evaluated_at < now() - interval '1 day'",
            [older, newer],
        )
        assert [r[0] for r in due] == [newer]
        assert await reevaluate_due(one_at_a_time) == 1
        assert await reevaluate_due(one_at_a_time) == 0
    finally:
        await conn.close()
        await services.close()
        await one_at_a_time.close()


# --- adjustments ---------------------------------------------------------------------------


async def test_adjustments_credit_and_debit_with_a_reason_and_the_key_recorded(client, make_key, database_url, new_id):
    member = new_id("m")
    headers = {"Authorization": f"Bearer {await make_key('admin', name='support-desk')}"}
    credit = await client.post(
        f"/v1/members/{member}/adjustments",
        json={
            "adjustment_id": new_id("a"),
            "points": 250,
            "reason_code": "goodwill",
            "note": "late delivery",
        },
        headers=headers,
    )
    debit = await client.post(
        f"/v1/members/{member}/adjustments",
        json={"adjustment_id": new_id("a"), "points": -50, "reason_code": "correction"},
        headers=headers,
    )

    assert credit.status_code == debit.status_code == 201
    assert credit.json()["made_by"] == "support-desk"
    balance = (await client.get(f"/v1/members/{member}/balance", headers=headers)).json()
    assert balance["available"] == 200
    items = (await client.get(f"/v1/members/{member}/activity", headers=headers)).json()["items"]
    assert [(i["code"], i["delta"], i["reason"]) for i in items] == [
        ("adjust", -50, "correction"),
        ("adjust", 250, "goodwill: late delivery"),
    ]
    conn = await asyncpg.connect(database_url)
    try:
        recorded = await conn.fetch(
            "select a.key_name, a.reason_code from adjustments a join members m using (member_uid) where m.member_id = $1",
            member,
        )
    finally:
        await conn.close()
    assert {(r["key_name"], r["reason_code"]) for r in recorded} == {
        ("support-desk", "goodwill"),
        ("support-desk", "correction"),
    }


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"points": 10, "reason_code": "because"}, 422, "validation_failed"),
        ({"points": 0, "reason_code": "goodwill"}, 422, "validation_failed"),
        ({"points": -101, "reason_code": "correction"}, 409, "insufficient_points"),
    ],
)
async def test_bad_adjustments_change_nothing(api, new_id, body, status, code):
    member = new_id("m")
    await api.earn(member, new_id("p"), 100)
    response = await api.post(f"/v1/members/{member}/adjustments", {"adjustment_id": new_id("a")} | body)
    assert (response.status_code, response.json()["code"]) == (status, code)
    assert (await api.balance(member))["available"] == 100


async def test_an_adjustment_id_used_for_another_member_is_a_conflict_that_creates_no_member(
    api, client, admin_headers, new_id
):
    first, newcomer, adjustment_id = new_id("m"), new_id("m"), new_id("a")
    body = {"adjustment_id": adjustment_id, "points": 40, "reason_code": "goodwill"}
    assert (await api.post(f"/v1/members/{first}/adjustments", body)).status_code == 201

    reused = await api.post(f"/v1/members/{newcomer}/adjustments", body)

    assert (reused.status_code, reused.json()["code"]) == (409, "idempotency_conflict")
    missing = await client.get(f"/v1/members/{newcomer}/balance", headers=admin_headers)
    assert (missing.status_code, missing.json()["code"]) == (404, "member_not_found")
    assert (await api.balance(first))["available"] == 40


async def test_adjustments_need_the_admin_scope(client, make_key, new_id):
    headers = {"Authorization": f"Bearer {await make_key('redemptions:write', 'members:write')}"}
    response = await client.post(
        f"/v1/members/{new_id('m')}/adjustments",
        json={"adjustment_id": new_id("a"), "points": 10, "reason_code": "goodwill"},
        headers=headers,
    )
    assert (response.status_code, response.json()["code"]) == (403, "forbidden")


# --- the whole ledger ----------------------------------------------------------------------


async def test_audit_passes_after_redemptions_holds_expiry_and_adjustments(fresh_database_url, redis_url, program):
    settings = make_settings(fresh_database_url, redis_url)
    key = await _admin_key(fresh_database_url)
    headers = {"Authorization": f"Bearer {key}"}
    services = await composition.open_services(settings, program)
    async with AsyncTestClient(create_app(settings, program)) as client:

        async def post(path, body=None):
            return await client.post(path, json=body, headers=headers)

        await client.put("/v1/rewards/mug", json={"name": "Mug", "cost_points": 30, "stock": 10}, headers=headers)
        for member in ("ann", "bob"):
            await post("/v1/purchases", purchase(member, f"{member}-1", line("1", 1, 10000)))
            await post("/v1/purchases", purchase(member, f"{member}-2", line("1", 1, 5000)))
        await post("/v1/members/ann/redemptions", {"redemption_id": "a1", "reward_id": "mug"})
        await post("/v1/members/ann/redemptions", {"redemption_id": "a2", "points": 40, "hold": True})
        await post("/v1/members/ann/redemptions", {"redemption_id": "a3", "points": 20, "hold": True})
        await post("/v1/redemptions/a2/capture")
        await post("/v1/redemptions/a1/cancel")
        await post("/v1/members/bob/redemptions", {"redemption_id": "b1", "points": 120, "hold": True})
        await post("/v1/members/bob/adjustments", {"adjustment_id": "adj1", "points": 25, "reason_code": "goodwill"})
        await post("/v1/purchases/bob-1/refunds", {"refund_id": "r1", "amount": 10000})
        await release_timed_out_holds(services, now=services.clock() + timedelta(seconds=1000))  # bob's and ann's a3
        await expire_due_lots(services, now=services.clock() + timedelta(days=400))
        conn = await asyncpg.connect(fresh_database_url)
        try:
            assert await run_audit(conn, composition.AUDIT_CHECKS) == []
            await conn.execute("update members set points_held = points_held + 5 where member_id = 'ann'")
            violations = await run_audit(conn, composition.AUDIT_CHECKS)
            assert "2 held points equal active holds" in {v.invariant for v in violations}
        finally:
            await conn.close()
            await services.close()
