"""Tiers: qualified on points earned (net of refunds) in a trailing window, never on the balance.

Pure rules first, then the SQL that keeps a member's stored tier current. A purchase or refund
re-evaluates its member in its own transaction; a daily job re-evaluates every member with a
tier as the window slides (which is how downgrades after the grace period happen without any
activity), a batch of members per transaction (``reevaluate_due``). Purchases never stamp
``tier_evaluated_at`` (the job and refunds, which are rare, do): it is indexed, and a purchase
that changes no indexed column updates its member in place (sql/0010).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

import asyncpg
import msgspec

from konvert.program import Program, TierLevel, Tiers


class TierStanding(msgspec.Struct, frozen=True):
    """A member's tier after an evaluation, and since when they are below it (grace period)."""

    tier: str | None
    below_since: datetime | None


def tier_for(levels: tuple[TierLevel, ...], qualifying_points: int) -> TierLevel | None:
    """The highest tier whose threshold the qualifying points reach (None: no tiers configured)."""
    reached = None
    for level in levels:
        if qualifying_points >= level.min_points:
            reached = level
    return reached


def evaluate_tier(
    tiers: Tiers, qualifying_points: int, current: str | None, below_since: datetime | None, now: datetime
) -> TierStanding:
    """Upgrades take effect at once; a downgrade waits ``downgrade_grace_days`` from the moment the
    member first fell below their tier, and is cancelled if they qualify again meanwhile."""
    target = tier_for(tiers.levels, qualifying_points)
    if target is None:
        return TierStanding(None, None)
    rank = {level.name: index for index, level in enumerate(tiers.levels)}
    if current not in rank or rank[target.name] >= rank[current]:
        return TierStanding(target.name, None)
    grace = timedelta(days=tiers.downgrade_grace_days)
    since = below_since or now
    if now - since >= grace:
        return TierStanding(target.name, None)
    return TierStanding(current, since)


def tier_multiplier(program: Program, tier: str | None) -> tuple[Decimal, str | None]:
    for level in program.tiers.levels:
        if level.name == tier:
            return level.multiplier, level.name
    return Decimal(1), None


def next_tier(levels: tuple[TierLevel, ...], current: str | None) -> TierLevel | None:
    names = [level.name for level in levels]
    if current not in names:
        return levels[0] if levels else None
    index = names.index(current)
    return levels[index + 1] if index + 1 < len(levels) else None


def qualifying_points_sql(member_uid: str, since: str) -> str:
    """SQL for the points qualifying for tiers: earned by purchases posted since ``since``, less
    what their refunds clawed back. Arguments are SQL expressions (columns or parameters),
    never user input, so that the purchase statement can embed the same definition.

    Every purchase re-evaluates its member, so this runs once per posting and must not grow with
    the member's purchases: they are summed from an index that carries their points (an
    index-only scan, sql/0009). Refunds are found by member (all of the member's refunds, which
    are few), each joined to its purchase, which must be the member's and in the window.
    """
    return f"""(
        (select coalesce(sum(p.points), 0) from purchases p
         where p.member_uid = {member_uid} and p.created_at >= {since})
        - (select coalesce(sum(r.points), 0) from refunds r join purchases p on p.purchase_pk = r.purchase_pk
           where r.member_uid = {member_uid} and p.member_uid = {member_uid} and p.created_at >= {since})
    )::bigint"""


async def qualifying_points(conn: asyncpg.Connection, member_uid: int, since: datetime) -> int:
    return await conn.fetchval(f"select {qualifying_points_sql('$1', '$2')}", member_uid, since)


