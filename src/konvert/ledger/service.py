"""Ledger use cases: read a balance (through the cache), page through activity, vest lots."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import NamedTuple

import asyncpg
import msgspec

from konvert import errors, tiers
from konvert.fastredis import RedisUnavailable
from konvert.ledger import store
from konvert.ledger.model import ActivityItem, ActivityPage, Balance, Cause, ExpiringPoints, TierStatus
from konvert.observability import TALLY
from konvert.pagination import decode_cursor, encode_cursor
from konvert.services import Services

log = logging.getLogger("konvert.ledger")

_encode = msgspec.json.Encoder().encode


async def balance_body(services: Services, member_id: str) -> bytes:
    """The member's balance as JSON bytes: from the cache, else from PostgreSQL (then cached)."""
    cached = await services.balances.get(member_id)
    if cached is not None:
        return cached
    balance = await read_balance(services, member_id)
    TALLY.balance_read("database")
    body = _encode(balance)
    services.balances.put_soon(member_id, balance.version, body)
    return body


# With ?expiring_within_days the balance lists every expiry date in the window, up to this many.
EXPIRING_DATES_MAX = 100


async def read_balance(services: Services, member_id: str, expiring_within_days: int | None = None) -> Balance:
    """The balance from PostgreSQL (the cache's source, and the path for expiry-window queries)."""
    if expiring_within_days is None:
        row = await services.balance_reads.get(member_id)  # batched with concurrent reads
    else:
        before = services.clock() + timedelta(days=expiring_within_days)
        row = await store.select_balance(services.pool, member_id, EXPIRING_DATES_MAX, before)
    if row is None:
        raise errors.MemberNotFound(f"no member {member_id!r}")
    return _balance_of(services, row)


def _balance_of(services: Services, row: asyncpg.Record) -> Balance:
    return Balance(
        member_id=row["member_id"],
        available=row["points_available"],
        pending=row["points_pending"],
        held=row["points_held"],
        lifetime_earned=row["points_lifetime_earned"],
        reputation=row["reputation"],
        expiring=msgspec.json.decode(row["expiring"], type=list[ExpiringPoints]),
        tier=_tier_status(services, row),
        version=row["version"],
    )


class Warmed(NamedTuple):
    members: int
    # Set when warming stopped early because Redis neared its maxmemory: (used, maxmemory) bytes.
    stopped_at_memory: tuple[int, int] | None = None


# Warming stops once Redis uses this share of its maxmemory: past it, Redis would evict (the
# leaderboards too) or refuse writes (the invalidations of balances too), depending on its policy.
WARM_MEMORY_SHARE_MAX = 0.8


async def warm_balances(
    services: Services, batch_size: int = 1000, memory_share_max: float = WARM_MEMORY_SHARE_MAX
) -> Warmed:
    """Put every member's balance (erased members aside) in the cache, as a read that missed it
    would. For when Redis has lost them (a restart without persistence, a flush, a failover):
    reads then find their balances instead of all going to PostgreSQL at once. Safe beside live
    traffic: a balance is cached only if nothing newer is (a write committed meanwhile leaves its
    newer version there). Stops early, before a page, when Redis uses ``memory_share_max`` of its
    maxmemory. Raises RedisUnavailable when Redis does not take the balances."""
    expiring_lots = services.program.points.expiring_lots_shown
    warmed, after = 0, 0
    while rows := await store.select_balances_after(services.pool, after, batch_size, expiring_lots):
        memory = await services.redis.info("memory")
        used, limit = int(memory["used_memory"]), int(memory.get("maxmemory", 0))
        if limit and used >= limit * memory_share_max:
            return Warmed(warmed, (used, limit))
        balances = [(row["member_id"], row["version"], _encode(_balance_of(services, row))) for row in rows]
        if not await services.balances.put_many(balances):
            raise RedisUnavailable(f"Redis did not take the balances of the members after member_uid {after}")
        warmed += len(rows)
        after = rows[-1]["member_uid"]
    return Warmed(warmed)


def _tier_status(services: Services, row: asyncpg.Record) -> TierStatus | None:
    tiers_config = services.program.tiers
    if row["tier"] is None or not tiers_config.levels:
        return None
    following = tiers.next_tier(tiers_config.levels, row["tier"])
    qualifying = row["tier_qualifying_points"]
    return TierStatus(
        name=row["tier"],
        qualifying_points=qualifying,
        window_days=tiers_config.window_days,
        next_tier=following.name if following else None,
        points_to_next_tier=max(following.min_points - qualifying, 0) if following else None,
        below_tier_since=row["tier_below_since"],
    )


