"""Wire types for rewards and redemptions."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from konvert.ledger.model import NO_CONTROL_CHARACTERS, NO_NUL, Note

RewardId = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$(?!\n)")]
RedemptionId = Annotated[str, Meta(min_length=1, max_length=128, pattern=NO_CONTROL_CHARACTERS)]
PositivePoints = Annotated[int, Meta(ge=1, le=1_000_000_000)]
# A reward's availability window lies within these (an absurd date, such as 0 read as 1970, is a
# client's mistake: 422).
AVAILABLE_MIN = datetime(2000, 1, 1, tzinfo=UTC)
AVAILABLE_MAX = datetime(2999, 12, 31, 23, 59, 59, tzinfo=UTC)
AvailabilityTime = Annotated[
    datetime,
    Meta(tz=True, description="An RFC 3339 date-time with a UTC offset, from 2000-01-01 to 2999-12-31 (UTC)."),
]

RedemptionStatus = Literal["held", "captured", "released", "expired", "cancelled"]


class RewardIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A reward as an operator defines it (PUT replaces the whole reward)."""

    name: Annotated[str, Meta(min_length=1, max_length=200, pattern=NO_NUL)]
    cost_points: PositivePoints
    description: Annotated[str, Meta(max_length=2000, pattern=NO_NUL)] = ""
    # The bound 0 stated again for the document: Litestar drops a bound of 0 on an optional number.
    stock: Annotated[int, Meta(ge=0, le=1_000_000_000, extra_json_schema={"extra": {"minimum": 0}})] | None = None
    available_from: AvailabilityTime | None = None
    available_until: AvailabilityTime | None = None
    active: bool = True

    def __post_init__(self) -> None:
        for name, when in (("available_from", self.available_from), ("available_until", self.available_until)):
            if when is not None and not AVAILABLE_MIN <= when <= AVAILABLE_MAX:
                raise ValueError(f"{name} must be from {AVAILABLE_MIN:%Y-%m-%d} to {AVAILABLE_MAX:%Y-%m-%d}")
        if self.available_from and self.available_until and self.available_until <= self.available_from:
            raise ValueError("available_until must be after available_from")


class RewardOut(msgspec.Struct, frozen=True, kw_only=True):
    reward_id: str
    name: str
    description: str
    cost_points: int
    stock: int | None
    available_from: datetime | None
    available_until: datetime | None
    active: bool


class RewardList(msgspec.Struct, frozen=True):
    items: list[RewardOut]


class RedemptionIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Redeem a reward, or pay with a plain number of points; exactly one of the two."""

    redemption_id: RedemptionId
    reward_id: RewardId | None = None
    points: PositivePoints | None = None
    # Reserve the points until capture or release (or the hold times out) instead of spending now.
    hold: bool = False
    note: Note | None = None

    def __post_init__(self) -> None:
        if (self.reward_id is None) == (self.points is None):
            raise ValueError("give either reward_id or points, not both and not neither")


class RedemptionOut(msgspec.Struct, frozen=True, kw_only=True):
    redemption_id: str
    member_id: str
    reward_id: str | None
    points: int
    status: RedemptionStatus
    hold_expires_at: datetime | None
    transfer_id: int
    closing_transfer_id: int | None
    created_at: datetime
    updated_at: datetime


class RedemptionPage(msgspec.Struct, frozen=True):
    items: list[RedemptionOut]
    next_cursor: str | None
