"""Rewards, redemptions, adjustments and expiry SQL. Connection first; the use case commits."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import asyncpg

from konvert.ledger.store import LOCKED_MEMBER_COLUMNS
from konvert.program import Reward

_REWARD_COLUMNS = "reward_id, name, description, cost_points, stock, available_from, available_until, active"
_REDEMPTION_COLUMNS = """
    r.redemption_pk, r.redemption_id, m.member_id, r.member_uid, r.reward_id, r.points, r.status,
    r.hold_expires_at, r.allocations::text, r.transfer_id, r.closing_transfer_id, r.created_at, r.updated_at
"""


async def seed_rewards(conn: asyncpg.Connection, rewards: tuple[Reward, ...]) -> None:
    """Insert the program file's rewards that the catalog does not have yet (operator edits win)."""
    await conn.executemany(
        f"""
        insert into rewards ({_REWARD_COLUMNS}) values ($1, $2, $3, $4, $5, $6, $7, $8)
        on conflict (reward_id) do nothing
        """,
        [
            (
                r.reward_id,
                r.name,
                r.description,
                r.cost_points,
                r.stock,
                r.available_from,
                r.available_until,
                r.active,
            )
            for r in rewards
        ],
    )


async def select_available_rewards(
    conn: asyncpg.Connection | asyncpg.Pool, now: datetime, limit: int
) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"""
        select {_REWARD_COLUMNS} from rewards
        where active and (available_from is null or available_from <= $1)
          and (available_until is null or available_until > $1) and (stock is null or stock > 0)
        order by cost_points, reward_id limit $2
        """,
        now,
        limit,
    )


async def upsert_reward(conn: asyncpg.Connection | asyncpg.Pool, reward: Reward) -> asyncpg.Record:
    return await conn.fetchrow(
        f"""
        insert into rewards ({_REWARD_COLUMNS}) values ($1, $2, $3, $4, $5, $6, $7, $8)
        on conflict (reward_id) do update set
            name = excluded.name, description = excluded.description, cost_points = excluded.cost_points,
            stock = excluded.stock, available_from = excluded.available_from,
            available_until = excluded.available_until, active = excluded.active, updated_at = now()
        returning {_REWARD_COLUMNS}
        """,
        reward.reward_id,
        reward.name,
        reward.description,
        reward.cost_points,
        reward.stock,
        reward.available_from,
        reward.available_until,
        reward.active,
    )