async def activity(services: Services, member_id: str, cursor: str | None, limit: int) -> ActivityPage:
    before = decode_cursor("t", cursor) if cursor else None
    member_uid = await store.select_member_uid(services.pool, member_id)
    if member_uid is None:
        raise errors.MemberNotFound(f"no member {member_id!r}")
    rows = await store.select_activity(services.pool, member_uid, before, limit + 1)
    items = [_activity_item(r) for r in rows[:limit]]
    next_cursor = encode_cursor("t", rows[limit - 1]["transfer_id"]) if len(rows) > limit else None
    return ActivityPage(items=items, next_cursor=next_cursor)


def _activity_item(row: msgspec.Struct | dict) -> ActivityItem:  # type: ignore[type-arg]
    amount = row["amount"]
    into_member, out_of_member = row["credit_is_member"], row["debit_is_member"]
    if into_member and out_of_member:
        delta, bucket, from_bucket = 0, row["credit_name"], row["debit_name"]
    elif into_member:
        delta, bucket, from_bucket = amount, row["credit_name"], None
    else:
        delta, bucket, from_bucket = -amount, row["debit_name"], None
    return ActivityItem(
        transfer_id=row["transfer_id"],
        code=row["code"],
        asset=row["asset"],
        amount=amount,
        delta=delta,
        bucket=bucket,
        from_bucket=from_bucket,
        cause=Cause(row["cause_type"], row["cause_ref"]),
        reason=row["reason"],
        lot_id=row["lot_id"],
        reverses_transfer_id=row["reverses_transfer_id"],
        created_at=row["created_at"],
    )


async def vest_due_lots(services: Services, now: datetime | None = None) -> int:
    """Make pending lots whose return window has closed available; return how many vested.

    Every purchase's lot comes through here, so it works in batches (``work_due_lots``): the
    due lots with their members locked, then every lot vested with its transfer and its
    member's balances in one statement (``store.vest_locked_lots``). A member with a refund
    debt, which vesting repays from the lots, is vested on its own.
    """
    now = now or services.clock()
    return await work_due_lots(
        services,
        "vesting",
        lock=lambda conn, passed_over: store.lock_due_pending_lots(
            conn, now, services.settings.jobs_batch_size, passed_over
        ),
        write=lambda conn, lot_ids: store.vest_locked_lots(conn, lot_ids, now),
        alone=lambda member_uid, lot_ids: _vest_member(services, member_uid, lot_ids, now),
        by_itself=lambda row: row["points_debt"] > 0,
    )


# Members a job failed to settle on their own, by job, with when (this process's clock): that
# job's batches pass over them for a while, so that a member whose rows are broken does not fail
# every batch its lots land in (they are the oldest due, so they would land in every one).
_FAILED_MEMBERS: dict[str, dict[int, float]] = {}
RETRY_FAILED_MEMBERS_AFTER_SECONDS = 600.0


def _passed_over(job: str) -> list[int]:
    failed = _FAILED_MEMBERS.setdefault(job, {})
    now = time.monotonic()
    for member_uid, failed_at in list(failed.items()):
        if now - failed_at >= RETRY_FAILED_MEMBERS_AFTER_SECONDS:
            del failed[member_uid]
    return list(failed)


