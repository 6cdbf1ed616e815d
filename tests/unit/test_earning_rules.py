"""Earning and refund arithmetic, without a database. Expected numbers are worked out by hand."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from konvert.earning.model import AppliedRule, PurchaseIn, PurchaseLine, RefundLineIn, RuleKind
from konvert.earning.rules import (
    LineRefundState,
    PurchaseRefundState,
    RefundPlan,
    apply_refund,
    apportion,
    compute_earning,
    earning_rate,
    plan_refund_by_amount,
    plan_refund_by_lines,
    refund_state_for,
)
from konvert.errors import RefundExceedsPurchase, UnknownPartner, Unprocessable, UnsupportedCurrency
from konvert.program import (
    Campaign,
    CategoryRule,
    Earning,
    EarningRate,
    Partner,
    Program,
    parse_program,
)

BLACK_FRIDAY = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)

CAMPAIGN_WINDOW = """
starts_at = 2026-11-27T00:00:00Z
ends_at = 2026-11-30T00:00:00Z
"""


def make_program(tables: str = "", *, options: str = "") -> Program:
    """A program with partners ``web`` and ``store``.

    ``options`` are plain ``[earning]`` keys, ``tables`` its rule tables; unless ``tables`` has
    its own rates, EUR earns 1 point per euro.
    """
    rates = "" if "earning.rates" in tables else '[[earning.rates]]\ncurrency = "EUR"\npoints_per_unit = 1\n'
    text = f"""
name = "Test program"
[[partners]]
id = "web"
[[partners]]
id = "store"
[earning]
{options}
{rates}
{tables}
"""
    return parse_program(text)


def line(
    line_id: str, unit_price: int, quantity: int = 1, *, sku: str | None = None, category: str = "misc"
) -> PurchaseLine:
    return PurchaseLine(line_id, sku or f"SKU-{line_id}", category, quantity, unit_price)


def purchase(
    *lines: PurchaseLine,
    partner: str = "web",
    currency: str = "EUR",
    occurred_at: datetime = BLACK_FRIDAY,
    shipping: int = 0,
    tax: int = 0,
) -> PurchaseIn:
    return PurchaseIn(
        purchase_id="p-1",
        member_id="m-1",
        partner=partner,
        currency=currency,
        occurred_at=occurred_at,
        lines=lines,
        shipping=shipping,
        tax=tax,
    )


def rule(kind: RuleKind, ref: str, factor: str | None = None, points: int | None = None) -> AppliedRule:
    return AppliedRule(kind=kind, ref=ref, factor=factor, points=points)


# --------------------------------------------------------------------------------------------
# Rates and currencies
# --------------------------------------------------------------------------------------------


def test_base_rate_floors_each_line() -> None:
    # 2 x 19.99 EUR = 39.98 EUR at 1 point per euro: 39 points.
    result = compute_earning(make_program(), purchase(line("a", 1999, 2)))

    assert result.points == 39
    (earned,) = result.lines
    assert earned.amount == 3998
    assert earned.points == 39
    assert earned.rules == (rule("rate", "EUR", "1"), rule("rounding", "floor", "39.98"))
    assert (result.bonus_points, result.bonuses, result.cap_applied, result.rules) == (0, (), False, ())
    assert result.points_before_cap == 39


def test_partner_specific_rate_overrides_the_currency_rate() -> None:
    program = make_program(
        """
