"""Earning and refund arithmetic: pure functions, no I/O.

Points are worked out per line in exact decimals (never float), rounded per line, then capped
per purchase by integer largest-remainder apportionment. Refunds claw points back cumulatively:
each refund recomputes "how much should be clawed back in total by now" and takes the
difference, so a series of partial refunds can never claw back more than was earned, and a full
refund claws back exactly what was earned.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from decimal import (
    MAX_EMAX,
    MAX_PREC,
    MIN_EMIN,
    ROUND_CEILING,
    ROUND_FLOOR,
    ROUND_HALF_UP,
    Context,
    Decimal,
    localcontext,
)
from typing import NamedTuple

import msgspec

from konvert.earning.model import (
    AppliedRule,
    EarningResult,
    LineEarning,
    PurchaseIn,
    PurchaseLine,
    RefundLineIn,
)
from konvert.errors import RefundExceedsPurchase, UnknownPartner, Unprocessable, UnsupportedCurrency
from konvert.program import Campaign, Earning, EarningRate, Program, currency_exponent

# With unbounded precision, Decimal multiplication is exact. Earning only multiplies and shifts
# the exponent (never divides), so no result is ever rounded before the rounding rule says so.
_EXACT = Context(prec=MAX_PREC, Emax=MAX_EMAX, Emin=MIN_EMIN)

_ROUNDING_MODES = {"floor": ROUND_FLOOR, "half_up": ROUND_HALF_UP, "ceil": ROUND_CEILING}
_ONE = Decimal(1)
_SHOWN_DECIMALS = Decimal("0.000001")

# A multiplicative factor on a line's points together with the rule that explains it.
_Factor = tuple[AppliedRule, Decimal]


# --------------------------------------------------------------------------------------------
# Earning
# --------------------------------------------------------------------------------------------


def compute_earning(
    program: Program,
    purchase: PurchaseIn,
    *,
    tier_multiplier: Decimal = _ONE,
    tier_name: str | None = None,
) -> EarningResult:
    """Work out the points ``purchase`` earns under ``program``, line by line, with the rules applied.

    ``tier_multiplier`` is the member's tier boost (named ``tier_name`` in the explanation); it
    applies to every line, shipping and tax included, but not to fixed bonuses.

    Raises :class:`UnknownPartner` when the partner is not in the program and
    :class:`UnsupportedCurrency` when no rate covers the currency for that partner.
    """
    if not tier_multiplier.is_finite() or tier_multiplier < 0:
        raise ValueError(f"tier_multiplier must be a number >= 0, got {tier_multiplier}")
    earning = program.earning
    rate = earning_rate(program, purchase)
    pricing = _Pricing(
        rate=_rate_factor(rate),
        tier=_tier_factors(tier_multiplier, tier_name),
        exponent=rate.minor_units if rate.minor_units is not None else currency_exponent(purchase.currency),
        rounding=earning.rounding,
    )
    campaigns = [c for c in earning.campaigns if _campaign_in_force(c, purchase.partner, purchase.occurred_at)]

    with localcontext(_EXACT):
        lines = [_earn_purchase_line(line, earning, campaigns, pricing) for line in purchase.lines]
        for line_id, amount in _earning_extras(earning, purchase):
            lines.append(pricing.earn(line_id, amount, _campaign_factors(campaigns, category=None)))

    bonuses = _bonuses(campaigns, purchase.lines)
    bonus_points = sum(bonus.points or 0 for bonus in bonuses)
    return _apply_cap(lines, bonuses, bonus_points, earning.purchase_cap_points)


def earning_rate(program: Program, purchase: PurchaseIn) -> EarningRate:
    """The rate the purchase earns at: everything that can refuse it before its points are worked
    out (checked when it arrives; its points are computed once its member's tier is known).

    Raises :class:`UnknownPartner` and :class:`UnsupportedCurrency`, as compute_earning does.
    """
    if not program.has_partner(purchase.partner):
        raise UnknownPartner(f"partner {purchase.partner!r} is not in the program", partner=purchase.partner)
    return _rate_for(program.earning, purchase.currency, purchase.partner)


class _Pricing(NamedTuple):
    """What every line of one purchase shares: the rate, the tier, the currency's exponent, the rounding."""

    rate: _Factor
    tier: list[_Factor]
    exponent: int
    rounding: str

    def earn(self, line_id: str, amount: int, multipliers: list[_Factor]) -> LineEarning:
        """Multiply the amount in major units by every factor, then round once, at the end."""
        # The explanation reads in a stable order: rate, category, sku, campaigns, tier, rounding.
        factors = [self.rate, *multipliers, *self.tier]
        raw = Decimal(amount).scaleb(-self.exponent)
        for _, value in factors:
            raw *= value
        points = raw.to_integral_value(rounding=_ROUNDING_MODES[self.rounding])
        rules = [rule for rule, _ in factors]
        if points != raw:
            rules.append(AppliedRule(kind="rounding", ref=self.rounding, factor=_shown(raw)))
        return LineEarning(line_id=line_id, amount=amount, points=int(points), rules=tuple(rules))


def _rate_for(earning: Earning, currency: str, partner: str) -> EarningRate:
    # A partner-specific rate wins over the currency's general rate.
    general = None
    for rate in earning.rates:
        if rate.currency != currency:
            continue
        if rate.partner == partner:
            return rate
        if rate.partner is None:
            general = rate
    if general is None:
        raise UnsupportedCurrency(f"currency {currency!r} has no earning rate in the program", currency=currency)
    return general


def _campaign_in_force(campaign: Campaign, partner: str, occurred_at: datetime) -> bool:
    """Whether the campaign covers this partner at this time; its category filter is checked per line."""
    in_window = campaign.starts_at <= occurred_at < campaign.ends_at
    return in_window and (not campaign.partners or partner in campaign.partners)


def _rate_factor(rate: EarningRate) -> _Factor:
    ref = rate.currency if rate.partner is None else f"{rate.currency}/{rate.partner}"
    return AppliedRule(kind="rate", ref=ref, factor=_decimal_text(rate.points_per_unit)), rate.points_per_unit


def _tier_factors(multiplier: Decimal, name: str | None) -> list[_Factor]:
    # A neutral tier changes nothing and would only clutter the explanation.
    if multiplier == _ONE:
        return []
    return [(AppliedRule(kind="tier", ref=name or "tier", factor=_decimal_text(multiplier)), multiplier)]


def _campaign_factors(campaigns: Iterable[Campaign], category: str | None) -> list[_Factor]:
    """Multipliers of the campaigns that apply to a line of ``category`` (None: shipping or tax).

    Shipping and tax have no category, so only campaigns without a category filter reach them.
    A multiplier of 1 (a bonus-only campaign) is left out of the explanation.
    """
    return [
        (AppliedRule(kind="campaign", ref=c.id, factor=_decimal_text(c.multiplier)), c.multiplier)
        for c in campaigns
        if c.multiplier != _ONE and (not c.categories or (category is not None and category in c.categories))
    ]


def _earn_purchase_line(
    line: PurchaseLine, earning: Earning, campaigns: Sequence[Campaign], pricing: _Pricing
) -> LineEarning:
    # The first matching rule counts; the program file does not forbid repeats.
    category_rule = next((r for r in earning.categories if r.category == line.category), None)
    sku_rule = next((r for r in earning.skus if r.sku == line.sku), None)
    # An exclusion wins over every multiplier: the line earns nothing, and says why.
    if sku_rule is not None and sku_rule.exclude:
        return _excluded(line, ref=line.sku)
    if category_rule is not None and category_rule.exclude:
        return _excluded(line, ref=line.category)

    multipliers: list[_Factor] = []
    if category_rule is not None:
        rule = AppliedRule(kind="category", ref=line.category, factor=_decimal_text(category_rule.multiplier))
        multipliers.append((rule, category_rule.multiplier))
    if sku_rule is not None:
        rule = AppliedRule(kind="sku", ref=line.sku, factor=_decimal_text(sku_rule.multiplier))
        multipliers.append((rule, sku_rule.multiplier))
    multipliers += _campaign_factors(campaigns, line.category)
    return pricing.earn(line.line_id, line.amount, multipliers)


def _excluded(line: PurchaseLine, ref: str) -> LineEarning:
    excluded = AppliedRule(kind="excluded", ref=ref)
    return LineEarning(line_id=line.line_id, amount=line.amount, points=0, rules=(excluded,))


def _earning_extras(earning: Earning, purchase: PurchaseIn) -> list[tuple[str, int]]:
    """Shipping and tax as (line_id, amount) pseudo-lines, when the program lets them earn.

    A zero amount earns nothing either way, so it gets no pseudo-line.
    """
    extras = []
    if earning.earn_on_shipping and purchase.shipping > 0:
        extras.append(("shipping", purchase.shipping))
    if earning.earn_on_tax and purchase.tax > 0:
        extras.append(("tax", purchase.tax))
    return extras


def _bonuses(campaigns: Iterable[Campaign], lines: Sequence[PurchaseLine]) -> tuple[AppliedRule, ...]:
    """Fixed per-purchase bonuses. A category filter needs at least one line in a listed category."""
    categories = {line.category for line in lines}
    return tuple(
        AppliedRule(kind="bonus", ref=c.id, points=c.bonus_points)
        for c in campaigns
        if c.bonus_points > 0 and (not c.categories or categories.intersection(c.categories))
    )


def _apply_cap(
    lines: list[LineEarning], bonuses: tuple[AppliedRule, ...], bonus_points: int, cap: int | None
) -> EarningResult:
    points_before_cap = sum(line.points for line in lines) + bonus_points
    if cap is None or points_before_cap <= cap:
        return EarningResult(
            points=points_before_cap,
            lines=tuple(lines),
            bonus_points=bonus_points,
            bonuses=bonuses,
            points_before_cap=points_before_cap,
            cap_applied=False,
            rules=(),
        )
    # Scale every line and the bonus down together so each keeps its share of the capped total.
    *capped_lines, capped_bonus = apportion(cap, [line.points for line in lines] + [bonus_points])
    lines_after_cap = tuple(
        msgspec.structs.replace(line, points=points) for line, points in zip(lines, capped_lines, strict=True)
    )
    cap_rule = AppliedRule(kind="cap", ref="purchase_cap_points", points=cap - points_before_cap)
    return EarningResult(
        points=cap,
        lines=lines_after_cap,
        bonus_points=capped_bonus,
        bonuses=bonuses,
        points_before_cap=points_before_cap,
        cap_applied=True,
        rules=(cap_rule,),
    )


def apportion(total: int, weights: Sequence[int]) -> list[int]:
    """Split ``total`` over ``weights`` in proportion, in whole units, summing to ``total`` exactly.

    Largest remainder: each share is first floor(total * weight / sum), then the units still
    left go one each to the largest fractional remainders, the lower index winning a tie. With
    ``0 <= total <= sum(weights)`` no share exceeds its weight.
    """
    weight_sum = sum(weights)
    if weight_sum == 0:
        if total:
            raise ValueError("cannot apportion a non-zero total over zero weights")
        return [0] * len(weights)
    shares, remainders = [], []
    for weight in weights:
        share, remainder = divmod(total * weight, weight_sum)
        shares.append(share)
        remainders.append(remainder)
    left = total - sum(shares)
    for index in sorted(range(len(weights)), key=lambda i: (-remainders[i], i))[:left]:
        shares[index] += 1
    return shares


def _decimal_text(value: Decimal) -> str:
    # normalize() drops trailing zeros ("1.50" -> "1.5"); "f" keeps "100" from becoming "1E+2".
    return format(value.normalize(_EXACT), "f")


def _shown(value: Decimal) -> str:
    return _decimal_text(value.quantize(_SHOWN_DECIMALS, rounding=ROUND_HALF_UP, context=_EXACT))


# --------------------------------------------------------------------------------------------
# Refunds
# --------------------------------------------------------------------------------------------


class LineRefundState(msgspec.Struct, frozen=True, kw_only=True):
    """One purchase line as far as refunds are concerned: what it cost, earned, and has given back."""

    line_id: str
    quantity: int
    unit_price: int
    # Final points the line earned (after rounding and cap).
    points: int
    refunded_quantity: int = 0
    # Minor units of this line refunded so far, by line refunds and by amount refunds.
    refunded_amount: int = 0
    points_clawed: int = 0

    @property
    def amount(self) -> int:
        return self.quantity * self.unit_price


class PurchaseRefundState(msgspec.Struct, frozen=True, kw_only=True):
    """A purchase's refund position. Shipping and tax that earned points are lines here, not extras."""

    lines: tuple[LineRefundState, ...]
    # Shipping and tax that are not lines: they can be refunded by amount but carry no points.
    shipping: int
    tax: int
    bonus_points: int
    bonus_clawed: int = 0
    # Minor units of shipping and tax refunded so far.
    other_refunded_amount: int = 0

    @property
    def total_amount(self) -> int:
        return sum(line.amount for line in self.lines) + self.shipping + self.tax

    @property
    def refunded_amount(self) -> int:
        return sum(line.refunded_amount for line in self.lines) + self.other_refunded_amount


class RefundPlan(msgspec.Struct, frozen=True, kw_only=True):
    """What one refund does: amount given back now, points clawed back now, and the new state."""

    # Minor units refunded by this refund.
    amount: int
    # Points to claw back now: sum of line_points plus bonus_points_clawed.
    points: int
    # Every line's new state, in the purchase's order.
    lines: tuple[LineRefundState, ...]
    # New cumulative totals.
    bonus_clawed: int
    other_refunded_amount: int
    # Points clawed back now per touched line, as (line_id, points).
    line_points: tuple[tuple[str, int], ...]
    bonus_points_clawed: int


def refund_state_for(purchase: PurchaseIn, earning: EarningResult) -> PurchaseRefundState:
    """The refund position of a purchase that has just earned ``earning``: nothing refunded yet.

    Shipping or tax that earned points becomes a line of quantity 1 (id ``shipping`` / ``tax``)
    so that refunding it claws back its points; otherwise it stays a pointless extra.
    """
    points_by_line = {line.line_id: line.points for line in earning.lines}
    lines = [
        LineRefundState(
            line_id=line.line_id,
            quantity=line.quantity,
            unit_price=line.unit_price,
            points=points_by_line[line.line_id],
        )
        for line in purchase.lines
    ]
    # Shipping or tax that earned became a line; it must not also count as a pointless extra.
    for line_id, amount in (("shipping", purchase.shipping), ("tax", purchase.tax)):
        if line_id in points_by_line:
            line = LineRefundState(line_id=line_id, quantity=1, unit_price=amount, points=points_by_line[line_id])
            lines.append(line)
    return PurchaseRefundState(
        lines=tuple(lines),
        shipping=0 if "shipping" in points_by_line else purchase.shipping,
        tax=0 if "tax" in points_by_line else purchase.tax,
        bonus_points=earning.bonus_points,
    )


def plan_refund_by_lines(state: PurchaseRefundState, lines: Sequence[RefundLineIn]) -> RefundPlan:
    """Plan a refund of whole units of some lines.

    Raises :class:`Unprocessable` for an unknown or repeated line_id, and
    :class:`RefundExceedsPurchase` when a line has fewer units (or less money) left to refund.
    """
    if not lines:
        raise Unprocessable("a refund by lines needs at least one line")
    known = {line.line_id for line in state.lines}
    quantities: dict[str, int] = {}
    for item in lines:
        if item.line_id not in known:
            raise Unprocessable(f"line {item.line_id!r} is not part of this purchase", line_id=item.line_id)
        if item.line_id in quantities:
            raise Unprocessable(f"line {item.line_id!r} appears more than once in the refund", line_id=item.line_id)
        quantities[item.line_id] = item.quantity

    new_lines = []
    amount = 0
    for line in state.lines:
        quantity = quantities.get(line.line_id)
        if quantity is None:
            new_lines.append(line)
            continue
        _check_line_refundable(line, quantity)
        new_lines.append(_refund_line(line, quantity=quantity, amount=quantity * line.unit_price))
        amount += quantity * line.unit_price
    return _plan(state, tuple(new_lines), state.other_refunded_amount, amount, touched=set(quantities))


def plan_refund_by_amount(state: PurchaseRefundState, amount: int) -> RefundPlan:
    """Plan a refund of ``amount`` minor units not tied to lines (a goodwill or partial refund).

    The amount is spread over the lines and the shipping-and-tax extra in proportion to what each
    has left to refund, so points are clawed back as if that share of everything was returned.
    Raises :class:`RefundExceedsPurchase` when more is asked than is still refundable.
    """
    if amount < 1:
        raise Unprocessable(f"a refund amount must be at least 1 minor unit, got {amount}")
    refundable = state.total_amount - state.refunded_amount
    if amount > refundable:
        raise RefundExceedsPurchase(
            f"refund of {amount} exceeds the {refundable} minor units still refundable",
            refundable_amount=refundable,
        )
    other_left = state.shipping + state.tax - state.other_refunded_amount
    *line_shares, other_share = apportion(
        amount, [line.amount - line.refunded_amount for line in state.lines] + [other_left]
    )
    new_lines = tuple(
        _refund_line(line, quantity=0, amount=share) if share else line
        for line, share in zip(state.lines, line_shares, strict=True)
    )
    touched = {line.line_id for line, share in zip(state.lines, line_shares, strict=True) if share}
    return _plan(state, new_lines, state.other_refunded_amount + other_share, amount, touched=touched)


def apply_refund(state: PurchaseRefundState, plan: RefundPlan) -> PurchaseRefundState:
    """The refund position after ``plan`` is carried out."""
    return msgspec.structs.replace(
        state,
        lines=plan.lines,
        bonus_clawed=plan.bonus_clawed,
        other_refunded_amount=plan.other_refunded_amount,
    )


def _check_line_refundable(line: LineRefundState, quantity: int) -> None:
    quantity_left = line.quantity - line.refunded_quantity
    amount_left = line.amount - line.refunded_amount
    # An amount refund may already have given back part of the line's money without returning
    # units, so both the units and the money left must cover this refund.
    if quantity > quantity_left or quantity * line.unit_price > amount_left:
        units_paid_for = amount_left // line.unit_price if line.unit_price else quantity_left
        refundable_quantity = min(quantity_left, units_paid_for)
        raise RefundExceedsPurchase(
            f"line {line.line_id!r}: cannot refund {quantity} units, {refundable_quantity} can still be "
            f"refunded ({amount_left} minor units left)",
            line_id=line.line_id,
            refundable_quantity=refundable_quantity,
            refundable_amount=amount_left,
        )


def _refund_line(line: LineRefundState, *, quantity: int, amount: int) -> LineRefundState:
    refunded_quantity = line.refunded_quantity + quantity
    refunded_amount = line.refunded_amount + amount
    return msgspec.structs.replace(
        line,
        refunded_quantity=refunded_quantity,
        refunded_amount=refunded_amount,
        points_clawed=_line_points_clawed(line, refunded_quantity, refunded_amount),
    )


def _line_points_clawed(line: LineRefundState, refunded_quantity: int, refunded_amount: int) -> int:
    """Points to have clawed back in total once this much of the line is refunded.

    Rounding down keeps every partial refund from taking more than its share; the last refund,
    at the full amount, takes exactly the rest.
    """
    if line.amount == 0:
        # A free line has no money to measure by; only returning every unit gives its points back.
        return line.points if refunded_quantity >= line.quantity else 0
    return line.points * refunded_amount // line.amount


def _bonus_clawed(state: PurchaseRefundState) -> int:
    """Bonus points to have clawed back in total: the refunded share of the purchase, rounded down."""
    total = state.total_amount
    if total == 0:
        fully_returned = all(line.refunded_quantity >= line.quantity for line in state.lines)
        return state.bonus_points if fully_returned else 0
    return state.bonus_points * state.refunded_amount // total


def _plan(
    state: PurchaseRefundState,
    new_lines: tuple[LineRefundState, ...],
    other_refunded_amount: int,
    amount: int,
    touched: set[str],
) -> RefundPlan:
    """The plan that moves ``state`` to ``new_lines``; ``touched`` lines are listed even at 0 points."""
    line_points = tuple(
        (new.line_id, new.points_clawed - old.points_clawed)
        for old, new in zip(state.lines, new_lines, strict=True)
        if new.line_id in touched
    )
    after = msgspec.structs.replace(state, lines=new_lines, other_refunded_amount=other_refunded_amount)
    bonus_clawed = _bonus_clawed(after)
    bonus_now = bonus_clawed - state.bonus_clawed
    return RefundPlan(
        amount=amount,
        points=sum(points for _, points in line_points) + bonus_now,
        lines=new_lines,
        bonus_clawed=bonus_clawed,
        other_refunded_amount=other_refunded_amount,
        line_points=line_points,
        bonus_points_clawed=bonus_now,
    )
