"""Pure rules for spending and keeping points: expiry dates, tiers, adjustments. No I/O."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from konvert import errors
from konvert.program import Points, Reward


def expiry_for(earned_at: datetime, points: Points) -> datetime | None:
    """When a lot earned at ``earned_at`` expires, or None if points never expire.

    With ``expiry_rounding = "end_of_month"`` the date moves to the end of its month (the first
    instant of the next month, UTC), so a member sees one expiry date per month.
    """
    if points.expire_after_days is None:
        return None
    expires_at = earned_at.astimezone(UTC) + timedelta(days=points.expire_after_days)
    if points.expiry_rounding == "end_of_month":
        first_of_month = expires_at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        next_month = (first_of_month + timedelta(days=32)).replace(day=1)
        return next_month if expires_at != first_of_month else first_of_month
    return expires_at


def reward_refusal(reward: Reward | None, reward_id: str, now: datetime) -> errors.KonvertError | None:
    """Why this reward cannot be redeemed now (stock aside: that is checked under its lock)."""
    if reward is None:
        return errors.RewardNotFound(f"no reward {reward_id!r}")
    if not reward.active:
        return errors.RewardUnavailable(f"reward {reward_id!r} is not active")
    if reward.available_from is not None and now < reward.available_from:
        return errors.RewardUnavailable(f"reward {reward_id!r} is available from {reward.available_from.isoformat()}")
    if reward.available_until is not None and now >= reward.available_until:
        return errors.RewardUnavailable(f"reward {reward_id!r} was available until {reward.available_until.isoformat()}")
    if reward.stock is not None and reward.stock <= 0:
        return errors.OutOfStock(f"reward {reward_id!r} is out of stock")
    return None