[[earning.rates]]
currency = "EUR"
points_per_unit = 1
[[earning.rates]]
currency = "EUR"
partner = "store"
points_per_unit = 1.5
"""
    )
    # 10.00 EUR: 15 points at the store, 10 on the web shop.
    at_store = compute_earning(program, purchase(line("a", 1000), partner="store"))
    on_web = compute_earning(program, purchase(line("a", 1000), partner="web"))

    assert at_store.points == 15
    assert at_store.lines[0].rules == (rule("rate", "EUR/store", "1.5"),)
    assert on_web.points == 10
    assert on_web.lines[0].rules == (rule("rate", "EUR", "1"),)


def test_jpy_has_no_minor_units() -> None:
    program = make_program('[[earning.rates]]\ncurrency = "JPY"\npoints_per_unit = 0.01\n')
    # 12345 yen at 0.01 points per yen: 123.45, floored to 123.
    result = compute_earning(program, purchase(line("a", 12345), currency="JPY"))

    assert result.points == 123
    assert result.lines[0].rules == (rule("rate", "JPY", "0.01"), rule("rounding", "floor", "123.45"))


def test_three_decimal_currency() -> None:
    program = make_program('[[earning.rates]]\ncurrency = "KWD"\npoints_per_unit = 10\n')
    # 1234 fils = 1.234 KWD at 10 points per dinar: 12.34, floored to 12.
    result = compute_earning(program, purchase(line("a", 1234), currency="KWD"))

    assert result.points == 12


def test_rate_minor_units_override_the_iso_exponent() -> None:
    program = make_program('[[earning.rates]]\ncurrency = "HUF"\npoints_per_unit = 0.01\nminor_units = 0\n')
    # 5000 counted as whole forint (not 50.00): 50 points.
    result = compute_earning(program, purchase(line("a", 5000), currency="HUF"))

    assert result.points == 50


# A purchase is checked with earning_rate when it arrives, and its points computed later in its
# batch: both refuse the same purchases.
REFUSERS = pytest.mark.parametrize("refuser", [compute_earning, earning_rate], ids=["compute", "check"])


@REFUSERS
def test_unknown_partner_is_refused(refuser) -> None:
    with pytest.raises(UnknownPartner, match="'nowhere'"):
        refuser(make_program(), purchase(line("a", 100), partner="nowhere"))


@REFUSERS
def test_currency_without_rate_is_refused(refuser) -> None:
    with pytest.raises(UnsupportedCurrency, match="'GBP'"):
        refuser(make_program(), purchase(line("a", 100), currency="GBP"))


@REFUSERS
def test_a_partner_only_rate_does_not_cover_other_partners(refuser) -> None:
    program = make_program('[[earning.rates]]\ncurrency = "USD"\npartner = "store"\npoints_per_unit = 1\n')

    assert compute_earning(program, purchase(line("a", 100), currency="USD", partner="store")).points == 1
    assert earning_rate(program, purchase(line("a", 100), currency="USD", partner="store")).partner == "store"
    with pytest.raises(UnsupportedCurrency, match="'USD'"):
        refuser(program, purchase(line("a", 100), currency="USD", partner="web"))


# --------------------------------------------------------------------------------------------
# Category and sku rules
# --------------------------------------------------------------------------------------------


def test_category_multiplier() -> None:
    program = make_program('[[earning.categories]]\ncategory = "books"\nmultiplier = 2\n')
    # 10.50 EUR x 2 = 21 points exactly, so no rounding entry.
    result = compute_earning(program, purchase(line("a", 1050, category="books"), line("b", 1050)))

    assert [earned.points for earned in result.lines] == [21, 10]
    assert result.lines[0].rules == (rule("rate", "EUR", "1"), rule("category", "books", "2"))
    assert result.points == 31


def test_sku_multiplier() -> None:
    program = make_program('[[earning.skus]]\nsku = "TEA-1"\nmultiplier = 3\n')
    # 7.00 EUR x 3 = 21 points.
    result = compute_earning(program, purchase(line("a", 700, sku="TEA-1")))

    assert result.points == 21
    assert result.lines[0].rules == (rule("rate", "EUR", "1"), rule("sku", "TEA-1", "3"))


def test_sku_exclusion() -> None:
    program = make_program('[[earning.skus]]\nsku = "DEPOSIT"\nexclude = true\n')
    result = compute_earning(program, purchase(line("a", 5000, sku="DEPOSIT"), line("b", 1000)))

    excluded, kept = result.lines
    assert (excluded.points, excluded.amount) == (0, 5000)
    assert excluded.rules == (rule("excluded", "DEPOSIT"),)
    assert kept.points == 10
    assert result.points == 10


def test_category_exclusion_wins_over_multipliers() -> None:
    program = make_program(
        f"""
