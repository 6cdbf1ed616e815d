"""Ledger SQL: members, accounts, transfers, lots. Plain async functions, connection first.

None of these commit: the use case that calls them owns the transaction. Locking order, to
keep concurrent use cases free of deadlocks: a member's row first, then that member's lots.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import asyncpg

MEMBER_ACCOUNTS = (("points", "available"), ("points", "pending"), ("points", "held"), ("reputation", "reputation"))


async def select_member_uid(conn: asyncpg.Connection, member_id: str) -> int | None:
    return await conn.fetchval("select member_uid from members where member_id = $1", member_id)


async def ensure_member(conn: asyncpg.Connection, member_id: str) -> int:
    """The member's uid, creating the member and its accounts on first use."""
    uid = await select_member_uid(conn, member_id)
    if uid is not None:
        return uid
    uid = await conn.fetchval(
        """
        with member as (
            insert into members (member_id) values ($1)
            on conflict (member_id) do nothing
            returning member_uid
        ), accounts as (
            insert into accounts (member_uid, asset, name)
            select member.member_uid, a.asset, a.name
            from member, unnest($2::text[], $3::text[]) as a (asset, name)
        )
        select member_uid from member
        """,
        member_id,
        [a for a, _ in MEMBER_ACCOUNTS],
        [n for _, n in MEMBER_ACCOUNTS],
    )
    if uid is None:
        # A concurrent request created the member first; its row is committed now.
        uid = await select_member_uid(conn, member_id)
    assert uid is not None
    return uid


# What the use cases that lock a member read of its row (qualify with ``m.`` where joined).
LOCKED_MEMBER_COLUMNS = """m.member_uid, m.member_id, m.points_available, m.points_pending, m.points_held,
    m.points_debt, m.points_lifetime_earned, m.reputation, m.version"""


async def lock_member(conn: asyncpg.Connection, member_uid: int) -> asyncpg.Record:
    return await conn.fetchrow(
        f"select {LOCKED_MEMBER_COLUMNS} from members m where m.member_uid = $1 for update",
        member_uid,
    )


async def ensure_system_account(conn: asyncpg.Connection, asset: str, name: str) -> int:
    account_id = await conn.fetchval(
        """
        insert into accounts (member_uid, asset, name) values (null, $1, $2)
        on conflict (member_uid, asset, name) do nothing
        returning account_id
        """,
        asset,
        name,
    )
    if account_id is None:
        account_id = await conn.fetchval(
            "select account_id from accounts where member_uid is null and asset = $1 and name = $2", asset, name
        )
    return account_id


async def select_member_account_ids(conn: asyncpg.Connection, member_uid: int) -> dict[str, int]:
    rows = await conn.fetch("select name, account_id from accounts where member_uid = $1", member_uid)
    return {r["name"]: r["account_id"] for r in rows}


async def insert_transfer(
    conn: asyncpg.Connection,
    *,
    member_uid: int,
    asset: str,
    debit_account_id: int,
    credit_account_id: int,
    amount: int,
    code: str,
    cause_type: str,
    cause_ref: str,
    lot_id: int | None = None,
    reverses_transfer_id: int | None = None,
    reason: str | None = None,
) -> int:
    return await conn.fetchval(
        """
        insert into transfers (member_uid, asset, debit_account_id, credit_account_id, amount, code,
                               cause_type, cause_ref, lot_id, reverses_transfer_id, reason)
        values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
        returning transfer_id
        """,
        member_uid,
        asset,
        debit_account_id,
        credit_account_id,
        amount,
        code,
        cause_type,
        cause_ref,
        lot_id,
        reverses_transfer_id,
        reason,
    )


async def update_member_points(
    conn: asyncpg.Connection,
    member_uid: int,
    *,
    available: int = 0,
    pending: int = 0,
    held: int = 0,
    debt: int = 0,
    lifetime_earned: int = 0,
) -> int:
    """Apply deltas to the stored balances; return the new version."""
    return await conn.fetchval(
        """
        update members
        set points_available = points_available + $2, points_pending = points_pending + $3,
            points_held = points_held + $4, points_debt = points_debt + $5,
            points_lifetime_earned = points_lifetime_earned + $6, version = version + 1
        where member_uid = $1
        returning version
        """,
        member_uid,
        available,
        pending,
        held,
        debt,
        lifetime_earned,
    )


async def lock_lot(conn: asyncpg.Connection, lot_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "select lot_id, member_uid, amount, remaining, state, expires_at from lots where lot_id = $1 for update",
        lot_id,
    )


