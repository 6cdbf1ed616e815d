"""Ledger wire types: balances, activity and adjustments, as members, their apps and operators see them."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec
from msgspec import Meta

# Ids travel through URLs, logs and PostgreSQL text: no control characters (PostgreSQL cannot
# even store NUL). Free text may hold line breaks and tabs, never NUL.
# `$` alone would also match before a final newline in Python (msgspec searches with `re`);
# `(?!\n)` refuses that and means nothing to the JSON Schema (ECMAScript) reading of the pattern.
# Characters no id may hold (a regex class's body): controls, and the bidirectional formatting
# characters that make an id display as another one (Trojan Source).
UNPRINTABLE = r"\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069"
NO_CONTROL_CHARACTERS = rf"^[^{UNPRINTABLE}]+$(?!\n)"
NO_NUL = r"^[^\x00]*$"
MemberId = Annotated[str, Meta(min_length=1, max_length=128, pattern=NO_CONTROL_CHARACTERS)]
# Free text a client attaches to a change (a redemption's or an adjustment's note).
Note = Annotated[str, Meta(max_length=1000, pattern=NO_NUL)]
AdjustmentId = Annotated[str, Meta(min_length=1, max_length=128, pattern=NO_CONTROL_CHARACTERS)]
SignedPoints = Annotated[int, Meta(ge=-1_000_000_000, le=1_000_000_000)]


class ExpiringPoints(msgspec.Struct, frozen=True):
    points: int
    expires_at: datetime


class VestingPoints(msgspec.Struct, frozen=True):
    points: int
    vests_at: datetime


class TierStatus(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    # Points earned (net of refunds) in the trailing window that qualify the tier.
    qualifying_points: int
    window_days: int
    next_tier: str | None
    points_to_next_tier: int | None
    # Set while the member is below their tier and inside the downgrade grace period.
    below_tier_since: datetime | None = None


class Balance(msgspec.Struct, frozen=True, kw_only=True):
    member_id: str
    # Points the member can spend now. Negative only after a refund of already-spent points.
    available: int
    # Earned, but inside the return window; they become available when the window closes.
    pending: int
    # Reserved by redemptions in progress.
    held: int
    # Points earned, net of refunds, over the member's lifetime.
    lifetime_earned: int
    reputation: int
    # The soonest-expiring points, grouped by expiry date (with ?expiring_within_days=N: all
    # points expiring within N days).
    expiring: list[ExpiringPoints]
    tier: TierStatus | None
    # When pending points become available, grouped by date, soonest first (10 dates at most).
    # (Empty in a balance cached by a konvert from before the field.)
    vesting: list[VestingPoints] = []
    # Increases with every change; a client can tell which of two reads is newer.
    version: int


class Cause(msgspec.Struct, frozen=True):
    type: str
    ref: str


class ActivityItem(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    transfer_id: int
    code: str
    asset: str
    amount: int
    # The change to the member's total of this asset: +amount in, -amount out, 0 for a move
    # between the member's own buckets (pending -> available on vesting).
    delta: int
    # The member's bucket the points went to (or left, when delta < 0).
    bucket: str
    from_bucket: str | None = None
    cause: Cause
    reason: str | None = None
    lot_id: int | None = None
    reverses_transfer_id: int | None = None
    created_at: datetime


class ActivityPage(msgspec.Struct, frozen=True):
    items: list[ActivityItem]
    # Pass as ?cursor= to get the next (older) page; null on the last page.
    next_cursor: str | None


class AdjustmentIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    adjustment_id: AdjustmentId
    # Signed: positive credits points (a new lot), negative takes available points.
    points: SignedPoints
    reason_code: Annotated[str, Meta(min_length=1, max_length=64, pattern=NO_CONTROL_CHARACTERS)]
    note: Note = ""

    def __post_init__(self) -> None:
        if self.points == 0:
            raise ValueError("points must not be 0")


class AdjustmentOut(msgspec.Struct, frozen=True, kw_only=True):
    adjustment_id: str
    member_id: str
    points: int
    reason_code: str
    note: str
    made_by: str
    transfer_id: int
    lot_id: int | None
    created_at: datetime