[[earning.categories]]
category = "gift-cards"
exclude = true
[[earning.skus]]
sku = "CARD-50"
multiplier = 3
[[earning.campaigns]]
id = "double"
multiplier = 2
{CAMPAIGN_WINDOW}
"""
    )
    result = compute_earning(program, purchase(line("a", 5000, sku="CARD-50", category="gift-cards")))

    assert result.points == 0
    assert result.lines[0].rules == (rule("excluded", "gift-cards"),)


# --------------------------------------------------------------------------------------------
# Campaigns
# --------------------------------------------------------------------------------------------


def campaign_program(extra: str = "", multiplier: str = "2") -> Program:
    return make_program(f'[[earning.campaigns]]\nid = "bf"\nmultiplier = {multiplier}\n{CAMPAIGN_WINDOW}{extra}')


@pytest.mark.parametrize(
    ("occurred_at", "expected_points"),
    [
        (datetime(2026, 11, 27, 0, 0, tzinfo=UTC), 20),  # starts_at is inclusive
        (datetime(2026, 11, 29, 23, 59, 59, tzinfo=UTC), 20),
        (datetime(2026, 11, 30, 0, 0, tzinfo=UTC), 10),  # ends_at is exclusive
        (datetime(2026, 11, 26, 23, 59, 59, tzinfo=UTC), 10),
    ],
)
def test_campaign_window_is_half_open(occurred_at: datetime, expected_points: int) -> None:
    result = compute_earning(campaign_program(), purchase(line("a", 1000), occurred_at=occurred_at))

    assert result.points == expected_points


def test_campaign_window_compares_instants_across_offsets() -> None:
    # 2026-11-30T00:30+01:00 is 2026-11-29T23:30Z: still inside the window.
    from datetime import timedelta, timezone

    occurred_at = datetime(2026, 11, 30, 0, 30, tzinfo=timezone(timedelta(hours=1)))
    result = compute_earning(campaign_program(), purchase(line("a", 1000), occurred_at=occurred_at))

    assert result.points == 20


def test_campaign_multiplier_is_recorded() -> None:
    result = compute_earning(campaign_program(), purchase(line("a", 1000)))

    assert result.lines[0].rules == (rule("rate", "EUR", "1"), rule("campaign", "bf", "2"))


def test_campaign_partner_filter() -> None:
    program = campaign_program('partners = ["store"]\n')

    assert compute_earning(program, purchase(line("a", 1000), partner="store")).points == 20
    assert compute_earning(program, purchase(line("a", 1000), partner="web")).points == 10


def test_campaign_category_filter() -> None:
    program = campaign_program('categories = ["books"]\n')
    result = compute_earning(program, purchase(line("a", 1000, category="books"), line("b", 1000, category="toys")))

    assert [earned.points for earned in result.lines] == [20, 10]
    assert result.lines[1].rules == (rule("rate", "EUR", "1"),)


def test_fixed_bonus_is_per_purchase_and_not_per_line() -> None:
    program = make_program(f'[[earning.campaigns]]\nid = "welcome"\nbonus_points = 100\n{CAMPAIGN_WINDOW}')
    result = compute_earning(program, purchase(line("a", 1000), line("b", 550)))

    # 10 + 5 points from the lines (5.50 floored), 100 from the bonus; a multiplier of 1 is not listed.
    assert [earned.points for earned in result.lines] == [10, 5]
    assert result.lines[0].rules == (rule("rate", "EUR", "1"),)
    assert result.bonus_points == 100
    assert result.bonuses == (rule("bonus", "welcome", points=100),)
    assert result.points == 115


def test_category_filtered_bonus_needs_a_matching_line() -> None:
    program = make_program(
        f'[[earning.campaigns]]\nid = "books-bonus"\nbonus_points = 50\ncategories = ["books"]\n{CAMPAIGN_WINDOW}'
    )

    assert compute_earning(program, purchase(line("a", 1000, category="toys"))).bonus_points == 0
    with_book = compute_earning(program, purchase(line("a", 1000, category="toys"), line("b", 100, category="books")))
    assert with_book.bonus_points == 50
    assert with_book.points == 10 + 1 + 50


def test_bonus_outside_the_window_is_not_given() -> None:
    program = make_program(f'[[earning.campaigns]]\nid = "welcome"\nbonus_points = 100\n{CAMPAIGN_WINDOW}')
    result = compute_earning(program, purchase(line("a", 1000), occurred_at=datetime(2027, 1, 1, tzinfo=UTC)))

    assert (result.points, result.bonus_points, result.bonuses) == (10, 0, ())


def test_campaigns_and_category_stack_multiplicatively() -> None:
    program = make_program(
        f"""