async def lock_available_lots(conn: asyncpg.Connection, member_uid: int, exclude_lot_id: int | None = None) -> list[asyncpg.Record]:
    """A member's available lots with points left, soonest expiring first (never-expiring last)."""
    return await conn.fetch(
        """
        select lot_id, remaining from lots
        where member_uid = $1 and state = 'available' and remaining > 0 and lot_id is distinct from $2
        order by expires_at nulls last, lot_id
        for update
        """,
        member_uid,
        exclude_lot_id,
    )


async def take_from_lots(
    conn: asyncpg.Connection, member_uid: int, takes: Sequence[tuple[int, int]], transfer_id: int | None, kind: str
) -> None:
    """Take (lot_id, points) from lots and record each take as a lot entry."""
    if not takes:
        return
    lot_ids = [lot for lot, _ in takes]
    amounts = [amount for _, amount in takes]
    await conn.execute(
        """
        with takes as (select * from unnest($1::bigint[], $2::bigint[]) as t (lot_id, amount)),
        updated as (
            update lots set remaining = lots.remaining - takes.amount
            from takes where lots.lot_id = takes.lot_id
        )
        insert into lot_entries (lot_id, member_uid, transfer_id, amount, kind)
        select lot_id, $3, $4, amount, $5 from takes
        """,
        lot_ids,
        amounts,
        member_uid,
        transfer_id,
        kind,
    )


def plan_takes(lots: Sequence[asyncpg.Record], points: int) -> tuple[list[tuple[int, int]], int]:
    """Take up to ``points`` from lots in their order; return the takes and what is still missing."""
    takes = []
    missing = points
    for lot in lots:
        if missing == 0:
            break
        take = min(missing, lot["remaining"])
        if take > 0:
            takes.append((lot["lot_id"], take))
            missing -= take
    return takes, missing


async def settle_debt(conn: asyncpg.Connection, member_uid: int, debt: int) -> int:
    """Repay a refund debt from the member's available lots; return the debt repaid.

    The stored available balance already counts the debt, so repaying moves no points: it only
    makes the lots agree with the balance (available = available lots - debt).
    """
    if debt <= 0:
        return 0
    takes, missing = plan_takes(await lock_available_lots(conn, member_uid), debt)
    repaid = debt - missing
    if repaid:
        await take_from_lots(conn, member_uid, takes, None, "debt")
        await conn.execute("update members set points_debt = points_debt - $2 where member_uid = $1", member_uid, repaid)
    return repaid


async def select_balance(
    conn: asyncpg.Connection | asyncpg.Pool, member_id: str, expiring_lots: int, expiring_before: datetime | None = None
) -> asyncpg.Record | None:
    """The member's stored balances, tier, and the soonest-expiring points grouped by date
    (``expiring_lots`` dates at most, or only those expiring before ``expiring_before``)."""
    rows = await select_balances(conn, [member_id], expiring_lots, expiring_before)
    return rows[0] if rows else None


def _balances_sql(members: str) -> str:
    """Stored balances, tier and the soonest-expiring points grouped by date (at most $2 dates,
    only those before $3 unless it is null) of the members that ``members`` selects (the
    query's tail, over ``members m``)."""
    return f"""
        select m.member_uid, m.member_id, m.points_available, m.points_pending, m.points_held, m.points_debt,
               m.points_lifetime_earned, m.reputation, m.version,
               m.tier, m.tier_qualifying_points, m.tier_below_since,
               coalesce((
                   select json_agg(json_build_object('points', e.points, 'expires_at', e.expires_at)
                                   order by e.expires_at)
                   from (
                       select expires_at, sum(remaining) as points from lots
                       where member_uid = m.member_uid and remaining > 0 and state <> 'expired'
                         and expires_at is not null and ($3::timestamptz is null or expires_at < $3)
                       group by expires_at order by expires_at limit $2
                   ) e
               ), '[]') as expiring
        {members}
    """


_BALANCES_OF = _balances_sql("from members m where m.member_id = any($1::text[])")
_BALANCES_AFTER = _balances_sql(
    "from members m where m.member_uid > $1 and m.erased_at is null order by m.member_uid limit $4"
)


async def select_balances(
    conn: asyncpg.Connection | asyncpg.Pool,
    member_ids: list[str],
    expiring_lots: int,
    expiring_before: datetime | None = None,
) -> list[asyncpg.Record]:
    """``select_balance`` for several members in one statement (those that exist, in no order)."""
    return await conn.fetch(_BALANCES_OF, member_ids, expiring_lots, expiring_before)


async def select_balances_after(
    conn: asyncpg.Connection | asyncpg.Pool, after_member_uid: int, limit: int, expiring_lots: int
) -> list[asyncpg.Record]:
    """``select_balance`` for the next ``limit`` members (erased ones aside) in member_uid order
    after ``after_member_uid``: a page of every member's balance."""
    return await conn.fetch(_BALANCES_AFTER, after_member_uid, expiring_lots, None, limit)


