"""Pure rules of redemption and tiers: expiry dates, reward availability, tier evaluation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from konvert import errors
from konvert.ledger.rules import expiry_for
from konvert.program import Points, Reward, TierLevel, Tiers
from konvert.redemption.rules import reward_refusal
from konvert.tiers.rules import evaluate_tier, tier_for

EARNED = datetime(2026, 1, 15, 9, 30, tzinfo=UTC)


def test_points_that_never_expire_have_no_expiry_date():
    assert expiry_for(EARNED, Points(expire_after_days=None)) is None


def test_rolling_expiry_counts_days_from_earning():
    assert expiry_for(EARNED, Points(expire_after_days=30)) == EARNED + timedelta(days=30)


def test_end_of_month_rounding_moves_expiry_to_the_first_instant_of_the_next_month():
    points = Points(expire_after_days=30, expiry_rounding="end_of_month")
    assert expiry_for(EARNED, points) == datetime(2026, 3, 1, tzinfo=UTC)  # 2026-02-14 -> end of February
    december = datetime(2026, 12, 20, tzinfo=UTC)
    assert expiry_for(december, Points(expire_after_days=5, expiry_rounding="end_of_month")) == datetime(
        2027, 1, 1, tzinfo=UTC
    )


def test_an_expiry_exactly_at_a_month_start_stays_there():
    start = datetime(2026, 2, 1, tzinfo=UTC) - timedelta(days=10)
    points = Points(expire_after_days=10, expiry_rounding="end_of_month")
    assert expiry_for(start, points) == datetime(2026, 2, 1, tzinfo=UTC)


NOW = datetime(2026, 6, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("reward", "error"),
    [
        (None, errors.RewardNotFound),
        (Reward(reward_id="r", name="R", cost_points=1, active=False), errors.RewardUnavailable),
        (
            Reward(reward_id="r", name="R", cost_points=1, available_from=NOW + timedelta(seconds=1)),
            errors.RewardUnavailable,
        ),
        (Reward(reward_id="r", name="R", cost_points=1, available_until=NOW), errors.RewardUnavailable),
        (Reward(reward_id="r", name="R", cost_points=1, stock=0), errors.OutOfStock),
    ],
)
def test_a_reward_that_cannot_be_redeemed_says_why(reward, error):
    assert isinstance(reward_refusal(reward, "r", NOW), error)


def test_an_available_reward_is_not_refused():
    reward = Reward(
        reward_id="r", name="R", cost_points=1, stock=1, available_from=NOW, available_until=NOW + timedelta(days=1)
    )
    assert reward_refusal(reward, "r", NOW) is None


LEVELS = (
    TierLevel(name="Bronze", min_points=0),
    TierLevel(name="Silver", min_points=1000, multiplier=Decimal("1.25")),
    TierLevel(name="Gold", min_points=5000, multiplier=Decimal("1.5")),
)


def test_the_tier_is_the_highest_threshold_reached():
    assert [tier_for(LEVELS, p).name for p in (0, 999, 1000, 4999, 5000, 10**9)] == [
        "Bronze",
        "Bronze",
        "Silver",
        "Silver",
        "Gold",
        "Gold",
    ]
    assert tier_for((), 100) is None


def test_next_tier_follows_the_ladder():
    tiers = Tiers(levels=LEVELS)
    assert tiers.next_after(None).name == "Bronze"
    assert tiers.next_after("Bronze").name == "Silver"
    assert tiers.next_after("Gold") is None
    assert tiers.next_after("Platinum").name == "Bronze"  # an unknown tier: the ladder starts over
    assert Tiers().next_after(None) is None  # no tiers configured


def test_upgrades_are_immediate_and_clear_a_pending_downgrade():
    tiers = Tiers(levels=LEVELS, downgrade_grace_days=30)
    standing = evaluate_tier(tiers, 5000, "Silver", NOW - timedelta(days=3), NOW)
    assert (standing.tier, standing.below_since) == ("Gold", None)


def test_without_grace_a_member_moves_down_at_once():
    standing = evaluate_tier(Tiers(levels=LEVELS, downgrade_grace_days=0), 10, "Gold", None, NOW)
    assert (standing.tier, standing.below_since) == ("Bronze", None)


def test_with_grace_a_member_keeps_the_tier_until_the_grace_period_ends():
    tiers = Tiers(levels=LEVELS, downgrade_grace_days=30)
    first = evaluate_tier(tiers, 10, "Gold", None, NOW)
    assert (first.tier, first.below_since) == ("Gold", NOW)
    later = evaluate_tier(tiers, 10, "Gold", first.below_since, NOW + timedelta(days=29))
    assert (later.tier, later.below_since) == ("Gold", NOW)
    due = evaluate_tier(tiers, 10, "Gold", first.below_since, NOW + timedelta(days=30))
    assert (due.tier, due.below_since) == ("Bronze", None)


def test_qualifying_again_during_the_grace_period_cancels_the_downgrade():
    tiers = Tiers(levels=LEVELS, downgrade_grace_days=30)
    standing = evaluate_tier(tiers, 6000, "Gold", NOW - timedelta(days=10), NOW)
    assert (standing.tier, standing.below_since) == ("Gold", None)


def test_an_unknown_stored_tier_is_replaced_by_the_one_reached():
    standing = evaluate_tier(Tiers(levels=LEVELS), 1500, "Platinum", None, NOW)
    assert standing.tier == "Silver"