async def select_reward(conn: asyncpg.Connection, reward_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow(f"select {_REWARD_COLUMNS} from rewards where reward_id = $1", reward_id)


async def take_one_from_stock(conn: asyncpg.Connection, reward_id: str) -> bool:
    """Take one unit of a limited-stock reward; False when none is left. Only rewards with a
    stock are locked (briefly, by this update): an unlimited reward is no row shared by all."""
    taken = await conn.fetchval(
        "update rewards set stock = stock - 1, updated_at = now() where reward_id = $1 and stock > 0 returning stock",
        reward_id,
    )
    return taken is not None


async def change_stock(conn: asyncpg.Connection, reward_id: str, delta: int) -> None:
    await conn.execute(
        "update rewards set stock = stock + $2, updated_at = now() where reward_id = $1 and stock is not null",
        reward_id,
        delta,
    )


async def lock_member_for_spending(conn: asyncpg.Connection, member_id: str) -> asyncpg.Record | None:
    """Lock the member's row (None if there is no such member) and return it with the ids of its
    available and held accounts and a fresh transfer id: what a redemption needs of the member,
    in one round trip instead of three while the member's row is locked."""
    return await conn.fetchrow(
        f"""
        select {LOCKED_MEMBER_COLUMNS},
               (select account_id from accounts a
                where a.member_uid = m.member_uid and a.asset = 'points' and a.name = 'available') as available_account_id,
               (select account_id from accounts a
                where a.member_uid = m.member_uid and a.asset = 'points' and a.name = 'held') as held_account_id,
               nextval('transfers_transfer_id_seq') as transfer_id
        from members m where m.member_id = $1
        for update of m
        """,
        member_id,
    )


async def write_redemption(
    conn: asyncpg.Connection,
    *,
    transfer_id: int,
    member_uid: int,
    debit_account_id: int,
    credit_account_id: int,
    points: int,
    held: bool,
    reason: str,
    takes: list[tuple[int, int]],
    redemption_id: str,
    reward_id: str | None,
    hold_expires_at: datetime | None,
    allocations: str,
    note: str | None,
    request_hash: bytes,
    response: bytes,
    now: datetime,
) -> int:
    """A redemption's writes in one statement: its transfer (with the id from
    ``lock_member_for_spending``), the takes from its lots and their lot entries, the redemption
    itself and the member's balances (available less ``points``, held more when ``held``).
    Returns the member's new version."""
    return await conn.fetchval(
        """
        with transfer as (
            insert into transfers (transfer_id, member_uid, asset, debit_account_id, credit_account_id, amount,
                                   code, cause_type, cause_ref, reason)
            overriding system value
            values ($1, $2, 'points', $3, $4, $5, $6, 'redemption', $7, $8)
        ), takes as (
            select * from unnest($9::bigint[], $10::bigint[]) as t (lot_id, amount)
        ), taken as (
            update lots set remaining = lots.remaining - takes.amount from takes where lots.lot_id = takes.lot_id
        ), entries as (
            insert into lot_entries (lot_id, member_uid, transfer_id, amount, kind)
            select lot_id, $2, $1, amount, $6 from takes
        ), redemption as (
            insert into redemptions (redemption_id, member_uid, reward_id, points, status, hold_expires_at,
                                     allocations, transfer_id, note, request_hash, response, created_at, updated_at)
            values ($7, $2, $11, $5, $12, $13, $14::text::jsonb, $1, $15, $16, $17, $18, $18)
        )
        update members
        set points_available = points_available - $5, points_held = points_held + $19, version = version + 1
        where member_uid = $2
        returning version
        """,
        transfer_id,
        member_uid,
        debit_account_id,
        credit_account_id,
        points,
        "hold" if held else "redeem",
        redemption_id,
        reason,
        [lot for lot, _ in takes],
        [amount for _, amount in takes],
        reward_id,
        "held" if held else "captured",
        hold_expires_at,
        allocations,
        note,
        request_hash,
        response,
        now,
        points if held else 0,
    )


async def select_redemption_replay(conn: asyncpg.Connection, redemption_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "select request_hash, response from redemptions where redemption_id = $1", redemption_id
    )


async def insert_redemption(
    conn: asyncpg.Connection,
    *,
    redemption_id: str,
    member_uid: int,
    reward_id: str | None,
    points: int,
    status: str,
    hold_expires_at: datetime | None,
    allocations: str,
    transfer_id: int,
    note: str | None,
    request_hash: bytes,
    response: bytes,
    now: datetime,
) -> None:
    await conn.execute(
        """
        insert into redemptions (redemption_id, member_uid, reward_id, points, status, hold_expires_at, allocations,
                                 transfer_id, note, request_hash, response, created_at, updated_at)
        values ($1, $2, $3, $4, $5, $6, $7::text::jsonb, $8, $9, $10, $11, $12, $12)
        """,
        redemption_id,
        member_uid,
        reward_id,
        points,
        status,
        hold_expires_at,
        allocations,
        transfer_id,
        note,
        request_hash,
        response,
        now,
    )


async def select_redemption(
    conn: asyncpg.Connection, redemption_id: str, lock: bool = False
) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"""
        select {_REDEMPTION_COLUMNS} from redemptions r join members m using (member_uid)
        where r.redemption_id = $1 {"for update of r" if lock else ""}
        """,
        redemption_id,
    )


async def close_redemption(
    conn: asyncpg.Connection, redemption_pk: int, status: str, closing_transfer_id: int | None, now: datetime
) -> asyncpg.Record:
    return await conn.fetchrow(
        """
        update redemptions set status = $2, closing_transfer_id = $3, updated_at = $4
        where redemption_pk = $1
        returning updated_at
        """,
        redemption_pk,
        status,
        closing_transfer_id,
        now,
    )


async def select_member_redemptions(
    conn: asyncpg.Connection | asyncpg.Pool, member_uid: int, before_pk: int | None, limit: int
) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"""
        select {_REDEMPTION_COLUMNS} from redemptions r join members m using (member_uid)
        where r.member_uid = $1 and ($2::bigint is null or r.redemption_pk < $2)
        order by r.redemption_pk desc limit $3
        """,
        member_uid,
        before_pk,
        limit,
    )


async def select_expired_holds(
    conn: asyncpg.Connection | asyncpg.Pool, now: datetime, limit: int
) -> list[str]:
    rows = await conn.fetch(
        """
        select redemption_id from redemptions where status = 'held' and hold_expires_at <= $1
        order by hold_expires_at limit $2
        """,
        now,
        limit,
    )
    return [r["redemption_id"] for r in rows]


async def lock_expiring_lots(
    conn: asyncpg.Connection, now: datetime, limit: int, passed_over: Sequence[int] = ()
) -> list[asyncpg.Record]:
    """Up to ``limit`` lots whose expiry has come, soonest first, of members this transaction
    now holds locked; lots of members another transaction holds, and of the members
    ``passed_over``, are left for later."""
    return await conn.fetch(LOCK_EXPIRING_LOTS, now, limit, list(passed_over))


