"""Reputation rules, pure: what a kudos is worth, the daily cap, the floor, ranks and periods.

No I/O here: the use cases in :mod:`konvert.reputation.service` feed these functions what they
read under the members' row locks and write what they return.

The daily cap is order-independent by construction. A member's standing likes and helpful
marks of one UTC day are put in a *canonical order* that depends only on the kudos themselves
(``occurred_at``, then ``kudos_id``), never on when they arrived. Each kudos credits
``min(value, cap - what the kudos before it are worth)``, at least 0: the cap is filled in
canonical order. The same set of standing kudos therefore always gives every kudos the same
credit, the day the same total ``min(cap, sum of values)``, whatever the order in which kudos,
replays and retractions arrived.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta

import msgspec

from konvert.program import Rank, Reputation

CAPPED_KINDS = ("like", "helpful")


# --- what a kudos is worth ------------------------------------------------------------------


class KudosWorth(msgspec.Struct, frozen=True):
    """What a kudos credits before the daily cap: to its author, and to the member who accepted."""

    value: int
    accepter_value: int
    # Why it is worth nothing although it stands (None when it counts).
    not_counted_reason: str | None = None


def giver_has_standing(rules: Reputation, giver_reputation: int, giver_since: datetime, now: datetime) -> bool:
    """Whether a giver's kudos count: enough reputation and a member for long enough (both off by default).

    A member's age counts from when konvert first saw them (their first kudos, purchase, ...).
    """
    if giver_reputation < rules.giver_min_reputation:
        return False
    return now - giver_since >= timedelta(days=rules.giver_min_account_age_days)


def kudos_worth(rules: Reputation, kind: str, self_given: bool, giver_counts: bool) -> KudosWorth:
    """The kudos' value under the program.

    Accepting one's own answer is recorded (it still marks the thread's answer) but awards
    nothing to anyone, as on Stack Exchange. Self-likes never get here: they are refused.
    """
    if kind in CAPPED_KINDS:
        assert not self_given, "self-kudos are refused before they are valued"
        if not giver_counts:
            return KudosWorth(0, 0, "giver_without_standing")
        return KudosWorth(rules.kudos.like if kind == "like" else rules.kudos.helpful, 0)
    if self_given:
        return KudosWorth(0, 0, "self_accept")
    if not giver_counts:
        return KudosWorth(0, 0, "giver_without_standing")
    return KudosWorth(rules.kudos.accepted_answer, rules.kudos.accepter)


# --- the daily cap --------------------------------------------------------------------------


def canonical_key(occurred_at: datetime, kudos_id: str) -> tuple[datetime, bytes]:
    """The order in which a day's kudos fill the cap.

    Matches SQL ``order by occurred_at, kudos_id collate "C"``: byte order of UTF-8, which is
    code point order.
    """
    return occurred_at, kudos_id.encode()


def capped_credit(value: int, worth_before: int, cap: int) -> int:
    """A kudos' credit when the kudos before it in canonical order are worth ``worth_before``."""
    return max(0, min(value, cap - worth_before))


def allocate_daily_cap(values: Sequence[int], cap: int) -> list[int]:
    """The credit of each of a day's standing kudos, given their values in canonical order."""
    credits = []
    before = 0
    for value in values:
        credits.append(capped_credit(value, before, cap))
        before += value
    return credits


# --- the floor ------------------------------------------------------------------------------


class FloorStep(msgspec.Struct, frozen=True):
    """What one change to a kudos' credit does to the member's reputation under the floor."""

    # The change to the member's reputation (what the ledger moves).
    posted: int
    # Reputation kept by the floor after the change.
    floor_kept: int


def apply_floor(reputation: int, floor_kept: int, floor: int, change: int) -> FloorStep:
    """Apply a change to a member's standing credits without taking reputation below ``floor``.

    A debit stops at the floor; what it could not take is remembered as ``floor_kept``. A credit
    first makes up for what the floor kept, so that ``reputation = standing credits + floor_kept``
    always holds and a kudos given again after a clamped retraction is not counted twice.
    """
    if change >= 0:
        absorbed = min(change, floor_kept)
        return FloorStep(change - absorbed, floor_kept - absorbed)
    debit = -change
    taken = min(debit, max(0, reputation - floor))
    return FloorStep(-taken, floor_kept + debit - taken)


# --- ranks ----------------------------------------------------------------------------------


class RankStanding(msgspec.Struct, frozen=True):
    rank: str
    next_rank: str | None
    needed_for_next_rank: int | None


def rank_for(ranks: Sequence[Rank], reputation: int) -> RankStanding:
    """The highest rank the reputation reaches, and what the next one needs.

    The program guarantees the first rank starts at 0 and thresholds increase; a reputation
    below 0 (impossible with the floor) still gets the first rank.
    """
    current = ranks[0]
    following: Rank | None = None
    for rank in ranks:
        if reputation >= rank.min_reputation:
            current = rank
        else:
            following = rank
            break
    if following is None:
        return RankStanding(current.name, None, None)
    return RankStanding(current.name, following.name, following.min_reputation - reputation)


# --- periods --------------------------------------------------------------------------------


def utc_day(moment: datetime) -> date:
    return moment.astimezone(UTC).date()


def week_key(day: date) -> str:
    """The ISO week (Monday to Sunday, UTC) a day belongs to, e.g. 2026-W47."""
    year, week, _ = day.isocalendar()
    return f"{year}-W{week:02d}"


def month_key(day: date) -> str:
    return f"{day.year}-{day.month:02d}"


def period_key(period: str, day: date) -> str:
    if period == "week":
        return week_key(day)
    if period == "month":
        return month_key(day)
    return "all"


def period_start(period: str, day: date) -> date | None:
    """The first day of the week or month containing ``day`` (None for all time)."""
    if period == "week":
        return day - timedelta(days=day.weekday())
    if period == "month":
        return day.replace(day=1)
    return None


def period_end(period: str, day: date) -> date | None:
    """The first day after the week or month containing ``day`` (None for all time)."""
    start = period_start(period, day)
    if start is None:
        return None
    if period == "week":
        return start + timedelta(days=7)
    return (start + timedelta(days=32)).replace(day=1)
