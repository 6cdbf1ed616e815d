"""Wire and domain Structs for earning: what a partner posts, and how its points were worked out.

The HTTP layer decodes request bodies straight into these types, so the bounds on the aliases
below are the edge validation. Amounts are integers in minor currency units (cents for EUR,
yen for JPY); points are integers. Neither is ever a float.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from konvert.ledger.model import NO_CONTROL_CHARACTERS, NO_NUL, MemberId

LineId = Annotated[str, Meta(min_length=1, max_length=64, pattern=NO_CONTROL_CHARACTERS)]
Sku = Annotated[str, Meta(min_length=1, max_length=128, pattern=NO_CONTROL_CHARACTERS)]
Category = Annotated[str, Meta(min_length=1, max_length=128, pattern=NO_CONTROL_CHARACTERS)]
Quantity = Annotated[int, Meta(ge=1, le=100_000)]
MinorAmount = Annotated[
    int, Meta(ge=0, le=10**12, description="An amount in minor currency units, e.g. cents for EUR.")
]
PurchaseId = Annotated[str, Meta(min_length=1, max_length=128, pattern=NO_CONTROL_CHARACTERS)]
PartnerId = Annotated[str, Meta(min_length=1, max_length=64, pattern=NO_CONTROL_CHARACTERS)]
CurrencyCode = Annotated[str, Meta(pattern=r"^[A-Z]{3}$", description="ISO 4217 code, e.g. EUR.")]
AwareDatetime = Annotated[datetime, Meta(tz=True)]

# Bounds no real purchase reaches, so that totals fit PostgreSQL's bigint with room to spare and
# dates convert to UTC without overflowing.
PURCHASE_TOTAL_MAX = 10**15
OCCURRED_AT_MIN = datetime(2000, 1, 1, tzinfo=UTC)

# Shipping and tax become lines with these ids when the program lets them earn, so a purchase
# may not use them for its own lines: the two would be indistinguishable in results and refunds.
RESERVED_LINE_IDS = ("shipping", "tax")

RuleKind = Literal["rate", "category", "sku", "campaign", "tier", "excluded", "rounding", "cap", "bonus"]


class PurchaseLine(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    line_id: LineId
    sku: Sku
    category: Category
    quantity: Quantity
    unit_price: MinorAmount

    @property
    def amount(self) -> int:
        """The line total in minor units."""
        return self.quantity * self.unit_price


class PurchaseIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A purchase as a partner posts it."""

    purchase_id: PurchaseId
    member_id: MemberId
    partner: PartnerId
    currency: CurrencyCode
    occurred_at: AwareDatetime
    lines: Annotated[tuple[PurchaseLine, ...], Meta(min_length=1, max_length=500)]
    shipping: MinorAmount = 0
    tax: MinorAmount = 0

    def __post_init__(self) -> None:
        # The Meta(tz=True) bound covers decoding; this covers Structs built in code, since
        # campaign windows cannot be compared with a naive time.
        if self.occurred_at.tzinfo is None:
            raise ValueError("occurred_at: needs a UTC offset")
        if not self.occurred_at >= OCCURRED_AT_MIN:
            raise ValueError(f"occurred_at: must be after {OCCURRED_AT_MIN:%Y-%m-%d}")
        total = sum(line.amount for line in self.lines) + self.shipping + self.tax
        if total > PURCHASE_TOTAL_MAX:
            raise ValueError(f"the purchase total must be at most {PURCHASE_TOTAL_MAX} minor units")
        seen: set[str] = set()
        for line in self.lines:
            if line.line_id in seen:
                raise ValueError(f"lines: duplicate line_id {line.line_id!r}")
            if line.line_id in RESERVED_LINE_IDS:
                raise ValueError(f"lines: line_id {line.line_id!r} is reserved")
            seen.add(line.line_id)


