"""Pure tier rules: which tier qualifying points reach, upgrades and graceful downgrades. No I/O."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import NamedTuple

from konvert.program import Program, TierLevel, Tiers


class Standing(NamedTuple):
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
) -> Standing:
    """Upgrades take effect at once; a downgrade waits ``downgrade_grace_days`` from the moment the
    member first fell below their tier, and is cancelled if they qualify again meanwhile."""
    target = tier_for(tiers.levels, qualifying_points)
    if target is None:
        return Standing(None, None)
    rank = {level.name: index for index, level in enumerate(tiers.levels)}
    if current not in rank or rank[target.name] >= rank[current]:
        return Standing(target.name, None)
    grace = timedelta(days=tiers.downgrade_grace_days)
    since = below_since or now
    if now - since >= grace:
        return Standing(target.name, None)
    return Standing(current, since)


def tier_multiplier(program: Program, tier: str | None) -> tuple[Decimal, str | None]:
    """What purchases earn at ``tier``, and the tier's name (None: no such tier, multiplier 1)."""
    for level in program.tiers.levels:
        if level.name == tier:
            return level.multiplier, level.name
    return Decimal(1), None
