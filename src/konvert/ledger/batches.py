"""The ledger's SQL for many members at once: the postings that every purchase and every lot
goes through (earning, vesting, expiry), one statement per batch.

Rows travel as arrays (``unnest``): PostgreSQL plans and starts each statement once per batch,
not once per row, and the driver sends a few arrays instead of a message per row. Every read of
a member's table names the batch's members as values too (``member_uid = any($1)``), not only
through a join with the arrays: that is what lets Citus send the statement to those members'
shards alone (docs/SCALING.md, "Citus"). Like
konvert.ledger.store, these are the only writers of the ledger's tables; each returns the
member_uid, member_id and new version of every member whose balances moved.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, NamedTuple

import asyncpg

from konvert.db import Connection, Row
from konvert.ledger.store import MEMBER_COLUMNS, TierStanding, lock_by_member

# A due lot as the jobs' lock statements return it: its member_uid and lot_id (and more).
LotOf = Row


class Earn(NamedTuple):
    """Points a member earns into a new lot (a purchase's). With 0 points nothing is posted, but
    the member's version still moves: the cause (a purchase) is part of what the member did."""

    member_uid: int
    points: int
    state: str  # pending or available
    vests_at: datetime
    expires_at: datetime | None
    source_account_id: int
    cause_type: str
    cause_ref: str
    reason: str


class Earned(NamedTuple):
    """What ``post_earns`` made of an earn: its lot and transfer (None for 0 points)."""

    lot_id: int | None
    transfer_id: int | None


async def post_earns(
    conn: Connection, earns: Sequence[Earn], standings: Sequence[TierStanding]
) -> tuple[list[Earned], list[asyncpg.Record]]:
    """Post earns of members this transaction holds locked, in one statement: each lot, its earn
    transfer, and every member's balances and lifetime points (version + the number of earns),
    with the tier standing given for it (members without one keep theirs). Returns each earn's
    lot and transfer, in order, and the row of every member posted to (member_uid, member_id,
    version, points_debt, points_available)."""
    rows = await conn.fetch(
        _POST_EARNS,
        [e.member_uid for e in earns],
        [e.points for e in earns],
        [e.state for e in earns],
        [e.vests_at for e in earns],
        [e.expires_at for e in earns],
        [e.source_account_id for e in earns],
        [e.cause_type for e in earns],
        [e.cause_ref for e in earns],
        [e.reason for e in earns],
        [s.member_uid for s in standings],
        [s.tier for s in standings],
        [s.below_since for s in standings],
        [s.qualifying_points for s in standings],
    )
    earned = [Earned(None, None)] * len(earns)
    members = {}
    for row in rows:
        if row["ord"] is not None:
            earned[row["ord"] - 1] = Earned(row["lot_id"], row["transfer_id"])
        members[row["member_uid"]] = row
    return earned, list(members.values())


_POST_EARNS = """
with earn as (
    select *
    from unnest($1::bigint[], $2::bigint[], $3::text[], $4::timestamptz[], $5::timestamptz[], $6::bigint[],
                $7::text[], $8::text[], $9::text[])
         with ordinality as e (member_uid, points, state, vests_at, expires_at, source_account_id, cause_type,
                               cause_ref, reason, ord)
), posted as materialized (
    select e.*, nextval('lots_lot_id_seq') as lot_id, nextval('transfers_transfer_id_seq') as transfer_id
    from earn e where e.points > 0
), lot as (
    insert into lots (lot_id, member_uid, amount, remaining, state, vests_at, expires_at)
    overriding system value
    select lot_id, member_uid, points, points, state, vests_at, expires_at from posted order by ord
), transfer as (
    insert into transfers (transfer_id, member_uid, asset, debit_account_id, credit_account_id, amount, code,
                           cause_type, cause_ref, lot_id, reason)
    overriding system value
    -- Left: a member without the account leaves credit_account_id null, which the table refuses,
    -- so the statement fails whole instead of writing a lot without its transfer.
    select p.transfer_id, p.member_uid, 'points', p.source_account_id, a.account_id, p.points, 'earn',
           p.cause_type, p.cause_ref, p.lot_id, p.reason
    from posted p
    left join accounts a on a.member_uid = p.member_uid and a.asset = 'points' and a.name = p.state
                        and a.member_uid = any($1::bigint[])
    order by p.ord
), change as (
    select member_uid,
           coalesce(sum(points) filter (where state = 'pending'), 0) as pending,
           coalesce(sum(points) filter (where state = 'available'), 0) as available,
           sum(points) as earned, count(*) as earns
    from earn group by member_uid
), standing as (
    select * from unnest($10::bigint[], $11::text[], $12::timestamptz[], $13::bigint[])
                  as s (member_uid, tier, below_since, qualifying_points)
), updated as (
    update members m
    set points_pending = m.points_pending + c.pending,
        points_available = m.points_available + c.available,
        points_lifetime_earned = m.points_lifetime_earned + c.earned,
        -- Not tier_evaluated_at, which the daily tier job keeps: it is indexed, and an update that
        -- changes no indexed column rewrites the row in place (no new index entries).
        tier = case when s.member_uid is null then m.tier else s.tier end,
        tier_below_since = case when s.member_uid is null then m.tier_below_since else s.below_since end,
        tier_qualifying_points = coalesce(s.qualifying_points, m.tier_qualifying_points),
        version = m.version + c.earns
    from change c left join standing s using (member_uid)
    where m.member_uid = c.member_uid and m.member_uid = any($1::bigint[])
    returning m.member_uid, m.member_id, m.version, m.points_debt, m.points_available
)
select u.member_uid, u.member_id, u.version, u.points_debt, u.points_available, p.ord, p.lot_id, p.transfer_id
from updated u left join posted p using (member_uid)
"""


class ReputationPosting(NamedTuple):
    """Reputation to (positive) or from (negative) a member's account, against a system account."""

    member_uid: int
    amount: int
    system_account_id: int
    code: str
    cause_type: str
    cause_ref: str
    reason: str
    reverses_transfer_id: int | None


async def post_reputation(
    conn: Connection, postings: Sequence[ReputationPosting]
) -> tuple[list[int], list[asyncpg.Record]]:
    """Post reputation moves of members this transaction holds locked, in one statement: a
    transfer each, and each member's reputation (version + 1). Returns the transfers' ids in
    order and the row of every member posted to."""
    rows = await conn.fetch(_POST_REPUTATION, *zip(*postings, strict=True))
    return list(rows[0]["transfer_ids"]), rows


_POST_REPUTATION = f"""
with move as materialized (
    select m.*, nextval('transfers_transfer_id_seq') as transfer_id
    from unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[],
                $8::bigint[])
         with ordinality as m (member_uid, amount, system_account_id, code, cause_type, cause_ref, reason,
                               reverses_transfer_id, ord)
), transfer as (
    insert into transfers (transfer_id, member_uid, asset, debit_account_id, credit_account_id, amount, code,
                           cause_type, cause_ref, reverses_transfer_id, reason)
    overriding system value
    -- Left: a member without the account leaves its side null, which the table refuses.
    select m.transfer_id, m.member_uid, 'reputation',
           case when m.amount > 0 then m.system_account_id else a.account_id end,
           case when m.amount > 0 then a.account_id else m.system_account_id end,
           abs(m.amount), m.code, m.cause_type, m.cause_ref, m.reverses_transfer_id, m.reason
    from move m
    left join accounts a on a.member_uid = m.member_uid and a.asset = 'reputation' and a.name = 'reputation'
                        and a.member_uid = any($1::bigint[])
    order by m.ord
), change as (
    select member_uid, sum(amount) as amount from move group by member_uid
), updated as (
    update members u set reputation = u.reputation + c.amount, version = u.version + 1
    from change c
    where u.member_uid = c.member_uid and u.member_uid = any($1::bigint[])
    returning {", ".join(f"u.{column.strip()}" for column in MEMBER_COLUMNS.split(","))}
)
select u.*, (select array_agg(transfer_id order by ord) from move) as transfer_ids from updated u
"""


# --- vesting and expiry ------------------------------------------------------------------------


async def lock_due_pending_lots(
    conn: Connection, now: datetime, limit: int, passed_over: Sequence[int] = (), *, one_by_one: bool = False
) -> list[dict[str, Any]]:
    """Up to ``limit`` pending lots whose return window has closed, oldest due first, of members
    this transaction now holds locked; lots of members another transaction holds, and of the
    members ``passed_over``, are left for later. With each lot its member's id and refund debt."""
    return await lock_due(conn, FIND_DUE_PENDING_LOTS, now, limit, passed_over, one_by_one=one_by_one)


# A job's batch in two statements: the due lots are found across members without a lock (in the
# order of their index: a batch reads its own lots only, however many are due at the same moment),
# then their members are locked, named by value. The statement that settles the lots checks again
# that each is due. Citus runs the first on every shard and merges the shards' orders; the others
# name their members (docs/SCALING.md, "Citus").
FIND_DUE_PENDING_LOTS = """
select l.member_uid, l.lot_id from lots l
where l.state = 'pending' and l.vests_at <= $1 and l.member_uid <> all($3::bigint[])
order by l.vests_at, l.lot_id
limit $2
"""
LOCK_LOT_MEMBERS = """
select member_uid, member_id, points_debt from members where member_uid = any($1::bigint[])
for update skip locked
"""
# The same for one member, a statement each (KONVERT_LOCK_MEMBERS=one_by_one; store.lock_by_member).
LOCK_LOT_MEMBER = """
select member_uid, member_id, points_debt from members where member_uid = $1
for update skip locked
"""

# Finding again past the members other transactions held: each look passes over the ones the
# last found held, so looks end once one finds none held (about as many looks as requests hold
# members at once); a bound all the same, past which the batch comes back short (the next run
# of the jobs continues).
LOOKS_MAX = 64


FindRows = Callable[[list[int]], Awaitable[list[asyncpg.Record]]]
LockMembers = Callable[[list[int]], Awaitable[list[asyncpg.Record]]]


async def find_and_lock(
    find: FindRows, lock: LockMembers, limit: int, passed_over: Sequence[int]
) -> tuple[list[asyncpg.Record], dict[int, asyncpg.Record]]:
    """A job's batch: up to ``limit`` rows ``find`` finds without a lock (each with its
    ``member_uid``; called with the members to pass over), of the members ``lock`` then locked
    (skip locked: by member_uid, the rows it locked), and those members' locked rows. Members
    other transactions hold are passed over. While that leaves the batch short, the rows are
    found again past the members found held, so that a batch comes back short only when nothing
    more is due (konvert.jobs runs batches until one does)."""
    skipped = list(passed_over)
    locked: dict[int, asyncpg.Record] = {}
    kept: dict[tuple[Any, ...], asyncpg.Record] = {}
    for _ in range(LOOKS_MAX):
        found = await find(skipped)
        new = sorted({row["member_uid"] for row in found} - locked.keys())
        # Never waits (skip locked), so locking in several statements cannot deadlock.
        locked |= {row["member_uid"]: row for row in await lock(new)} if new else {}
        for row in found:
            if row["member_uid"] in locked:
                kept.setdefault(tuple(row.values()), row)
        held = [uid for uid in new if uid not in locked]
        if len(found) < limit or len(kept) >= limit or not held:
            break
        skipped += held
    return list(kept.values())[:limit], locked


async def lock_due(
    conn: Connection,
    find: str,
    now: datetime,
    limit: int,
    passed_over: Sequence[int],
    *,
    one_by_one: bool = False,
) -> list[dict[str, Any]]:
    """The due lots ``find`` finds ($1 now, $2 limit, $3 members passed over), each with its
    member's id and refund debt, of the members this transaction then holds locked
    (``find_and_lock``; with ``one_by_one``, a statement per member)."""
    lots, members = await find_and_lock(
        lambda skipped: conn.fetch(find, now, limit, skipped),
        lambda uids: lock_by_member(conn, (LOCK_LOT_MEMBERS, LOCK_LOT_MEMBER), uids, one_by_one),
        limit,
        passed_over,
    )
    return [{"lot_id": lot["lot_id"], **members[lot["member_uid"]]} for lot in lots]


async def vest_locked_lots(conn: Connection, lots: Sequence[LotOf], now: datetime) -> list[asyncpg.Record]:
    """Vest these due lots (of members without a refund debt, locked by this transaction);
    return (member_uid, member_id, version, lots, points, lot_ids, and the balances after) per
    member whose balances moved."""
    rows: list[asyncpg.Record] = await conn.fetch(
        _VEST_LOTS, [lot["member_uid"] for lot in lots], [lot["lot_id"] for lot in lots], now
    )
    return rows


# Each lot still pending becomes available, with a transfer of what remains of it from the
# member's pending account to their available one, and each member's balances move by the sum.
_VEST_LOTS = """
with vested as (
    update lots l set state = 'available'
    from unnest($1::bigint[], $2::bigint[]) as d (member_uid, lot_id)
    where l.member_uid = d.member_uid and l.lot_id = d.lot_id and l.state = 'pending' and l.vests_at <= $3
      and l.member_uid = any($1::bigint[])
    returning l.lot_id, l.member_uid, l.remaining
), moved as (
    insert into transfers (member_uid, asset, debit_account_id, credit_account_id, amount, code,
                           cause_type, cause_ref, lot_id, reason)
    select v.member_uid, 'points', pending.account_id, available.account_id, v.remaining, 'vest',
           'lot', v.lot_id::text, v.lot_id, 'return window closed'
    from vested v
    left join accounts pending on pending.member_uid = v.member_uid and pending.asset = 'points'
                              and pending.name = 'pending' and pending.member_uid = any($1::bigint[])
    left join accounts available on available.member_uid = v.member_uid and available.asset = 'points'
                                and available.name = 'available' and available.member_uid = any($1::bigint[])
    where v.remaining > 0
), per_member as (
    select member_uid, sum(remaining)::bigint as points, count(*) as lots,
           array_agg(lot_id order by lot_id) as lot_ids
    from vested group by member_uid
)
update members m
set points_available = points_available + p.points, points_pending = points_pending - p.points,
    version = version + 1
from per_member p
where m.member_uid = p.member_uid and m.member_uid = any($1::bigint[])
returning m.member_uid, m.member_id, m.version, p.lots, p.points, p.lot_ids,
          m.points_available, m.points_pending, m.points_held
"""


async def lock_expiring_lots(
    conn: Connection, now: datetime, limit: int, passed_over: Sequence[int] = (), *, one_by_one: bool = False
) -> list[dict[str, Any]]:
    """Up to ``limit`` lots whose expiry has come, soonest first, of members this transaction
    now holds locked; lots of members another transaction holds, and of the members
    ``passed_over``, are left for later."""
    return await lock_due(conn, FIND_EXPIRING_LOTS, now, limit, passed_over, one_by_one=one_by_one)


# As vesting's, in the order of lots_expiry_order_idx.
FIND_EXPIRING_LOTS = """
select l.member_uid, l.lot_id from lots l
where l.state <> 'expired' and l.expires_at <= $1 and l.member_uid <> all($3::bigint[])
order by l.expires_at, l.lot_id
limit $2
"""


async def expire_locked_lots(
    conn: Connection, lots: Sequence[LotOf], now: datetime, expired_account_id: int
) -> list[asyncpg.Record]:
    """Expire these due lots (of members locked by this transaction); return (member_uid,
    member_id, version, lots, points, lot_ids, and the balances after) per member whose balances
    moved."""
    rows: list[asyncpg.Record] = await conn.fetch(
        _EXPIRE_LOTS, [lot["member_uid"] for lot in lots], [lot["lot_id"] for lot in lots], now, expired_account_id
    )
    return rows


# What remains of each lot goes from the member's account for the lot's state to the program's
# expired account (a transfer, and a lot entry taking it), the lot is marked expired, and each
# member's balances move by the sums. The statement's snapshot is taken after the members were
# locked, and every writer of lots locks their member first, so `due` is current.
_EXPIRE_LOTS = """
with due as (
    select l.lot_id, l.member_uid, l.remaining, l.state, l.expires_at
    from unnest($1::bigint[], $2::bigint[]) as d (member_uid, lot_id)
    join lots l on l.member_uid = d.member_uid and l.lot_id = d.lot_id
    where l.state <> 'expired' and l.expires_at <= $3 and l.member_uid = any($1::bigint[])
), marked as (
    update lots set state = 'expired', remaining = 0 from due
    where lots.member_uid = due.member_uid and lots.lot_id = due.lot_id and lots.member_uid = any($1::bigint[])
), moved as (
    insert into transfers (member_uid, asset, debit_account_id, credit_account_id, amount, code,
                           cause_type, cause_ref, lot_id, reason)
    select d.member_uid, 'points', bucket.account_id, $4, d.remaining, 'expire', 'lot', d.lot_id::text,
           d.lot_id, 'points expired on ' || to_char(d.expires_at at time zone 'UTC', 'YYYY-MM-DD')
    from due d
    left join accounts bucket on bucket.member_uid = d.member_uid and bucket.asset = 'points'
                             and bucket.name = d.state and bucket.member_uid = any($1::bigint[])
    where d.remaining > 0
    order by d.expires_at, d.lot_id
    returning transfer_id, lot_id, member_uid, amount
), entries as (
    insert into lot_entries (lot_id, member_uid, transfer_id, amount, kind)
    select lot_id, member_uid, transfer_id, amount, 'expire' from moved
), per_member as (
    select member_uid, count(*) as lots,
           coalesce(sum(remaining) filter (where state = 'available'), 0)::bigint as available,
           coalesce(sum(remaining) filter (where state = 'pending'), 0)::bigint as pending,
           array_agg(lot_id order by lot_id) as lot_ids
    from due group by member_uid
)
update members m
set points_available = points_available - p.available, points_pending = points_pending - p.pending,
    version = version + 1
from per_member p
where m.member_uid = p.member_uid and m.member_uid = any($1::bigint[])
returning m.member_uid, m.member_id, m.version, p.lots, p.available + p.pending as points, p.lot_ids,
          m.points_available, m.points_pending, m.points_held
"""


# --- expiring soon -----------------------------------------------------------------------------


async def notice_expiring_lots(conn: Connection, now: datetime, until: datetime, limit: int) -> list[asyncpg.Record]:
    """Record up to ``limit`` lots with points left that expire after ``now`` and by ``until`` as
    announced (once per lot), soonest first; returns each one's lot_id, member_uid, expires_at
    and points."""
    rows: list[asyncpg.Record] = await conn.fetch(_NOTICE_EXPIRING_LOTS, now, until, limit)
    return rows


# Lots come up in expiry order, so the search starts at the latest expiry already announced
# instead of reading every lot of the window on every run.
_NOTICE_EXPIRING_LOTS = """
with due as (
    select l.lot_id, l.member_uid, l.remaining, l.expires_at from lots l
    where l.state <> 'expired' and l.remaining > 0 and l.expires_at > $1 and l.expires_at <= $2
      and l.expires_at >= coalesce((select max(expires_at) from lot_expiry_notices), '-infinity'::timestamptz)
      and not exists (select 1 from lot_expiry_notices n where n.member_uid = l.member_uid and n.lot_id = l.lot_id)
    order by l.expires_at, l.lot_id
    limit $3
), noticed as (
    insert into lot_expiry_notices (lot_id, member_uid, expires_at, noticed_at)
    select lot_id, member_uid, expires_at, $1 from due
    on conflict (member_uid, lot_id) do nothing
    returning lot_id
)
select d.lot_id, d.member_uid, d.expires_at, d.remaining as points
from due d join noticed n using (lot_id)
order by d.member_uid, d.expires_at, d.lot_id
"""