[[earning.categories]]
category = "books"
multiplier = 2
[[earning.campaigns]]
id = "bf"
multiplier = 1.5
{CAMPAIGN_WINDOW}
[[earning.campaigns]]
id = "books-week"
multiplier = 2
categories = ["books"]
{CAMPAIGN_WINDOW}
"""
    )
    # 10.00 EUR x 2 (category) x 1.5 x 2 (campaigns) = 60 points.
    result = compute_earning(program, purchase(line("a", 1000, category="books")))

    assert result.points == 60
    assert result.lines[0].rules == (
        rule("rate", "EUR", "1"),
        rule("category", "books", "2"),
        rule("campaign", "bf", "1.5"),
        rule("campaign", "books-week", "2"),
    )


# --------------------------------------------------------------------------------------------
# Tier and rounding
# --------------------------------------------------------------------------------------------


def test_tier_multiplier_applies_to_lines_but_not_to_bonus() -> None:
    program = make_program(f'[[earning.campaigns]]\nid = "welcome"\nbonus_points = 100\n{CAMPAIGN_WINDOW}')
    # 10.00 EUR x 1.25 = 12.5, floored to 12; the bonus stays 100.
    result = compute_earning(program, purchase(line("a", 1000)), tier_multiplier=Decimal("1.25"), tier_name="gold")

    assert result.lines[0].points == 12
    assert result.lines[0].rules == (
        rule("rate", "EUR", "1"),
        rule("tier", "gold", "1.25"),
        rule("rounding", "floor", "12.5"),
    )
    assert result.points == 112


def test_tier_without_name_and_tier_of_one() -> None:
    named_by_default = compute_earning(make_program(), purchase(line("a", 1000)), tier_multiplier=Decimal(2))
    neutral = compute_earning(make_program(), purchase(line("a", 1000)), tier_multiplier=Decimal("1.00"))

    assert named_by_default.lines[0].rules[-1] == rule("tier", "tier", "2")
    assert named_by_default.points == 20
    assert neutral.lines[0].rules == (rule("rate", "EUR", "1"),)


@pytest.mark.parametrize(
    ("rounding", "unit_price", "expected_points"),
    [
        ("floor", 1250, 12),
        ("half_up", 1250, 13),
        ("ceil", 1250, 13),
        ("floor", 1249, 12),
        ("half_up", 1249, 12),
        ("ceil", 1249, 13),
        ("floor", 1201, 12),
        ("ceil", 1201, 13),
    ],
)
def test_rounding_modes(rounding: str, unit_price: int, expected_points: int) -> None:
    program = make_program(options=f'rounding = "{rounding}"\n')
    result = compute_earning(program, purchase(line("a", unit_price)))

    assert result.points == expected_points
    assert result.lines[0].rules[-1] == rule("rounding", rounding, str(Decimal(unit_price) / 100))


def test_rounding_is_per_line() -> None:
    # Three lines of 0.99 EUR: 0 + 0 + 0 with floor, not floor(2.97) = 2.
    result = compute_earning(make_program(), purchase(line("a", 99), line("b", 99), line("c", 99)))

    assert result.points == 0


def test_rounding_entry_shows_at_most_six_decimals() -> None:
    program = make_program('[[earning.rates]]\ncurrency = "EUR"\npoints_per_unit = 0.3333333\n')
    # 1.00 EUR x 0.3333333 = 0.3333333, shown as 0.333333.
    result = compute_earning(program, purchase(line("a", 100)))

    assert result.lines[0].rules[-1] == rule("rounding", "floor", "0.333333")


def test_decimal_arithmetic_is_exact() -> None:
    # 0.29 EUR x 100 is exactly 29 points; in binary floating point it is 28.999999999999996.
    program = make_program('[[earning.rates]]\ncurrency = "EUR"\npoints_per_unit = 100\n')

    assert compute_earning(program, purchase(line("a", 29))).points == 29


def test_decimal_arithmetic_is_exact_for_the_largest_amounts() -> None:
    program = make_program('[[earning.rates]]\ncurrency = "EUR"\npoints_per_unit = 3.33\n')
    # The largest total a purchase may have (PURCHASE_TOTAL_MAX, 10**15 minor units):
    # 100000 x 99,999,999.99 EUR = 9,999,999,999,000 EUR; x 3.33 = 33,299,999,996,670 exactly.
    result = compute_earning(program, purchase(line("a", 9_999_999_999, 100_000)))

    assert result.points == 33_299_999_996_670
    assert len(result.lines[0].rules) == 1


# --------------------------------------------------------------------------------------------
# Shipping and tax
# --------------------------------------------------------------------------------------------


def test_shipping_and_tax_earn_nothing_by_default() -> None:
    result = compute_earning(make_program(), purchase(line("a", 1000), shipping=500, tax=300))

    assert [earned.line_id for earned in result.lines] == ["a"]
    assert result.points == 10


def test_shipping_and_tax_earn_at_the_base_rate_when_enabled() -> None:
    program = make_program(
        options="earn_on_shipping = true\nearn_on_tax = true",
        tables=f"""