async def work_due_lots(
    services: Services,
    job: str,
    *,
    lock: Callable[[asyncpg.Connection, list[int]], Awaitable[list[asyncpg.Record]]],
    write: Callable[[asyncpg.Connection, list[int]], Awaitable[list[asyncpg.Record]]],
    alone: Callable[[int, list[int]], Awaitable[int]],
    by_itself: Callable[[asyncpg.Record], bool] = lambda row: False,
) -> int:
    """One batch of a job over due lots (vesting, expiry); return how many lots it settled.

    One transaction, two statements: ``lock`` selects the due lots (``lot_id``, ``member_uid``,
    ``member_id``) with their members locked ``for update skip locked``, except the members it
    is given (those that failed lately), so processes running the job at once take different
    members and never wait for a lock; ``write`` settles the lots and returns ``(member_uid,
    version, lots)`` per member whose balances it moved. The batch holds its members' locks for
    its two statements (a purchase of one of them waits that long). Cached balances are
    invalidated after commit. The lots of members ``by_itself`` picks, and all of them if
    ``write`` failed, then go through ``alone`` member by member, each with its own outcome; a
    member that fails there is logged and passed over by this job for
    ``RETRY_FAILED_MEMBERS_AFTER_SECONDS``, so it holds up no one else's points for long.
    """
    due: list[asyncpg.Record] = []
    async with services.pool.acquire() as conn:
        try:
            async with conn.transaction():
                due = await lock(conn, _passed_over(job))
                batch = [row["lot_id"] for row in due if not by_itself(row)]
                moved = await write(conn, batch) if batch else []
            left = [row for row in due if by_itself(row)]
        except asyncpg.PostgresError:
            if not due:
                raise
            log.exception(f"{job} batch failed; settling its members one by one")
            moved, left = [], due
    member_ids = {row["member_uid"]: row["member_id"] for row in due}
    await services.balances.invalidate_many((member_ids[m["member_uid"]], m["version"]) for m in moved)
    settled = sum(m["lots"] for m in moved)
    by_member: dict[int, list[int]] = {}
    for row in left:
        by_member.setdefault(row["member_uid"], []).append(row["lot_id"])
    for member_uid, lot_ids in by_member.items():
        try:
            settled += await alone(member_uid, lot_ids)
        except Exception:  # logged; the member's lots stay due, and come up again later
            _FAILED_MEMBERS.setdefault(job, {})[member_uid] = time.monotonic()
            log.exception(f"{job} failed for a member; passing over it for a while", extra={"member_uid": member_uid})
    return settled


async def _vest_member(services: Services, member_uid: int, lot_ids: list[int], now: datetime) -> int:
    async with services.pool.acquire() as conn, conn.transaction():
        member = await store.lock_member(conn, member_uid)
        changed = await store.vest_lots(conn, member_uid, lot_ids, now)
        accounts = await store.select_member_account_ids(conn, member_uid)
        points = 0
        for lot in changed:
            if lot["remaining"] > 0:
                await store.insert_transfer(
                    conn,
                    member_uid=member_uid,
                    asset="points",
                    debit_account_id=accounts["pending"],
                    credit_account_id=accounts["available"],
                    amount=lot["remaining"],
                    code="vest",
                    cause_type="lot",
                    cause_ref=str(lot["lot_id"]),
                    lot_id=lot["lot_id"],
                    reason="return window closed",
                )
                points += lot["remaining"]
        if not changed:
            return 0
        version = await store.update_member_points(conn, member_uid, available=points, pending=-points)
        await store.settle_debt(conn, member_uid, member["points_debt"])
    await services.balances.invalidate(member["member_id"], version)
    return len(changed)


async def takes_for_spending(conn: asyncpg.Connection, member: asyncpg.Record, points: int) -> list[tuple[int, int]]:
    """The (lot_id, points) to take for spending ``points``, soonest-expiring first.

    ``member`` must be the member's row locked by this transaction: the check against its stored
    available balance under that lock is what makes overdrawing impossible.
    """
    available = member["points_available"]
    if available < points:
        raise errors.InsufficientPoints(f"{points} points needed, {max(available, 0)} available", available=max(available, 0))
    takes, missing = store.plan_takes(await store.lock_available_lots(conn, member["member_uid"]), points)
    assert missing == 0, "available points and available lots disagree"
    return takes


async def spend_points(
    services: Services, member_id: str, points: int, *, code: str, cause_type: str, cause_ref: str, reason: str
) -> int:
    """Move ``points`` from the member's available points to the program's ``redeemed`` account,
    consuming lots soonest-expiring first; return the transfer id.

    Never overdraws: under the member's row lock, fewer available points than asked raises
    InsufficientPoints and writes nothing.
    """
    async with services.pool.acquire() as conn, conn.transaction():
        member_uid = await store.select_member_uid(conn, member_id)
        if member_uid is None:
            raise errors.MemberNotFound(f"no member {member_id!r}")
        member = await store.lock_member(conn, member_uid)
        takes = await takes_for_spending(conn, member, points)
        accounts = await store.select_member_account_ids(conn, member_uid)
        transfer_id = await store.insert_transfer(
            conn,
            member_uid=member_uid,
            asset="points",
            debit_account_id=accounts["available"],
            credit_account_id=await services.accounts.id(conn, "points", "redeemed"),
            amount=points,
            code=code,
            cause_type=cause_type,
            cause_ref=cause_ref,
            reason=reason,
        )
        await store.take_from_lots(conn, member_uid, takes, transfer_id, code)
        version = await store.update_member_points(conn, member_uid, available=-points)
    await services.balances.invalidate(member_id, version)
    return transfer_id