# In the order of lots_expiry_order_idx (migration 0012).
LOCK_EXPIRING_LOTS = """
select l.lot_id, l.member_uid, m.member_id from lots l
join members m on m.member_uid = l.member_uid
where l.state <> 'expired' and l.expires_at <= $1 and l.member_uid <> all($3::bigint[])
order by l.expires_at, l.lot_id
limit $2
for update of m skip locked
"""


# Expires the given due lots of members the transaction holds locked, in one statement: what
# remains of each goes from the member's account for the lot's state to the program's expired
# account (a transfer, and a lot entry taking it), the lot is marked expired, and each member's
# balances move by the sums (version + 1). The statement's snapshot is taken after the members
# were locked, and every writer of lots locks their member first, so `due` is current.
_EXPIRE_LOTS = """
with due as (
    select lot_id, member_uid, remaining, state, expires_at from lots
    where lot_id = any($1::bigint[]) and state <> 'expired' and expires_at <= $2
), marked as (
    update lots set state = 'expired', remaining = 0 from due where lots.lot_id = due.lot_id
), moved as (
    insert into transfers (member_uid, asset, debit_account_id, credit_account_id, amount, code,
                           cause_type, cause_ref, lot_id, reason)
    select d.member_uid, 'points', bucket.account_id, $3, d.remaining, 'expire', 'lot', d.lot_id::text,
           d.lot_id, 'points expired on ' || to_char(d.expires_at at time zone 'UTC', 'YYYY-MM-DD')
    from due d
    left join accounts bucket on bucket.member_uid = d.member_uid and bucket.asset = 'points'
                             and bucket.name = d.state
    where d.remaining > 0
    order by d.expires_at, d.lot_id
    returning transfer_id, lot_id, member_uid, amount
), entries as (
    insert into lot_entries (lot_id, member_uid, transfer_id, amount, kind)
    select lot_id, member_uid, transfer_id, amount, 'expire' from moved
), per_member as (
    select member_uid, count(*) as lots,
           coalesce(sum(remaining) filter (where state = 'available'), 0)::bigint as available,
           coalesce(sum(remaining) filter (where state = 'pending'), 0)::bigint as pending
    from due group by member_uid
)
update members m
set points_available = points_available - p.available, points_pending = points_pending - p.pending,
    version = version + 1
from per_member p
where m.member_uid = p.member_uid
returning m.member_uid, m.version, p.lots
"""


async def expire_locked_lots(
    conn: asyncpg.Connection, lot_ids: list[int], now: datetime, expired_account_id: int
) -> list[asyncpg.Record]:
    """Expire these due lots (of members locked by this transaction); return (member_uid,
    version, lots) per member whose balances moved."""
    return await conn.fetch(_EXPIRE_LOTS, lot_ids, now, expired_account_id)


async def lock_due_lots(conn: asyncpg.Connection, member_uid: int, now: datetime) -> list[asyncpg.Record]:
    return await conn.fetch(
        """
        select lot_id, remaining, state, expires_at from lots
        where member_uid = $1 and state <> 'expired' and expires_at <= $2
        order by expires_at, lot_id for update
        """,
        member_uid,
        now,
    )


async def mark_lots_expired(conn: asyncpg.Connection, lot_ids: list[int]) -> None:
    await conn.execute("update lots set state = 'expired' where lot_id = any($1::bigint[])", lot_ids)


async def select_adjustment_replay(conn: asyncpg.Connection, adjustment_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "select request_hash, response from adjustments where adjustment_id = $1", adjustment_id
    )


async def insert_adjustment(
    conn: asyncpg.Connection,
    *,
    adjustment_id: str,
    member_uid: int,
    points: int,
    reason_code: str,
    note: str,
    key_id: int,
    key_name: str,
    transfer_id: int,
    request_hash: bytes,
    response: bytes,
) -> None:
    await conn.execute(
        """
        insert into adjustments (adjustment_id, member_uid, points, reason_code, note, key_id, key_name, transfer_id,
                                 request_hash, response)
        values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
        """,
        adjustment_id,
        member_uid,
        points,
        reason_code,
        note,
        key_id,
        key_name,
        transfer_id,
        request_hash,
        response,
    )


async def insert_lot(
    conn: asyncpg.Connection,
    member_uid: int,
    points: int,
    state: str,
    vests_at: datetime,
    expires_at: datetime | None,
) -> int:
    return await conn.fetchval(
        """
        insert into lots (member_uid, amount, remaining, state, vests_at, expires_at)
        values ($1, $2, $2, $3, $4, $5) returning lot_id
        """,
        member_uid,
        points,
        state,
        vests_at,
        expires_at,
    )