[[earning.categories]]
category = "books"
multiplier = 5
[[earning.campaigns]]
id = "bf"
multiplier = 2
{CAMPAIGN_WINDOW}
[[earning.campaigns]]
id = "books-week"
multiplier = 3
categories = ["books"]
{CAMPAIGN_WINDOW}
""",
    )
    result = compute_earning(
        program,
        purchase(line("a", 1000, category="books"), shipping=500, tax=333),
        tier_multiplier=Decimal("1.5"),
        tier_name="gold",
    )

    book, shipping, tax = result.lines
    # The book: 10 x 5 x 2 x 3 x 1.5 = 450.
    assert book.points == 450
    # Shipping: 5.00 x 2 (unfiltered campaign) x 1.5 (tier) = 15; no category multiplier or filtered campaign.
    assert (shipping.line_id, shipping.amount, shipping.points) == ("shipping", 500, 15)
    assert shipping.rules == (
        rule("rate", "EUR", "1"),
        rule("campaign", "bf", "2"),
        rule("tier", "gold", "1.5"),
    )
    # Tax: 3.33 x 2 x 1.5 = 9.99, floored to 9.
    assert (tax.line_id, tax.amount, tax.points) == ("tax", 333, 9)
    assert result.points == 474


def test_only_enabled_extras_earn() -> None:
    program = make_program(options="earn_on_tax = true\n")
    result = compute_earning(program, purchase(line("a", 1000), shipping=500, tax=300))

    assert [(earned.line_id, earned.points) for earned in result.lines] == [("a", 10), ("tax", 3)]


# --------------------------------------------------------------------------------------------
# Purchase cap
# --------------------------------------------------------------------------------------------


def test_cap_scales_lines_and_bonus_to_the_cap_exactly() -> None:
    program = make_program(
        options="purchase_cap_points = 100",
        tables=f"""