class AppliedRule(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One rule that shaped a line's or a purchase's points, for the member's explanation.

    ``ref`` names the rule: ``EUR`` or ``EUR/partner`` for a rate, the category, the sku, the
    campaign id, the tier name. ``factor`` is a decimal written as text so it stays exact;
    ``points`` is what a bonus added or a cap removed.
    """

    kind: RuleKind
    ref: str
    factor: str | None = None
    points: int | None = None


class LineEarning(msgspec.Struct, frozen=True, kw_only=True):
    line_id: str
    amount: int
    # Final points: after rounding and after the purchase cap.
    points: int
    rules: tuple[AppliedRule, ...]


class EarningResult(msgspec.Struct, frozen=True, kw_only=True):
    # Always sum(line.points for line in lines) + bonus_points.
    points: int
    lines: tuple[LineEarning, ...]
    # The bonus after the cap; ``bonuses`` lists the campaign bonuses as configured.
    bonus_points: int
    bonuses: tuple[AppliedRule, ...]
    points_before_cap: int
    cap_applied: bool
    # Purchase-level rules: the cap entry, when the cap applied.
    rules: tuple[AppliedRule, ...]


class PurchaseOut(msgspec.Struct, frozen=True, kw_only=True):
    """A recorded purchase: the points it earned, line by line, and where they went."""

    purchase_id: str
    partner: str
    member_id: str
    currency: str
    points: int
    # pending (inside the return window), available, or none (the purchase earned nothing).
    status: Literal["pending", "available", "none"]
    vests_at: datetime | None
    expires_at: datetime | None
    lines: tuple[LineEarning, ...]
    bonus_points: int
    bonuses: tuple[AppliedRule, ...]
    points_before_cap: int
    cap_applied: bool
    rules: tuple[AppliedRule, ...]
    lot_id: int | None
    transfer_id: int | None


RefundId = Annotated[str, Meta(min_length=1, max_length=128, pattern=NO_CONTROL_CHARACTERS)]


class RefundLineIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    line_id: LineId
    quantity: Quantity


class RefundIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A refund of some lines (by quantity), of an amount, up to a cumulative refunded amount, or
    of whatever remains; exactly one of the four."""

    refund_id: RefundId
    # Needed only when several partners have a purchase with this id.
    partner: PartnerId | None = None
    lines: Annotated[tuple[RefundLineIn, ...], Meta(min_length=1, max_length=500)] | None = None
    amount: Annotated[int, Meta(ge=1, le=10**12)] | None = None
    # The purchase's refunded amount after this refund, as payment providers report it (Stripe's
    # cumulative amount_refunded): the difference is refunded, so such reports may arrive in any
    # order and more than once. 409 already_refunded when the purchase was refunded that far.
    refunded_amount: Annotated[int, Meta(ge=1, le=PURCHASE_TOTAL_MAX)] | None = None
    # Refund everything not refunded yet (a cancelled order); only `true` means anything. 409
    # already_refunded when nothing is left. (A boolean, not the literal true: generated clients
    # cannot express a boolean enum.)
    remaining: bool | None = None
    reason: Annotated[str, Meta(max_length=500, pattern=NO_NUL)] | None = None

    def __post_init__(self) -> None:
        if self.remaining is False:
            raise ValueError("remaining: leave it out, or send true")
        given = [self.lines, self.amount, self.refunded_amount, self.remaining]
        if sum(part is not None for part in given) != 1:
            raise ValueError("give exactly one of lines, amount, refunded_amount and remaining")


class RefundLinePoints(msgspec.Struct, frozen=True):
    line_id: str
    points: int


class RefundOut(msgspec.Struct, frozen=True, kw_only=True):
    refund_id: str
    purchase_id: str
    partner: str
    member_id: str
    # Minor units refunded by this refund.
    amount: int
    # Points clawed back by this refund.
    points: int
    # Points that could not be clawed back because the balance may not go negative.
    shortfall: int
    # Points not clawed back because they had expired already (the member lost them once).
    already_expired: int
    lines: list[RefundLinePoints]
    bonus_points: int
    transfer_ids: list[int]
    # Minor units refunded so far over all refunds of the purchase, and still refundable.
    refunded_amount: int
    refundable_amount: int
