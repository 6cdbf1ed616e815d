"""Webhook signatures against the published vectors, and reading real deliveries into actions."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from konvert.errors import InvalidSignature
from konvert.integrations import signatures, sources
from konvert.integrations.model import EarnPurchase, GiveKudos, Options, RefundPurchase

SAMPLES = Path(__file__).parents[1] / "fixtures" / "webhooks"
NOW = datetime(2026, 12, 7, tzinfo=UTC)


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


# --- signatures: the vectors in tests/fixtures/webhooks/README.md -------------------------------


def test_shopify_vector_verifies_and_a_changed_body_does_not() -> None:
    body = sample("shopify-hmac-vector-body.txt")
    headers = {"x-shopify-hmac-sha256": "B23tXN681gZ0qIWNRrgtzBE9XSDo5yaUu6wfmhu3a7g="}

    signatures.verify_shopify(["test_secret_key"], headers, body, NOW)
    with pytest.raises(InvalidSignature):
        signatures.verify_shopify(["test_secret_key"], headers, body + b" ", NOW)
    with pytest.raises(InvalidSignature):
        signatures.verify_shopify(["another_secret"], headers, body, NOW)


def test_discourse_vector_verifies_with_either_of_two_secrets() -> None:
    body = sample("discourse-ping.json")
    headers = {"x-discourse-event-signature": "sha256=162f107f6b5022353274eb1a7197885cfd35744d8d08e5bcea025d309386b7d6"}

    signatures.verify_discourse(["my_lovely_secret_for_web_hook"], headers, body, NOW)
    signatures.verify_discourse(["the_new_secret", "my_lovely_secret_for_web_hook"], headers, body, NOW)
    with pytest.raises(InvalidSignature):
        signatures.verify_discourse(["the_new_secret"], headers, body, NOW)


@pytest.mark.parametrize(
    ("name", "timestamp", "v1"),
    [
        ("stripe-charge-refunded.json", 1648319949, "c885c1adb0703770679f172eb4b7ec5917c502ba2c9517ff74c01240b036b788"),
        (
            "stripe-checkout-session-completed.json",
            1326853478,
            "e7dde7ce6f0159b4df2df5f0cda45e6839437337bf89347f971b530c8f809a8d",
        ),
    ],
)
def test_stripe_vectors_verify_within_the_tolerance_only(name: str, timestamp: int, v1: str) -> None:
    body = sample(name)
    headers = {"stripe-signature": f"t={timestamp},v1=00ff,v1={v1}"}
    signed_at = datetime.fromtimestamp(timestamp, UTC)

    signatures.verify_stripe(["whsec_test_secret"], headers, body, signed_at + timedelta(seconds=299))
    with pytest.raises(InvalidSignature, match="300 s"):
        signatures.verify_stripe(["whsec_test_secret"], headers, body, signed_at + timedelta(seconds=301))
    with pytest.raises(InvalidSignature):
        signatures.verify_stripe(["whsec_other"], headers, body, signed_at)


@pytest.mark.parametrize(
    "header",
    [
        {},
        {"x-shopify-hmac-sha256": ""},
        {"x-shopify-hmac-sha256": "not base64!"},
        {"x-shopify-hmac-sha256": "A" * 2000},
    ],
)
def test_a_missing_or_malformed_signature_is_refused(header: dict[str, str]) -> None:
    with pytest.raises(InvalidSignature):
        signatures.verify_shopify(["test_secret_key"], header, b"{}", NOW)


# --- Shopify --------------------------------------------------------------------------------------


def shopify_headers(topic: str) -> dict[str, str]:
    return {"x-shopify-topic": topic, "x-shopify-webhook-id": "b54557e4-bdd9-4b37-8a5f-bf7d70bcd043"}


# The sample's rounded ids, and the true ones its GraphQL ids keep (order, line items, customer).
EXACT_IDS = {
    820982911946154500: 820982911946154508,
    866550311766439000: 866550311766439020,
    141249953214522980: 141249953214522974,
    115310627314723950: 115310627314723954,
}


def paid_order(**changes: object) -> bytes:
    """The sample order as a real, paid order: exact 64-bit ids (the sample's were rounded on
    their way; its GraphQL ids keep the true digits), not a test, not cancelled."""
    text = sample("shopify-orders-create.json").decode()
    for rounded, exact in EXACT_IDS.items():
        text = text.replace(f'"id": {rounded}', f'"id": {exact}')
    order = json.loads(text)
    order |= {"test": False, "financial_status": "paid", "cancelled_at": None, "cancel_reason": None}
    order |= {"processed_at": "2026-12-01T10:00:00-05:00"}
    order |= changes
    # Re-encoded by Python, which keeps integers exact; the ids stay as written above.
    return json.dumps(order).encode()


def test_the_sample_test_order_earns_nothing() -> None:
    delivery = sources.read_shopify(
        Options(earn_on="orders/create"), shopify_headers("orders/create"), sample("shopify-orders-create.json"), NOW
    )

    assert (delivery.status, delivery.error_code, delivery.action) == ("ignored", "test_order", None)


def test_an_order_id_rounded_on_its_way_is_refused_rather_than_filed_under_another_number() -> None:
    rounded = json.loads(sample("shopify-orders-create.json")) | {"test": False, "financial_status": "paid"}
    rounded |= {"cancelled_at": None}

    with pytest.raises(sources.Unreadable, match="rounded"):
        sources.read_shopify(Options(), shopify_headers("orders/paid"), json.dumps(rounded).encode(), NOW)


def test_a_paid_order_becomes_a_purchase_with_exact_ids_and_minor_units() -> None:
    delivery = sources.read_shopify(Options(), shopify_headers("orders/paid"), paid_order(), NOW)

    action = delivery.action
    assert isinstance(action, EarnPurchase)
    assert action.purchase_id == "820982911946154508"
    assert delivery.external_id == "115310627314723954"
    assert action.currency == "USD"
    assert action.occurred_at == datetime(2026, 12, 1, 15, tzinfo=UTC)
    assert [(line.sku, line.quantity, line.unit_price) for line in action.lines] == [
        ("IPOD2008PINK", 1, 19900),
        ("IPOD2008PINK", 1, 19900),
    ]
    assert [line.line_id for line in action.lines] == ["866550311766439020", "141249953214522974"]
    assert action.shipping == 1000


def test_voided_and_cancelled_orders_earn_nothing() -> None:
    for changes in ({"financial_status": "voided"}, {"cancelled_at": "2026-12-02T10:00:00Z"}):
        delivery = sources.read_shopify(Options(), shopify_headers("orders/paid"), paid_order(**changes), NOW)
        assert (delivery.status, delivery.action) == ("ignored", None)


def test_a_line_discount_lowers_the_unit_price_earned_on() -> None:
    order = json.loads(paid_order())
    order["line_items"][0] |= {"quantity": 3, "discount_allocations": [{"amount": "10.01"}]}

    action = sources.read_shopify(Options(), shopify_headers("orders/paid"), json.dumps(order).encode(), NOW).action

    assert isinstance(action, EarnPurchase)
    assert action.lines[0].unit_price == (3 * 19900 - 1001) // 3


def test_a_refund_names_the_order_and_its_lines_exactly() -> None:
    body = sample("shopify-refunds-create.json").decode().replace("820982911946154500", "820982911946154508")

    action = sources.read_shopify(Options(), shopify_headers("refunds/create"), body.encode(), NOW).action

    assert isinstance(action, RefundPurchase)
    assert action.purchase_id == "820982911946154508"
    assert action.refund_id == "890088186047892400"
    assert action.lines is not None and {line.quantity for line in action.lines} == {1}


def test_a_cancelled_order_refunds_what_remains() -> None:
    action = sources.read_shopify(Options(), shopify_headers("orders/cancelled"), paid_order(), NOW).action

    assert isinstance(action, RefundPurchase)
    assert (action.purchase_id, action.remaining) == ("820982911946154508", True)


# --- Stripe ---------------------------------------------------------------------------------------


def test_a_paid_checkout_session_is_a_purchase_of_its_amount_for_its_customer() -> None:
    delivery = sources.read_stripe(Options(), {}, sample("stripe-checkout-session-completed.json"), NOW)

    action = delivery.action
    assert isinstance(action, EarnPurchase)
    assert (delivery.key, delivery.external_id, action.purchase_id) == (
        "evt_00000000000000",
        "cus_00000000000000",
        "pi_00000000000000",
    )
    assert (action.currency, sum(line.amount for line in action.lines)) == ("USD", 25000)
    assert action.member_id is None


def test_charge_refunded_refunds_up_to_its_cumulative_amount() -> None:
    delivery = sources.read_stripe(Options(), {}, sample("stripe-charge-refunded.json"), NOW)

    action = delivery.action
    assert isinstance(action, RefundPurchase)
    assert (action.refunded_amount, action.amount, action.lines) == (100, None, None)
    assert action.refund_id == "ch_000000000000000000000000-100"


# --- Discourse ------------------------------------------------------------------------------------


def discourse_headers(name: str) -> dict[str, str]:
    return {k.lower(): v for k, v in json.loads(sample(name)).items()}


def test_a_like_is_a_kudos_from_the_liker_to_the_posts_author() -> None:
    headers = discourse_headers("discourse-post-liked.headers.json")

    delivery = sources.read_discourse(Options(), headers, sample("discourse-post-liked.json"), NOW)

    action = delivery.action
    assert isinstance(action, GiveKudos)
    assert (action.kind, action.author, action.giver, action.post_id, action.thread_id) == (
        "like",
        "5",
        "1605",
        "79590",
        "46632",
    )
    assert action.source == "discussion.fedoraproject.org"
    # A retry of the same like carries a new X-Discourse-Event-Id; the key does not depend on it.
    other = sources.read_discourse(
        Options(), headers | {"x-discourse-event-id": "1"}, sample("discourse-post-liked.json"), NOW
    )
    assert other.key == delivery.key


def test_an_accepted_solution_is_an_accepted_answer_for_the_posts_author() -> None:
    headers = discourse_headers("discourse-accepted-solution.headers.json")

    action = sources.read_discourse(Options(), headers, sample("discourse-accepted-solution.json"), NOW).action

    assert isinstance(action, GiveKudos)
    assert (action.kind, action.author, action.thread_id, action.post_id) == (
        "accepted_answer",
        "8141",
        "31703",
        "127593",
    )


def test_a_ping_is_ignored() -> None:
    delivery = sources.read_discourse(Options(), {"x-discourse-event": "ping"}, sample("discourse-ping.json"), NOW)

    assert (delivery.status, delivery.action) == ("ignored", None)
