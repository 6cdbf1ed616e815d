"""Keeping members' tiers current: after a refund (which lowers the qualifying points), and in a
daily job over every member with a tier as the window slides (which is how downgrades after the
grace period happen without any activity). Purchases keep their member's tier in their own
statement (konvert.earning) and leave ``tier_evaluated_at`` to this job, so that they update the
member in place.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from konvert.db import Row
from konvert.ledger.book import Book, Member, writing
from konvert.ledger.store import TierStanding
from konvert.program import Tiers
from konvert.tiers import rules, store

if TYPE_CHECKING:
    from konvert.services import Services


def _standing(tiers: Tiers, before: TierStanding, points: int, now: datetime) -> TierStanding:
    """The member's standing for ``points`` qualifying points, and whether anything shown changed."""
    standing = rules.evaluate_tier(tiers, points, before.tier, before.below_since, now)
    after = before._replace(tier=standing.tier, below_since=standing.below_since, qualifying_points=points)
    return after._replace(changed=after != before)


def _stored(member: Row) -> TierStanding:
    """The standing stored on a member's row."""
    return TierStanding(
        member["member_uid"], member["tier"], member["tier_below_since"], member["tier_qualifying_points"], False
    )


async def reevaluate(services: Services, book: Book, member: Member, now: datetime) -> None:
    """Recompute and store a member's tier in the use case's transaction, with the member locked."""
    tiers = services.program.tiers
    if not tiers.levels:
        return
    before = TierStanding(member.uid, member.tier, member.tier_below_since, member.tier_qualifying_points, False)
    since = now - timedelta(days=tiers.window_days)
    points = await store.select_qualifying_points(book.conn, [member.uid], since)
    await book.store_tier_standings([_standing(tiers, before, points[member.uid], now)], now)


async def reevaluate_due(services: Services, now: datetime | None = None) -> int:
    """The daily job: re-evaluate members with a tier not evaluated in the last day, least
    recently evaluated first, one batch of ``jobs_batch_size`` members per transaction in three
    statements (lock, sum, store); return how many were evaluated. Processes running it at once
    take different members."""
    tiers = services.program.tiers
    if not tiers.levels:
        return 0
    moment = now or services.clock()
    async with writing(services) as book:
        due = await store.lock_due_members(
            book.conn,
            moment - timedelta(days=1),
            services.settings.jobs_batch_size,
            one_by_one=services.settings.lock_one_by_one,
        )
        if not due:
            return 0
        since = moment - timedelta(days=tiers.window_days)
        points = await store.select_qualifying_points(book.conn, [row["member_uid"] for row in due], since)
        standings = [_standing(tiers, _stored(row), points[row["member_uid"]], moment) for row in due]
        await book.store_tier_standings(standings, moment, {row["member_uid"]: row["tier"] for row in due})
    return len(due)