async def select_activity(
    conn: asyncpg.Connection | asyncpg.Pool, member_uid: int, before_transfer_id: int | None, limit: int
) -> list[asyncpg.Record]:
    return await conn.fetch(
        """
        select t.transfer_id, t.code, t.asset, t.amount, t.cause_type, t.cause_ref, t.lot_id,
               t.reverses_transfer_id, t.reason, t.created_at,
               d.member_uid is not null as debit_is_member, d.name as debit_name,
               c.member_uid is not null as credit_is_member, c.name as credit_name
        from transfers t
        join accounts d on d.account_id = t.debit_account_id
        join accounts c on c.account_id = t.credit_account_id
        where t.member_uid = $1 and ($2::bigint is null or t.transfer_id < $2)
        order by t.transfer_id desc
        limit $3
        """,
        member_uid,
        before_transfer_id,
        limit,
    )


async def lock_due_pending_lots(
    conn: asyncpg.Connection, now: datetime, limit: int, passed_over: Sequence[int] = ()
) -> list[asyncpg.Record]:
    """Up to ``limit`` pending lots whose return window has closed, oldest due first, of members
    this transaction now holds locked; lots of members another transaction holds, and of the
    members ``passed_over``, are left for later. With each lot its member's id and refund debt."""
    return await conn.fetch(LOCK_DUE_PENDING_LOTS, now, limit, list(passed_over))


# In the order of lots_vesting_order_idx (migration 0012): a batch reads its own lots only, however
# many are due at the same moment.
LOCK_DUE_PENDING_LOTS = """
select l.lot_id, l.member_uid, m.member_id, m.points_debt from lots l
join members m on m.member_uid = l.member_uid
where l.state = 'pending' and l.vests_at <= $1 and l.member_uid <> all($3::bigint[])
order by l.vests_at, l.lot_id
limit $2
for update of m skip locked
"""


# Vests the given lots of members the transaction holds locked, in one statement: each lot still
# pending becomes available, with a transfer of what remains of it from the member's pending
# account to their available one, and each member's balances move by the sum (version + 1). A
# member without those accounts fails the whole statement (left joins: not null), as it should.
_VEST_LOTS = """
with vested as (
    update lots set state = 'available'
    where lot_id = any($1::bigint[]) and state = 'pending' and vests_at <= $2
    returning lot_id, member_uid, remaining
), moved as (
    insert into transfers (member_uid, asset, debit_account_id, credit_account_id, amount, code,
                           cause_type, cause_ref, lot_id, reason)
    select v.member_uid, 'points', pending.account_id, available.account_id, v.remaining, 'vest',
           'lot', v.lot_id::text, v.lot_id, 'return window closed'
    from vested v
    left join accounts pending on pending.member_uid = v.member_uid and pending.asset = 'points'
                              and pending.name = 'pending'
    left join accounts available on available.member_uid = v.member_uid and available.asset = 'points'
                                and available.name = 'available'
    where v.remaining > 0
), per_member as (
    select member_uid, sum(remaining)::bigint as points, count(*) as lots from vested group by member_uid
)
update members m
set points_available = points_available + p.points, points_pending = points_pending - p.points,
    version = version + 1
from per_member p
where m.member_uid = p.member_uid
returning m.member_uid, m.version, p.lots
"""


async def vest_locked_lots(conn: asyncpg.Connection, lot_ids: Sequence[int], now: datetime) -> list[asyncpg.Record]:
    """Vest these due lots (of members without a refund debt, locked by this transaction);
    return (member_uid, version, lots) per member whose balances moved."""
    return await conn.fetch(_VEST_LOTS, list(lot_ids), now)


async def vest_lots(conn: asyncpg.Connection, member_uid: int, lot_ids: Sequence[int], now: datetime) -> list[asyncpg.Record]:
    """Mark the member's due pending lots available; return (lot_id, remaining) of those changed."""
    return await conn.fetch(
        """
        update lots set state = 'available'
        where lot_id = any($2::bigint[]) and member_uid = $1 and state = 'pending' and vests_at <= $3
        returning lot_id, remaining
        """,
        member_uid,
        list(lot_ids),
        now,
    )


async def lock_lot_states(conn: asyncpg.Connection, lot_ids: Sequence[int]) -> dict[int, str]:
    rows = await conn.fetch(
        "select lot_id, state from lots where lot_id = any($1::bigint[]) order by lot_id for update", list(lot_ids)
    )
    return {r["lot_id"]: r["state"] for r in rows}


async def return_to_lots(
    conn: asyncpg.Connection, member_uid: int, returns: Sequence[tuple[int, int]], transfer_id: int, kind: str
) -> None:
    """Give (lot_id, points) back to lots they were taken from, recorded as negative entries."""
    await take_from_lots(conn, member_uid, [(lot, -points) for lot, points in returns], transfer_id, kind)