[[earning.campaigns]]
id = "welcome"
bonus_points = 17
{CAMPAIGN_WINDOW}
""",
    )
    result = compute_earning(program, purchase(line("a", 10000), line("b", 5000), line("c", 3300)))

    # Before the cap: 100 + 50 + 33 + 17 (bonus) = 200, so every component is halved:
    # 50, 25, 16.5, 8.5. Floors sum to 99; the last point goes to the first of the two equal
    # remainders, line c.
    assert result.points_before_cap == 200
    assert [earned.points for earned in result.lines] == [50, 25, 17]
    assert result.bonus_points == 8
    assert result.points == 100
    assert result.cap_applied is True
    assert result.rules == (rule("cap", "purchase_cap_points", points=-100),)
    # The bonuses list keeps the configured value; the capped bonus is bonus_points.
    assert result.bonuses == (rule("bonus", "welcome", points=17),)


def test_cap_gives_leftover_points_to_the_largest_remainders() -> None:
    program = make_program(options="purchase_cap_points = 10\n")
    # 7 + 6 + 2 = 15 capped to 10: exact shares 4.67, 4, 1.33 -> floors 4, 4, 1, the last point to line a.
    result = compute_earning(program, purchase(line("a", 700), line("b", 600), line("c", 200)))

    assert [earned.points for earned in result.lines] == [5, 4, 1]
    assert result.rules == (rule("cap", "purchase_cap_points", points=-5),)


def test_cap_not_reached_changes_nothing() -> None:
    program = make_program(options="purchase_cap_points = 10\n")
    result = compute_earning(program, purchase(line("a", 1000)))

    assert (result.points, result.cap_applied, result.rules) == (10, False, ())


def test_apportion() -> None:
    assert apportion(10, [7, 6, 2]) == [5, 4, 1]
    assert apportion(3, [1, 1, 1, 1]) == [1, 1, 1, 0]
    assert apportion(0, [0, 0]) == [0, 0]
    assert apportion(5, [0, 5, 0]) == [0, 5, 0]


# --------------------------------------------------------------------------------------------
# Decoding purchases
# --------------------------------------------------------------------------------------------

VALID_LINE = {"line_id": "a", "sku": "S", "category": "c", "quantity": 2, "unit_price": 1999}
VALID_PURCHASE = {
    "purchase_id": "p-1",
    "member_id": "m-1",
    "partner": "web",
    "currency": "EUR",
    "occurred_at": "2026-11-28T12:00:00Z",
    "lines": [VALID_LINE],
}


def decode_purchase(**changes: object) -> PurchaseIn:
    return msgspec.json.decode(msgspec.json.encode({**VALID_PURCHASE, **changes}), type=PurchaseIn)


def test_valid_purchase_decodes() -> None:
    decoded = decode_purchase(shipping=495)

    assert decoded.lines[0].amount == 3998
    assert (decoded.shipping, decoded.tax) == (495, 0)
    assert decoded.occurred_at == BLACK_FRIDAY


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"lines": [VALID_LINE, VALID_LINE]}, "duplicate line_id 'a'"),
        ({"occurred_at": "2026-11-28T12:00:00"}, "timezone"),
        ({"points": 5}, "unknown field `points`"),
        ({"lines": [{**VALID_LINE, "quantity": 0}]}, r"quantity"),
        ({"lines": [{**VALID_LINE, "quantity": 100_001}]}, r"quantity"),
        ({"lines": [{**VALID_LINE, "unit_price": -1}]}, "unit_price"),
        ({"lines": [{**VALID_LINE, "line_id": "shipping"}]}, "reserved"),
        ({"lines": []}, "lines"),
        ({"currency": "eur"}, "currency"),
        ({"member_id": "m\n1"}, "member_id"),
    ],
)
def test_invalid_purchases_are_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=message):
        decode_purchase(**changes)


def test_naive_datetime_is_refused_when_built_in_code() -> None:
    with pytest.raises(ValueError, match="occurred_at"):
        purchase(line("a", 100), occurred_at=datetime(2026, 11, 28))


# --------------------------------------------------------------------------------------------
# Refunds
# --------------------------------------------------------------------------------------------


def refund_state() -> PurchaseRefundState:
    """Line a: 2 x 10.00 EUR, 20 points; line b: 5.50 EUR, 5 points; shipping 4.50; bonus 10."""
    return PurchaseRefundState(
        lines=(
            LineRefundState(line_id="a", quantity=2, unit_price=1000, points=20),
            LineRefundState(line_id="b", quantity=1, unit_price=550, points=5),
        ),
        shipping=450,
        tax=0,
        bonus_points=10,
    )


def clawed_total(state: PurchaseRefundState) -> int:
    return sum(line.points_clawed for line in state.lines) + state.bonus_clawed


def test_refund_by_lines_partially_then_fully_claws_back_exactly_what_was_earned() -> None:
    state = refund_state()

    first = plan_refund_by_lines(state, [RefundLineIn("a", 1)])
    # Line a: floor(20 x 1000 / 2000) = 10. Bonus: floor(10 x 1000 / 3000) = 3.
    assert (first.amount, first.points) == (1000, 13)
    assert first.line_points == (("a", 10),)
    assert first.bonus_points_clawed == 3
    assert first.lines[0].refunded_quantity == 1
    state = apply_refund(state, first)

    second = plan_refund_by_lines(state, [RefundLineIn("a", 1), RefundLineIn("b", 1)])
    # Line a: 20 - 10, line b: 5, bonus: floor(10 x 2550 / 3000) - 3 = 8 - 3.
    assert (second.amount, second.points) == (1550, 20)
    assert second.line_points == (("a", 10), ("b", 5))
    assert second.bonus_points_clawed == 5
    state = apply_refund(state, second)

    # Shipping is the last 4.50; it earned no points but the bonus share comes back with it.
    third = plan_refund_by_amount(state, 450)
    assert (third.points, third.bonus_points_clawed, third.line_points) == (2, 2, ())
    state = apply_refund(state, third)

    assert state.refunded_amount == state.total_amount == 3000
    assert clawed_total(state) == 20 + 5 + 10


def test_partial_line_refunds_never_overshoot() -> None:
    # 7 points over 3 units: cumulative floor(7/3)=2, floor(14/3)=4, 7 -> 2, 2, 3 clawed per step.
    state = PurchaseRefundState(
        lines=(LineRefundState(line_id="x", quantity=3, unit_price=100, points=7),),
        shipping=0,
        tax=0,
        bonus_points=0,
    )
    steps = []
    for _ in range(3):
        plan = plan_refund_by_lines(state, [RefundLineIn("x", 1)])
        steps.append(plan.points)
        state = apply_refund(state, plan)

    assert steps == [2, 2, 3]


def test_refund_by_amount_spreads_over_lines_and_extras() -> None:
    plan = plan_refund_by_amount(refund_state(), 1000)

    # Left to refund: a 2000, b 550, shipping 450 (of 3000). Shares of 1000: 666.67, 183.33, 150,
    # so a gets the leftover unit: 667, 183, 150.
    assert [line.refunded_amount for line in plan.lines] == [667, 183]
    assert [line.refunded_quantity for line in plan.lines] == [0, 0]
    assert plan.other_refunded_amount == 150
    # Line a: floor(20 x 667 / 2000) = 6; b: floor(5 x 183 / 550) = 1; bonus: floor(10 x 1000 / 3000) = 3.
    assert plan.line_points == (("a", 6), ("b", 1))
    assert (plan.bonus_points_clawed, plan.bonus_clawed) == (3, 3)
    assert (plan.amount, plan.points) == (1000, 10)


def test_mixed_refunds_respect_money_already_refunded() -> None:
    state = apply_refund(refund_state(), plan_refund_by_amount(refund_state(), 1000))

    by_line = plan_refund_by_lines(state, [RefundLineIn("a", 1)])
    # a: 667 + 1000 = 1667 refunded; floor(20 x 1667 / 2000) = 16, 6 clawed before.
    assert by_line.line_points == (("a", 10),)
    state = apply_refund(state, by_line)

    # Only 333 of line a's money is left, less than a unit's 1000.
    with pytest.raises(RefundExceedsPurchase, match="'a'"):
        plan_refund_by_lines(state, [RefundLineIn("a", 1)])

    rest = plan_refund_by_amount(state, state.total_amount - state.refunded_amount)
    state = apply_refund(state, rest)
    assert state.refunded_amount == 3000
    assert clawed_total(state) == 35


def test_over_refund_by_amount_is_refused() -> None:
    with pytest.raises(RefundExceedsPurchase, match="3000") as caught:
        plan_refund_by_amount(refund_state(), 3001)
    assert caught.value.extra == {"refundable_amount": 3000}


def test_over_refund_by_quantity_is_refused() -> None:
    with pytest.raises(RefundExceedsPurchase, match="'a'"):
        plan_refund_by_lines(refund_state(), [RefundLineIn("a", 3)])


@pytest.mark.parametrize(
    "lines",
    [
        [RefundLineIn("zzz", 1)],
        [RefundLineIn("a", 1), RefundLineIn("a", 1)],
        [],
    ],
)
def test_bad_line_refunds_are_unprocessable(lines: list[RefundLineIn]) -> None:
    with pytest.raises(Unprocessable) as caught:
        plan_refund_by_lines(refund_state(), lines)
    assert not isinstance(caught.value, RefundExceedsPurchase)


def test_refund_amount_must_be_positive() -> None:
    with pytest.raises(Unprocessable):
        plan_refund_by_amount(refund_state(), 0)


def test_refund_state_turns_earning_extras_into_lines() -> None:
    program = make_program(
        f'[[earning.campaigns]]\nid = "w"\nbonus_points = 10\n{CAMPAIGN_WINDOW}',
        options="earn_on_shipping = true",
    )
    bought = purchase(line("a", 1000, 2), shipping=500, tax=190)
    state = refund_state_for(bought, compute_earning(program, bought))

    assert [(ln.line_id, ln.quantity, ln.unit_price, ln.points) for ln in state.lines] == [
        ("a", 2, 1000, 20),
        ("shipping", 1, 500, 5),
    ]
    # Shipping is now a line, so only tax is left as a pointless extra; the total is unchanged.
    assert (state.shipping, state.tax, state.bonus_points) == (0, 190, 10)
    assert state.total_amount == 2690
    assert plan_refund_by_lines(state, [RefundLineIn("shipping", 1)]).line_points == (("shipping", 5),)


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------

CATEGORIES = ("books", "toys", "food", "gift-cards")


@st.composite
def programs(draw: st.DrawFn) -> Program:
    rate = draw(st.decimals(min_value=Decimal("0.1"), max_value=Decimal("3.5"), places=2))
    multipliers = st.decimals(min_value=Decimal(0), max_value=Decimal(5), places=2)
    categories = tuple(
        CategoryRule(category=name, multiplier=draw(multipliers), exclude=draw(st.booleans()))
        for name in draw(st.sets(st.sampled_from(CATEGORIES)))
    )
    campaigns = tuple(
        Campaign(
            id=f"c{index}",
            starts_at=datetime(2026, 11, 27, tzinfo=UTC),
            ends_at=datetime(2026, 11, 30, tzinfo=UTC),
            multiplier=draw(multipliers),
            bonus_points=draw(st.integers(0, 500)),
            categories=tuple(draw(st.sets(st.sampled_from(CATEGORIES), max_size=2))),
        )
        for index in range(draw(st.integers(0, 2)))
    )
    earning = Earning(
        rounding=draw(st.sampled_from(["floor", "half_up", "ceil"])),
        purchase_cap_points=draw(st.none() | st.integers(1, 5_000)),
        earn_on_shipping=draw(st.booleans()),
        earn_on_tax=draw(st.booleans()),
        rates=(EarningRate(currency="EUR", points_per_unit=rate),),
        categories=categories,
        campaigns=campaigns,
    )
    return Program(name="Generated", partners=(Partner(id="web"),), earning=earning)


@st.composite
def purchases(draw: st.DrawFn) -> PurchaseIn:
    count = draw(st.integers(1, 8))
    lines = tuple(
        PurchaseLine(
            f"l{index}",
            f"S{index}",
            draw(st.sampled_from(CATEGORIES)),
            draw(st.integers(1, 20)),
            draw(st.integers(0, 100_000)),
        )
        for index in range(count)
    )
    return purchase(*lines, shipping=draw(st.integers(0, 2_000)), tax=draw(st.integers(0, 2_000)))


tier_multipliers = st.decimals(min_value=Decimal(1), max_value=Decimal(3), places=2)


@settings(deadline=None)
@given(program=programs(), bought=purchases(), tier=tier_multipliers)
def test_totals_add_up_and_respect_the_cap(program: Program, bought: PurchaseIn, tier: Decimal) -> None:
    result = compute_earning(program, bought, tier_multiplier=tier)
    uncapped_program = msgspec.structs.replace(
        program, earning=msgspec.structs.replace(program.earning, purchase_cap_points=None)
    )
    uncapped = compute_earning(uncapped_program, bought, tier_multiplier=tier)

    assert result.points == sum(earned.points for earned in result.lines) + result.bonus_points
    assert all(earned.points >= 0 for earned in result.lines)
    assert result.bonus_points >= 0
    assert result.points_before_cap == uncapped.points
    cap = program.earning.purchase_cap_points
    if cap is not None:
        assert result.points == min(uncapped.points, cap)
        assert result.cap_applied == (uncapped.points > cap)
        # The cap only ever takes points away, line by line.
        for capped, before in zip(result.lines, uncapped.lines, strict=True):
            assert capped.points <= before.points


def refund_steps(data: st.DataObject, state: PurchaseRefundState) -> PurchaseRefundState:
    """Draw partial refunds within bounds, then refund the rest; check the claw-back on every step."""
    earned = sum(line.points for line in state.lines) + state.bonus_points
    for _ in range(data.draw(st.integers(0, 6))):
        refundable_lines = [
            line
            for line in state.lines
            if line.refunded_quantity < line.quantity and line.refunded_amount + line.unit_price <= line.amount
        ]
        amount_left = state.total_amount - state.refunded_amount
        if refundable_lines and (amount_left == 0 or data.draw(st.booleans())):
            chosen = data.draw(st.lists(st.sampled_from(refundable_lines), min_size=1, unique_by=lambda ln: ln.line_id))
            plan = plan_refund_by_lines(state, [RefundLineIn(ln.line_id, data.draw(unit_counts(ln))) for ln in chosen])
        elif amount_left > 0:
            plan = plan_refund_by_amount(state, data.draw(st.integers(1, amount_left)))
        else:
            break
        state = check_step(state, plan, earned)

    # Now refund everything that is left: whole units first, then the remaining money.
    leftovers = [RefundLineIn(ln.line_id, count) for ln in state.lines if (count := max_units(ln)) > 0]
    if leftovers:
        state = check_step(state, plan_refund_by_lines(state, leftovers), earned)
    if state.total_amount > state.refunded_amount:
        state = check_step(state, plan_refund_by_amount(state, state.total_amount - state.refunded_amount), earned)
    return state


def max_units(line: LineRefundState) -> int:
    units_left = line.quantity - line.refunded_quantity
    if line.unit_price == 0:
        return units_left
    return min(units_left, (line.amount - line.refunded_amount) // line.unit_price)


def unit_counts(line: LineRefundState) -> st.SearchStrategy[int]:
    return st.integers(1, max_units(line))


def check_step(state: PurchaseRefundState, plan: RefundPlan, earned: int) -> PurchaseRefundState:
    assert plan.points >= 0
    assert plan.bonus_points_clawed >= 0
    assert all(points >= 0 for _, points in plan.line_points)
    after = apply_refund(state, plan)
    assert clawed_total(after) - clawed_total(state) == plan.points
    assert after.refunded_amount - state.refunded_amount == plan.amount
    assert clawed_total(after) <= earned
    assert all(line.points_clawed <= line.points for line in after.lines)
    assert after.refunded_amount <= after.total_amount
    return after


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=programs(), bought=purchases(), data=st.data())
def test_refunds_never_claw_back_more_than_earned(program: Program, bought: PurchaseIn, data: st.DataObject) -> None:
    earning = compute_earning(program, bought)
    state = refund_state_for(bought, earning)

    state = refund_steps(data, state)

    assert state.refunded_amount == state.total_amount
    assert clawed_total(state) == earning.points
