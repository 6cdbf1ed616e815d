"""The ledger's pure rules: which lots a spend takes (plan_takes) and how a clawback splits
between its own lot, the member's other lots, and a debt or a shortfall (plan_clawback).

(The clawback cases were preferences.rules.clawback_split's: the points a withdrawn preference
earned, what the member's lots hold, and whether the program allows negative balances.)"""

from __future__ import annotations

import pytest

from konvert.ledger.rules import ClawbackPlan, OpenLot, plan_clawback, plan_takes


def test_a_spend_takes_from_the_lots_in_their_order_and_stops_when_it_has_enough() -> None:
    lots = [OpenLot(7, 30), OpenLot(3, 50), OpenLot(9, 40)]

    assert plan_takes(lots, 60) == ([(7, 30), (3, 30)], 0)
    assert plan_takes(lots, 30) == ([(7, 30)], 0)  # exactly the first lot: the second is untouched
    assert plan_takes(lots, 120) == ([(7, 30), (3, 50), (9, 40)], 0)


def test_a_spend_larger_than_the_lots_takes_them_all_and_says_what_is_missing() -> None:
    assert plan_takes([OpenLot(1, 30), OpenLot(2, 20)], 80) == ([(1, 30), (2, 20)], 30)
    assert plan_takes([], 80) == ([], 80)


def test_a_spend_skips_empty_lots_and_nothing_is_taken_for_nothing() -> None:
    assert plan_takes([OpenLot(1, 0), OpenLot(2, 25)], 10) == ([(2, 10)], 0)
    assert plan_takes([OpenLot(1, 30)], 0) == ([], 0)


def lots_holding(points: int) -> list[OpenLot]:
    """A member's available lots holding ``points`` in all (none when in debt)."""
    if points <= 0:
        return []
    return [OpenLot(11, points - points // 2), OpenLot(12, points // 2)]


def split(plan: ClawbackPlan) -> tuple[int, int, int]:
    """(from lots, debt, shortfall), as clawback_split said it."""
    return plan.own_take + sum(points for _, points in plan.other_takes), plan.debt, plan.shortfall


# (points to claw back, what the member's lots hold, allow negative balance, (from lots, debt, shortfall))
CLAWBACK_SPLITS = [
    (50, 80, False, (50, 0, 0)),
    (50, 80, True, (50, 0, 0)),
    (50, 30, True, (30, 20, 0)),
    (50, 30, False, (30, 0, 20)),
    (50, 0, False, (0, 0, 50)),
    (50, -10, True, (0, 50, 0)),  # already in debt: no open lots, all of it more debt
]


@pytest.mark.parametrize(("points", "takeable", "allow_negative", "expected"), CLAWBACK_SPLITS)
def test_a_clawback_takes_what_the_other_lots_hold_and_the_rest_is_debt_or_shortfall(
    points: int, takeable: int, allow_negative: bool, expected: tuple[int, int, int]
) -> None:
    plan = plan_clawback(points, None, False, lots_holding(takeable), allow_negative)

    assert split(plan) == expected
    from_lots, debt, _ = expected
    assert plan.taken == from_lots + debt  # what the member loses: never the shortfall
    assert plan.from_available == plan.taken
    assert plan.from_pending == 0


@pytest.mark.parametrize(("points", "takeable", "allow_negative", "expected"), CLAWBACK_SPLITS)
def test_a_clawback_splits_the_same_when_its_own_lot_holds_the_points(
    points: int, takeable: int, allow_negative: bool, expected: tuple[int, int, int]
) -> None:
    own = OpenLot(5, takeable) if takeable > 0 else None
    plan = plan_clawback(points, own, False, [], allow_negative)

    assert split(plan) == expected
    assert plan.other_takes == []
    assert plan.own_take == expected[0]


def test_a_clawback_takes_its_own_lot_first_then_the_others_in_their_order() -> None:
    plan = plan_clawback(50, OpenLot(5, 20), False, [OpenLot(11, 25), OpenLot(12, 40)], allow_negative=False)

    assert plan.own_take == 20
    assert plan.other_takes == [(11, 25), (12, 5)]
    assert (plan.debt, plan.shortfall, plan.taken) == (0, 0, 50)


def test_a_clawback_its_own_lot_covers_takes_nothing_from_the_others() -> None:
    plan = plan_clawback(20, OpenLot(5, 60), False, [OpenLot(11, 25)], allow_negative=True)

    assert (plan.own_take, plan.other_takes, plan.debt, plan.shortfall) == (20, [], 0, 0)


def test_a_clawback_from_a_pending_lot_comes_out_of_pending_and_the_rest_out_of_available() -> None:
    plan = plan_clawback(50, OpenLot(5, 20), True, [OpenLot(11, 10)], allow_negative=True)

    assert plan.own_pending
    assert (plan.own_take, plan.other_takes, plan.debt) == (20, [(11, 10)], 20)
    assert (plan.from_pending, plan.from_available, plan.taken) == (20, 30, 50)


def test_an_empty_pending_own_lot_takes_nothing_from_pending() -> None:
    plan = plan_clawback(30, OpenLot(5, 0), True, [OpenLot(11, 10)], allow_negative=False)

    assert not plan.own_pending
    assert (plan.own_take, plan.other_takes, plan.shortfall) == (0, [(11, 10)], 20)
    assert (plan.from_pending, plan.from_available, plan.taken) == (0, 10, 10)


def test_a_clawback_of_nothing_takes_nothing() -> None:
    plan = plan_clawback(0, OpenLot(5, 20), True, [OpenLot(11, 10)], allow_negative=True)

    assert (plan.own_take, plan.other_takes, plan.debt, plan.shortfall, plan.taken) == (0, [], 0, 0, 0)
    assert not plan.own_pending