async def reevaluate(conn: asyncpg.Connection, program: Program, member_uid: int, now: datetime) -> bool:
    """Recompute and store the member's tier; return whether anything shown changed.

    Call inside the use case's transaction, after the member's row is locked or written.
    """
    tiers = program.tiers
    if not tiers.levels:
        return False
    current = await conn.fetchrow(
        "select tier, tier_below_since, tier_qualifying_points from members where member_uid = $1", member_uid
    )
    points = await qualifying_points(conn, member_uid, now - timedelta(days=tiers.window_days))
    standing = evaluate_tier(tiers, points, current["tier"], current["tier_below_since"], now)
    changed = (standing.tier, standing.below_since, points) != (
        current["tier"],
        current["tier_below_since"],
        current["tier_qualifying_points"],
    )
    await conn.execute(
        """
        update members set tier = $2, tier_below_since = $3, tier_qualifying_points = $4, tier_evaluated_at = $5
        where member_uid = $1
        """,
        member_uid,
        standing.tier,
        standing.below_since,
        points,
        now,
    )
    return changed


class Reevaluated(msgspec.Struct, frozen=True):
    """A member whose tier standing the job changed, at the balance version it committed."""

    member_id: str
    version: int


# The due members, locked (skipping any another transaction holds: a purchase's, or another
# process's job). Their qualifying points are summed by the next statement: this one's snapshot
# was taken before the locks, so a purchase that committed while it waited for a member's lock
# would be in the member's row (the locked row is its newest version) but not in the sum.
# Never evaluated is -infinity, as in members_tier_due_idx (sql/0013): one range in the index's
# order, so a batch reads its own members only, however many are due.
LOCK_DUE_MEMBERS = """
select member_uid, member_id, tier, tier_below_since, tier_qualifying_points from members
where tier is not null and coalesce(tier_evaluated_at, '-infinity'::timestamptz) < $1
order by coalesce(tier_evaluated_at, '-infinity'::timestamptz)
limit $2
for update skip locked
"""

_POINTS = f"""
select u.member_uid, {qualifying_points_sql('u.member_uid', '$2')} as points
from unnest($1::bigint[]) as u (member_uid)
"""

_STORE = """
update members m
set tier = u.tier, tier_below_since = u.below_since, tier_qualifying_points = u.points,
    tier_evaluated_at = $6, version = m.version + u.changed::int
from unnest($1::bigint[], $2::text[], $3::timestamptz[], $4::bigint[], $5::bool[])
     as u(member_uid, tier, below_since, points, changed)
where m.member_uid = u.member_uid
returning m.member_uid, m.version
"""


async def reevaluate_due(
    conn: asyncpg.Connection, program: Program, now: datetime, evaluated_before: datetime, limit: int
) -> tuple[int, list[Reevaluated]]:
    """Re-evaluate up to ``limit`` members with a tier not evaluated since ``evaluated_before``,
    least recently evaluated first, in three statements (lock, sum, store); return how many were
    evaluated, and those whose standing changed (their balance version moved: the caller
    invalidates their cached balances after commit). Call inside a transaction: the members stay
    locked until it ends.
    """
    tiers = program.tiers
    rows = await conn.fetch(LOCK_DUE_MEMBERS, evaluated_before, limit)
    if not rows:
        return 0, []
    summed = await conn.fetch(_POINTS, [r["member_uid"] for r in rows], now - timedelta(days=tiers.window_days))
    points = {r["member_uid"]: r["points"] for r in summed}
    standings = [
        evaluate_tier(tiers, points[r["member_uid"]], r["tier"], r["tier_below_since"], now) for r in rows
    ]
    changed = [
        (s.tier, s.below_since, points[r["member_uid"]])
        != (r["tier"], r["tier_below_since"], r["tier_qualifying_points"])
        for r, s in zip(rows, standings, strict=True)
    ]
    stored = await conn.fetch(
        _STORE,
        [r["member_uid"] for r in rows],
        [s.tier for s in standings],
        [s.below_since for s in standings],
        [points[r["member_uid"]] for r in rows],
        changed,
        now,
    )
    member_ids = {r["member_uid"]: r["member_id"] for r, moved in zip(rows, changed, strict=True) if moved}
    return len(rows), [
        Reevaluated(member_ids[r["member_uid"]], r["version"]) for r in stored if r["member_uid"] in member_ids
    ]
