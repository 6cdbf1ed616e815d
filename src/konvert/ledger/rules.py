"""The ledger's pure rules: when a lot expires, and which lots a spend or a clawback takes. No I/O."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from konvert.program import Points


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


class OpenLot(NamedTuple):
    """A lot with points left, as a spend or a clawback sees it."""

    lot_id: int
    remaining: int


# (lot_id, points) taken from a lot; a negative number of points gives them back.
Take = tuple[int, int]


def plan_takes(lots: Iterable[OpenLot], points: int) -> tuple[list[Take], int]:
    """Take up to ``points`` from ``lots`` in their order; return the takes and what is still missing."""
    takes: list[Take] = []
    missing = points
    for lot in lots:
        if missing == 0:
            break
        take = min(missing, lot.remaining)
        if take > 0:
            takes.append((lot.lot_id, take))
            missing -= take
    return takes, missing


class ClawbackPlan(NamedTuple):
    """How a clawback of points splits: what its own lot gives (pending or available), what other
    available lots give, and what is missing: a debt (available goes below zero) when the program
    allows negative balances, else a shortfall that is not taken at all."""

    own_take: int
    own_pending: bool
    other_takes: list[Take]
    debt: int
    shortfall: int

    @property
    def taken(self) -> int:
        """Points the member loses: from lots, and as debt."""
        return self.own_take + sum(points for _, points in self.other_takes) + self.debt

    @property
    def from_pending(self) -> int:
        return self.own_take if self.own_pending else 0

    @property
    def from_available(self) -> int:
        return self.taken - self.from_pending


def plan_clawback(
    points: int, own_lot: OpenLot | None, own_pending: bool, other_lots: Iterable[OpenLot], allow_negative: bool
) -> ClawbackPlan:
    """Take ``points`` back from the lot they were credited to first, then from the member's other
    available lots in their order (soonest expiring first)."""
    own_take = min(points, own_lot.remaining) if own_lot is not None else 0
    other_takes, missing = plan_takes(other_lots, points - own_take)
    return ClawbackPlan(
        own_take=own_take,
        own_pending=own_pending and own_take > 0,
        other_takes=other_takes,
        debt=missing if allow_negative else 0,
        shortfall=0 if allow_negative else missing,
    )
