"""Reading the ledger: a member's balance (through the cache), their activity, and warming the
cache with every member's balance."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, NamedTuple

import asyncpg
import msgspec

from konvert import errors
from konvert.batching import BatchedLookups
from konvert.db import Connection
from konvert.ledger import reads, store
from konvert.ledger.model import (
    ActivityItem,
    ActivityPage,
    Balance,
    Cause,
    ExpiringPoints,
    TierStatus,
    VestingPoints,
)
from konvert.observability import BALANCE_READS
from konvert.pagination import decode_cursor, encode_cursor
from konvert.redis_client import memory_use

if TYPE_CHECKING:
    from konvert.services import Services

_encode = msgspec.json.Encoder().encode
_expiring = msgspec.json.Decoder(list[ExpiringPoints]).decode
_vesting = msgspec.json.Decoder(list[VestingPoints]).decode
_balance = msgspec.json.Decoder(Balance).decode

# With ?expiring_within_days the balance lists every expiry date in the window, up to this many.
EXPIRING_DATES_MAX = 100


class BalanceReads:
    """Balance reads that missed the cache, batched: concurrent misses share one query, so one
    statement, one round trip and one wake-up of a PostgreSQL backend serve many requests."""

    def __init__(self, services: Services) -> None:
        pool, expiring = services.pool, services.program.points.expiring_lots_shown

        async def many(member_ids: list[str]) -> dict[str, asyncpg.Record]:
            return {row["member_id"]: row for row in await reads.select_balances(pool, member_ids, expiring)}

        async def one(member_id: str) -> asyncpg.Record | None:
            return await reads.select_balance(pool, member_id, expiring)

        self.lookups: BatchedLookups[str, asyncpg.Record] = BatchedLookups(
            many,
            look_up_one=one,
            # A value PostgreSQL refuses may come from one member id: each request gets its own outcome.
            alone_on=(asyncpg.DataError,),
            batch_size_max=services.settings.read_batch_size_max,
            batches_in_flight_max=services.settings.read_batches_in_flight_max,
        )

    async def get(self, member_id: str) -> asyncpg.Record | None:
        return await self.lookups.get(member_id)

    async def aclose(self) -> None:
        await self.lookups.aclose()


async def balance_body(services: Services, member_id: str) -> bytes:
    """The member's balance as JSON: from the cache, else from PostgreSQL (then cached)."""
    cached = await services.cache.get(member_id)
    if cached is not None:
        return cached
    balance = await read_balance(services, member_id)
    BALANCE_READS.labels("database").inc()
    body = _encode(balance)
    services.cache.put_soon(member_id, balance.version, body)
    return body


async def read_balance(services: Services, member_id: str, expiring_within_days: int | None = None) -> Balance:
    """The balance from PostgreSQL (the cache's source, and the path for expiry-window queries)."""
    if expiring_within_days is None:
        row = await services.shared(BalanceReads).get(member_id)
    else:
        before = services.clock() + timedelta(days=expiring_within_days)
        row = await reads.select_balance(services.pool, member_id, EXPIRING_DATES_MAX, before)
    if row is None:
        raise errors.MemberNotFound(f"no member {member_id!r}")
    return _balance_of(services, row)


async def committed_bodies(
    services: Services, conn: Connection, versions: dict[str, int], uids: list[int]
) -> list[tuple[str, int, bytes]]:
    """A write's members' balances as it leaves them, read in its transaction before it commits:
    (member id, version, body) for the cache, of the members whose id and version it changed."""
    rows = await reads.select_balances_by_uid(conn, uids, services.program.points.expiring_lots_shown)
    return [
        (row["member_id"], row["version"], _encode(_balance_of(services, row)))
        for row in rows
        if versions.get(row["member_id"]) == row["version"]
    ]


def decode_balance(body: bytes) -> Balance:
    """A balance from its JSON (as ``balance_body`` gives it)."""
    return _balance(body)


def _balance_of(services: Services, row: asyncpg.Record) -> Balance:
    return Balance(
        member_id=row["member_id"],
        available=row["points_available"],
        pending=row["points_pending"],
        held=row["points_held"],
        lifetime_earned=row["points_lifetime_earned"],
        reputation=row["reputation"],
        expiring=_expiring(row["expiring"]),
        tier=_tier_status(services, row),
        version=row["version"],
        vesting=_vesting(row["vesting"]),
    )


def _tier_status(services: Services, row: asyncpg.Record) -> TierStatus | None:
    tiers = services.program.tiers
    if row["tier"] is None or not tiers.levels:
        return None
    following = tiers.next_after(row["tier"])
    qualifying = row["tier_qualifying_points"]
    return TierStatus(
        name=row["tier"],
        qualifying_points=qualifying,
        window_days=tiers.window_days,
        next_tier=following.name if following else None,
        points_to_next_tier=max(following.min_points - qualifying, 0) if following else None,
        below_tier_since=row["tier_below_since"],
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
    traffic: a balance is cached only if nothing newer is. Stops early, before a page, when Redis
    uses ``memory_share_max`` of its maxmemory. Raises ServiceUnavailable when Redis does not
    take the balances."""
    expiring_lots = services.program.points.expiring_lots_shown
    warmed, after = 0, 0
    while rows := await reads.select_balances_after(services.pool, after, batch_size, expiring_lots):
        used, limit = await memory_use(services.redis)
        if limit and used >= limit * memory_share_max:
            return Warmed(warmed, (used, limit))
        balances = [(row["member_id"], row["version"], _encode(_balance_of(services, row))) for row in rows]
        if not await services.cache.put_many(balances):
            raise errors.ServiceUnavailable(f"Redis did not take the balances of the members after member_uid {after}")
        warmed += len(rows)
        after = rows[-1]["member_uid"]
    return Warmed(warmed)


async def vesting(services: Services, member_id: str, dates_max: int) -> list[VestingPoints]:
    """The member's pending points by the moment they become available, soonest first."""
    rows = await reads.select_vesting(services.pool, member_id, dates_max)
    return [VestingPoints(row["points"], row["vests_at"]) for row in rows]


async def activity(services: Services, member_id: str, cursor: str | None, limit: int) -> ActivityPage:
    """The member's transfers, newest first, a page at a time."""
    before = decode_cursor("t", cursor) if cursor else None
    member_uid = await store.select_member_uid(services.pool, member_id)
    if member_uid is None:
        raise errors.MemberNotFound(f"no member {member_id!r}")
    rows = await reads.select_activity(services.pool, member_uid, before, limit + 1)
    items = [activity_item(row) for row in rows[:limit]]
    next_cursor = encode_cursor("t", rows[limit - 1]["transfer_id"]) if len(rows) > limit else None
    return ActivityPage(items=items, next_cursor=next_cursor)


def activity_item(row: asyncpg.Record) -> ActivityItem:
    """A transfer as the member sees it: the change to their total, and which of their buckets."""
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
