"""Reputation rules, pure: kudos worth, giver standing, the daily cap, the floor, ranks, periods."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from konvert.program import KudosValues, Rank, Reputation
from konvert.reputation import rules
from konvert.reputation.leaderboard import board_name, board_ttl_seconds, dense_ranks

DEFAULTS = Reputation()
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


# --- what a kudos is worth ------------------------------------------------------------------


def test_likes_and_helpful_marks_are_worth_their_program_values():
    program = Reputation(kudos=KudosValues(like=3, helpful=7))
    assert rules.kudos_worth(program, "like", False, True) == rules.KudosWorth(3, 0)
    assert rules.kudos_worth(program, "helpful", False, True) == rules.KudosWorth(7, 0)


def test_an_accepted_answer_is_worth_something_to_its_author_and_its_accepter():
    assert rules.kudos_worth(DEFAULTS, "accepted_answer", False, True) == rules.KudosWorth(15, 2)


def test_accepting_ones_own_answer_is_worth_nothing():
    assert rules.kudos_worth(DEFAULTS, "accepted_answer", True, True) == rules.KudosWorth(0, 0, "self_accept")


@pytest.mark.parametrize("kind", ["like", "helpful", "accepted_answer"])
def test_kudos_from_a_giver_without_standing_are_worth_nothing(kind):
    assert rules.kudos_worth(DEFAULTS, kind, False, False) == rules.KudosWorth(0, 0, "giver_without_standing")


def test_a_self_like_never_gets_valued():
    with pytest.raises(AssertionError):
        rules.kudos_worth(DEFAULTS, "like", True, True)


def test_every_giver_has_standing_by_default():
    assert rules.giver_has_standing(DEFAULTS, 0, NOW, NOW)


def test_giver_standing_needs_reputation_and_age_when_configured():
    program = Reputation(giver_min_reputation=20, giver_min_account_age_days=7)
    old = NOW - timedelta(days=7)
    assert rules.giver_has_standing(program, 20, old, NOW)
    assert not rules.giver_has_standing(program, 19, old, NOW)
    assert not rules.giver_has_standing(program, 500, old + timedelta(seconds=1), NOW)


# --- the daily cap --------------------------------------------------------------------------


def test_the_cap_is_filled_in_canonical_order():
    assert rules.allocate_daily_cap([10, 10, 10], 25) == [10, 10, 5]
    assert rules.allocate_daily_cap([10, 0, 10, 10], 20) == [10, 0, 10, 0]
    assert rules.allocate_daily_cap([], 200) == []
    assert rules.allocate_daily_cap([10, 10], 0) == [0, 0]


def test_a_kudos_credit_depends_only_on_what_comes_before_it():
    assert rules.capped_credit(10, 195, 200) == 5
    assert rules.capped_credit(10, 200, 200) == 0
    assert rules.capped_credit(10, 250, 200) == 0
    assert rules.capped_credit(10, 0, 200) == 10


def test_canonical_order_is_time_then_kudos_id_by_code_point_like_sql_collate_c():
    moment = NOW
    keys = [rules.canonical_key(moment, kudos_id) for kudos_id in ("é", "a", "Z", "aa")]
    assert sorted(keys) == [rules.canonical_key(moment, k) for k in ("Z", "a", "aa", "é")]
    assert rules.canonical_key(moment, "z") < rules.canonical_key(moment + timedelta(seconds=1), "a")


KUDOS = st.lists(
    st.tuples(st.integers(0, 1440), st.text(min_size=1, max_size=4), st.integers(0, 40)),
    max_size=30,
    unique_by=lambda k: k[1],
)


@given(kudos=KUDOS, cap=st.integers(0, 300), data=st.data())
def test_the_cap_gives_each_kudos_the_same_credit_whatever_the_arrival_order(kudos, cap, data):
    def credits(arrived):
        ordered = sorted(arrived, key=lambda k: rules.canonical_key(NOW + timedelta(minutes=k[0]), k[1]))
        return dict(zip((k[1] for k in ordered), rules.allocate_daily_cap([k[2] for k in ordered], cap), strict=True))

    shuffled = data.draw(st.permutations(kudos))

    assert credits(shuffled) == credits(kudos)
    assert sum(credits(kudos).values()) == min(cap, sum(k[2] for k in kudos))


@given(values=st.lists(st.integers(0, 50), max_size=30), cap=st.integers(0, 300))
def test_the_cap_fills_a_prefix(values, cap):
    shares = rules.allocate_daily_cap(values, cap)
    assert all(0 <= share <= value for share, value in zip(shares, values, strict=True))
    short = [share < value for share, value in zip(shares, values, strict=True)]
    # After the first kudos that is not fully credited, nothing is credited.
    if True in short:
        assert all(share == 0 for share in shares[short.index(True) + 1 :])


EVENTS = st.lists(st.tuples(st.sampled_from(["give", "retract"]), st.integers(0, 7)), max_size=40)


@given(values=st.lists(st.integers(0, 30), min_size=8, max_size=8), events=EVENTS, cap=st.integers(0, 120))
def test_posting_the_difference_on_every_change_adds_up_to_the_cap_of_what_stands(values, events, cap):
    """The service's algorithm: after each kudos or retraction, recompute every credit and post
    the differences. The total posted is always min(cap, sum of what stands)."""
    standing: set[int] = set()
    credited = dict.fromkeys(range(8), 0)
    posted = 0
    for action, kudos in events:
        (standing.add if action == "give" else standing.discard)(kudos)
        order = sorted(standing)
        target = dict(zip(order, rules.allocate_daily_cap([values[k] for k in order], cap), strict=True))
        for k in range(8):
            posted += target.get(k, 0) - credited[k]
            credited[k] = target.get(k, 0)
    assert posted == min(cap, sum(values[k] for k in standing))


# --- the floor ------------------------------------------------------------------------------


def test_a_debit_stops_at_the_floor_and_is_remembered():
    assert rules.apply_floor(10, 0, 5, -10) == rules.FloorStep(-5, 5)
    assert rules.apply_floor(30, 0, 5, -10) == rules.FloorStep(-10, 0)
    assert rules.apply_floor(3, 0, 5, -2) == rules.FloorStep(0, 2)


def test_a_credit_first_makes_up_for_what_the_floor_kept():
    assert rules.apply_floor(5, 5, 5, 10) == rules.FloorStep(5, 0)
    assert rules.apply_floor(5, 8, 5, 3) == rules.FloorStep(0, 5)
    assert rules.apply_floor(0, 0, 0, 10) == rules.FloorStep(10, 0)


@given(changes=st.lists(st.integers(-40, 40), max_size=40), floor=st.integers(0, 30))
def test_reputation_is_standing_credits_plus_what_the_floor_kept(changes, floor):
    reputation = kept = credits = 0
    for change in changes:
        change = max(change, -credits)  # a kudos can only take back what standing kudos credit
        step = rules.apply_floor(reputation, kept, floor, change)
        lowest = min(reputation, floor)
        reputation, kept, credits = reputation + step.posted, step.floor_kept, credits + change
        assert reputation == credits + kept
        assert kept >= 0
        if change < 0:
            assert reputation >= lowest  # a debit never takes reputation below the floor


# --- ranks ----------------------------------------------------------------------------------


RANKS = (
    Rank(name="New", min_reputation=0),
    Rank(name="Known", min_reputation=50),
    Rank(name="Top", min_reputation=200),
)


@pytest.mark.parametrize(
    ("reputation", "expected"),
    [
        (0, rules.RankStanding("New", "Known", 50)),
        (49, rules.RankStanding("New", "Known", 1)),
        (50, rules.RankStanding("Known", "Top", 150)),
        (200, rules.RankStanding("Top", None, None)),
        (10_000, rules.RankStanding("Top", None, None)),
    ],
)
def test_rank_for_reputation(reputation, expected):
    assert rules.rank_for(RANKS, reputation) == expected


def test_the_default_ladder():
    assert rules.rank_for(DEFAULTS.ranks, 215).rank == "Helper"


# --- periods and leaderboards ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("day", "week", "month"),
    [
        (date(2026, 11, 23), "2026-W48", "2026-11"),
        (date(2026, 12, 31), "2026-W53", "2026-12"),
        (date(2027, 1, 3), "2026-W53", "2027-01"),
        (date(2027, 1, 4), "2027-W01", "2027-01"),
    ],
)
def test_periods_are_iso_weeks_and_calendar_months(day, week, month):
    assert (rules.week_key(day), rules.month_key(day)) == (week, month)
    assert (board_name("week", day), board_name("month", day), board_name("all", day)) == (
        f"week:{week}",
        f"month:{month}",
        "all",
    )


def test_period_bounds():
    day = date(2026, 12, 30)  # a Wednesday
    assert (rules.period_start("week", day), rules.period_end("week", day)) == (
        date(2026, 12, 28),
        date(2027, 1, 4),
    )
    assert (rules.period_start("month", day), rules.period_end("month", day)) == (
        date(2026, 12, 1),
        date(2027, 1, 1),
    )
    assert rules.period_start("all", day) is None and rules.period_end("all", day) is None


def test_period_boards_expire_a_while_after_their_period():
    assert board_ttl_seconds("all", NOW) == 0
    week = board_ttl_seconds("week:2026-W48", NOW)  # ends Monday 2026-11-30
    assert week == int((datetime(2026, 11, 30, tzinfo=UTC) + timedelta(days=40) - NOW).total_seconds())
    assert board_ttl_seconds("month:2020-01", NOW) == 60


def test_dense_ranks_share_a_rank_for_equal_scores():
    assert dense_ranks([50, 30, 30, 20, 20, 20, 5]) == [1, 2, 2, 3, 3, 3, 4]
    assert dense_ranks([]) == []
