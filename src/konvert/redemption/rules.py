"""Pure redemption rules: whether a reward can be redeemed now. No I/O."""

from __future__ import annotations

from datetime import datetime

from konvert import errors
from konvert.program import Reward


def reward_refusal(reward: Reward | None, reward_id: str, now: datetime) -> errors.KonvertError | None:
    """Why this reward cannot be redeemed now (stock aside: that is checked under its lock)."""
    if reward is None:
        return errors.RewardNotFound(f"no reward {reward_id!r}")
    if not reward.active:
        return errors.RewardUnavailable(f"reward {reward_id!r} is not active")
    if reward.available_from is not None and now < reward.available_from:
        return errors.RewardUnavailable(f"reward {reward_id!r} is available from {reward.available_from.isoformat()}")
    if reward.available_until is not None and now >= reward.available_until:
        return errors.RewardUnavailable(
            f"reward {reward_id!r} was available until {reward.available_until.isoformat()}"
        )
    if reward.stock is not None and reward.stock <= 0:
        return errors.OutOfStock(f"reward {reward_id!r} is out of stock")
    return None
