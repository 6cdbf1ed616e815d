"""Tier SQL: the points qualifying for tiers, and the members due for the daily re-evaluation.

Qualifying points are what purchases earned in the window, net of refunds: this reads the
earning feature's purchases and refunds, through indexes that carry what it needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import asyncpg

from konvert.db import Connection
from konvert.ledger.batches import find_and_lock
from konvert.ledger.store import lock_by_member


def qualifying_points_sql(member_uid: str, since: str) -> str:
    """SQL for the points qualifying for tiers: earned by purchases posted since ``since``, less
    what their refunds clawed back. Arguments are SQL expressions (columns or parameters), never
    user input, so that the purchase statement can embed the same definition.

    Every purchase re-evaluates its member, so this runs once per posting and must not grow with
    the member's purchases: they are summed from an index that carries their points (an
    index-only scan, purchases_member_created_points_idx). Refunds are found by member (all of
    the member's refunds, which are few), each joined to its purchase, which must be the
    member's and in the window.
    """
    return f"""(
        (select coalesce(sum(p.points), 0) from purchases p
         where p.member_uid = {member_uid} and p.created_at >= {since})
        - (select coalesce(sum(r.points), 0) from refunds r join purchases p on p.purchase_pk = r.purchase_pk
           where r.member_uid = {member_uid} and p.member_uid = {member_uid} and p.created_at >= {since})
    )::bigint"""


async def select_qualifying_points(conn: Connection, member_uids: Sequence[int], since: datetime) -> dict[int, int]:
    rows = await conn.fetch(
        f"""
        select u.member_uid, {qualifying_points_sql("u.member_uid", "$2")} as points
        from unnest($1::bigint[]) as u (member_uid)
        """,
        list(member_uids),
        since,
    )
    return {row["member_uid"]: row["points"] for row in rows}


async def lock_due_members(
    conn: Connection, evaluated_before: datetime, limit: int, *, one_by_one: bool = False
) -> list[asyncpg.Record]:
    """Up to ``limit`` members with a tier not evaluated since ``evaluated_before``, least recently
    evaluated first, locked; members another transaction holds (a purchase's, another process's
    job) are passed over. Found without a lock, then locked by uid (with ``one_by_one``, a
    statement per member), as the ledger's jobs' lots are (konvert.ledger.batches.find_and_lock)."""
    found, locked = await find_and_lock(
        lambda skipped: conn.fetch(FIND_DUE_MEMBERS, evaluated_before, limit, skipped),
        lambda uids: lock_by_member(conn, (LOCK_DUE_MEMBERS, LOCK_DUE_MEMBER), uids, one_by_one, evaluated_before),
        limit,
        (),
    )
    return [locked[row["member_uid"]] for row in found]


# Never evaluated is -infinity, as in members_tier_due_idx: one range in the index's order, so a
# batch reads its own members only, however many are due. The qualifying points are summed by
# the next statement: the lock's snapshot was taken before the locks, so a purchase that
# committed while it waited for a member's lock would be in the member's row but not in the sum.
FIND_DUE_MEMBERS = """
select member_uid from members
where tier is not null and coalesce(tier_evaluated_at, '-infinity'::timestamptz) < $1
  and member_uid <> all($3::bigint[])
order by coalesce(tier_evaluated_at, '-infinity'::timestamptz)
limit $2
"""
LOCK_DUE_MEMBERS = """
select member_uid, member_id, tier, tier_below_since, tier_qualifying_points from members
where member_uid = any($1::bigint[])
  and tier is not null and coalesce(tier_evaluated_at, '-infinity'::timestamptz) < $2
for update skip locked
"""
LOCK_DUE_MEMBER = """
select member_uid, member_id, tier, tier_below_since, tier_qualifying_points from members
where member_uid = $1
  and tier is not null and coalesce(tier_evaluated_at, '-infinity'::timestamptz) < $2
for update skip locked
"""
