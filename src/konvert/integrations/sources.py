"""Reading a verified delivery: what it is about (its duplicate key), and the action it asks for.

Pure functions over the raw body and headers. The bodies are decoded into Structs that name
only the fields konvert uses, so nothing else of a delivery (names, e-mails, addresses, IPs) is
ever held beyond the request. Integers are decoded as integers, exactly: Shopify's ids exceed
2**53 and would lose digits through a float.

A delivery konvert cannot read becomes ``failed`` (answered 200, so the sender stops retrying:
another try would not read better); one it has no use for becomes ``ignored``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from urllib.parse import urlsplit

import msgspec
from babel.numbers import UnknownCurrencyError, get_currency_precision

from konvert.earning.model import PurchaseLine, RefundLineIn
from konvert.integrations.model import Action, Delivery, EarnPurchase, GiveKudos, Options, RefundPurchase

# Senders' ids and sums are bounded like konvert's own (ids of at most 128 characters).
_ID_MAX = 128


class Unreadable(Exception):
    """The delivery's body is not the shape its topic promises."""


def _minor_units(amount: str, currency: str) -> int:
    """A decimal amount as the source writes it ("199.00") in the currency's minor units."""
    try:
        value = Decimal(amount)
        places = get_currency_precision(currency.upper())
    except (InvalidOperation, UnknownCurrencyError):
        raise Unreadable(f"{amount!r} is not an amount in {currency}") from None
    minor = value.scaleb(places)
    if not value.is_finite() or minor != minor.to_integral_value() or minor < 0:
        raise Unreadable(f"{amount!r} is not a whole number of {currency} minor units")
    return int(minor)


def _ignored(key: str, topic: str, code: str, why: str) -> Delivery:
    return Delivery(key=key, topic=topic, status="ignored", error_code=code, error=why)


# --- Shopify ----------------------------------------------------------------------------------


class _DiscountAllocation(msgspec.Struct):
    amount: str


class _ShopifyLine(msgspec.Struct):
    id: int
    quantity: int
    price: str
    admin_graphql_api_id: str | None = None
    sku: str | None = None
    product_type: str | None = None
    variant_id: int | None = None
    product_id: int | None = None
    total_discount: str = "0"
    discount_allocations: list[_DiscountAllocation] = []


class _ShippingLine(msgspec.Struct):
    price: str
    discounted_price: str | None = None


class _Customer(msgspec.Struct):
    id: int
    admin_graphql_api_id: str | None = None


class _ShopifyOrder(msgspec.Struct):
    id: int
    currency: str
    line_items: list[_ShopifyLine]
    admin_graphql_api_id: str | None = None
    test: bool = False
    financial_status: str | None = None
    cancelled_at: str | None = None
    processed_at: datetime | None = None
    created_at: datetime | None = None
    customer: _Customer | None = None
    shipping_lines: list[_ShippingLine] = []
    total_tax: str = "0"
    taxes_included: bool = False


class _RefundLine(msgspec.Struct):
    line_item_id: int
    quantity: int


class _Transaction(msgspec.Struct):
    kind: str
    status: str
    amount: str
    currency: str | None = None


class _ShopifyRefund(msgspec.Struct):
    id: int
    order_id: int
    refund_line_items: list[_RefundLine] = []
    transactions: list[_Transaction] = []


def _exact_id(value: int, gid: str | None, what: str) -> str:
    # A body that went through a JavaScript JSON round trip on its way has its 64-bit ids rounded
    # to the nearest double, while the GraphQL id (a string) keeps every digit: recording the
    # rounded id would file the purchase under another order's number.
    if gid is not None and gid.rsplit("/", 1)[-1] != str(value):
        raise Unreadable(f"the {what} id {value} disagrees with {gid}: it was rounded on its way")
    return str(value)


def _line_sku(line: _ShopifyLine) -> str:
    if line.sku:
        return line.sku[:_ID_MAX]
    return f"variant-{line.variant_id}" if line.variant_id else f"product-{line.product_id or line.id}"


def _shopify_purchase(order: _ShopifyOrder, options: Options, now: datetime) -> EarnPurchase:
    currency = order.currency.upper()
    lines = []
    for item in order.line_items:
        if item.quantity < 1:
            continue
        discounts = item.discount_allocations
        if discounts:
            discount = sum(_minor_units(d.amount, currency) for d in discounts)
        else:
            discount = _minor_units(item.total_discount, currency)
        total = _minor_units(item.price, currency) * item.quantity - discount
        lines.append(
            PurchaseLine(
                line_id=_exact_id(item.id, item.admin_graphql_api_id, "line item"),
                sku=_line_sku(item),
                category=(item.product_type or options.category)[:_ID_MAX],
                quantity=item.quantity,
                # Points are earned on what was paid: the line's discounts spread over its units,
                # rounded down to the minor unit.
                unit_price=max(total, 0) // item.quantity,
            )
        )
    if not lines:
        raise Unreadable("the order has no line items")
    shipping = sum(_minor_units(s.discounted_price or s.price, currency) for s in order.shipping_lines)
    return EarnPurchase(
        purchase_id=_exact_id(order.id, order.admin_graphql_api_id, "order"),
        currency=currency,
        occurred_at=order.processed_at or order.created_at or now,
        lines=tuple(lines),
        shipping=shipping,
        tax=0 if order.taxes_included else _minor_units(order.total_tax, currency),
    )


def read_shopify(options: Options, headers: Mapping[str, str], body: bytes, now: datetime) -> Delivery:
    topic = headers.get("x-shopify-topic", "")
    key = headers.get("x-shopify-webhook-id") or headers.get("x-shopify-event-id") or ""
    if not key or not topic:
        raise Unreadable("a Shopify delivery has X-Shopify-Webhook-Id and X-Shopify-Topic headers")
    if topic == options.earn_on:
        order = msgspec.json.decode(body, type=_ShopifyOrder)
        if order.test:
            return _ignored(key, topic, "test_order", "a test order")
        if order.cancelled_at or order.financial_status in ("voided", "refunded"):
            return _ignored(key, topic, "not_paid", "the order is voided or cancelled")
        if order.customer is None:
            return _ignored(key, topic, "no_customer", "a guest order names no customer")
        action: Action = _shopify_purchase(order, options, now)
        customer = _exact_id(order.customer.id, order.customer.admin_graphql_api_id, "customer")
        return Delivery(key=key, topic=topic, action=action, external_id=customer)
    if topic == "refunds/create":
        refund = msgspec.json.decode(body, type=_ShopifyRefund)
        refund_id, purchase_id = str(refund.id), str(refund.order_id)
        lines = tuple(RefundLineIn(str(r.line_item_id), r.quantity) for r in refund.refund_line_items if r.quantity)
        if lines:
            action = RefundPurchase(purchase_id=purchase_id, refund_id=refund_id, lines=lines)
        else:
            # A refund of no items (shipping, goodwill): its successful refund transactions.
            paid_back = [t for t in refund.transactions if t.kind == "refund" and t.status == "success"]
            amount = sum(_minor_units(t.amount, t.currency or "") for t in paid_back)
            if not amount:
                return _ignored(key, topic, "nothing_refunded", "no amount")
            action = RefundPurchase(purchase_id=purchase_id, refund_id=refund_id, amount=amount)
        return Delivery(key=key, topic=topic, action=action)
    if topic == "orders/cancelled":
        order = msgspec.json.decode(body, type=_ShopifyOrder)
        purchase_id = _exact_id(order.id, order.admin_graphql_api_id, "order")
        action = RefundPurchase(purchase_id=purchase_id, refund_id=f"cancelled-{purchase_id}", remaining=True)
        return Delivery(key=key, topic=topic, action=action)
    return _ignored(key, topic, "topic_not_used", f"{topic} earns nothing")


# --- Stripe -----------------------------------------------------------------------------------


class _StripePrice(msgspec.Struct):
    id: str
    product: str | None = None


class _StripeLineItem(msgspec.Struct):
    id: str
    quantity: int
    amount_total: int
    price: _StripePrice | None = None


class _StripeLineItems(msgspec.Struct):
    data: list[_StripeLineItem]


class _StripeTotals(msgspec.Struct):
    amount_shipping: int = 0
    amount_tax: int = 0


class _CheckoutSession(msgspec.Struct):
    id: str
    mode: str
    currency: str
    payment_status: str
    amount_total: int | None = None
    payment_intent: str | None = None
    client_reference_id: str | None = None
    customer: str | None = None
    metadata: dict[str, str] = {}
    line_items: _StripeLineItems | None = None
    total_details: _StripeTotals | None = None


class _Charge(msgspec.Struct):
    id: str
    amount_refunded: int
    payment_intent: str | None = None


class _SessionData(msgspec.Struct):
    object: _CheckoutSession


class _ChargeData(msgspec.Struct):
    object: _Charge


class _StripeEvent(msgspec.Struct):
    id: str
    type: str
    created: int


class _SessionEvent(msgspec.Struct):
    data: _SessionData


class _ChargeEvent(msgspec.Struct):
    data: _ChargeData


def _stripe_lines(session: _CheckoutSession, options: Options) -> tuple[tuple[PurchaseLine, ...], int, int]:
    totals = session.total_details or _StripeTotals()
    if session.line_items and session.line_items.data:
        lines = tuple(
            PurchaseLine(
                line_id=item.id,
                sku=(item.price.product or item.price.id) if item.price else item.id,
                category=options.category,
                quantity=item.quantity,
                unit_price=item.amount_total // item.quantity,
            )
            for item in session.line_items.data
            if item.quantity > 0
        )
        return lines, totals.amount_shipping, totals.amount_tax
    if session.amount_total is None:
        raise Unreadable("the checkout session has neither line items nor amount_total")
    # One line of the amount paid; shipping and tax stay apart, as the program decides whether they earn.
    goods = session.amount_total - totals.amount_shipping - totals.amount_tax
    line = PurchaseLine(line_id="checkout", sku="checkout", category=options.category, quantity=1, unit_price=goods)
    return (line,), totals.amount_shipping, totals.amount_tax


def read_stripe(options: Options, headers: Mapping[str, str], body: bytes, now: datetime) -> Delivery:
    event = msgspec.json.decode(body, type=_StripeEvent)
    key, topic = event.id, event.type
    if topic == "checkout.session.completed":
        session = msgspec.json.decode(body, type=_SessionEvent).data.object
        if session.mode != "payment" or session.payment_status != "paid":
            return _ignored(key, topic, "not_paid", "not a paid payment")
        lines, shipping, tax = _stripe_lines(session, options)
        member_id = session.client_reference_id or session.metadata.get("member_id")
        action: Action = EarnPurchase(
            purchase_id=session.payment_intent or session.id,
            currency=session.currency.upper(),
            occurred_at=datetime.fromtimestamp(event.created, UTC),
            lines=lines,
            shipping=shipping,
            tax=tax,
            member_id=member_id,
        )
        if member_id is None and session.customer is None:
            return _ignored(key, topic, "no_customer", "the session names no customer")
        return Delivery(key=key, topic=topic, action=action, external_id=None if member_id else session.customer)
    if topic == "charge.refunded":
        charge = msgspec.json.decode(body, type=_ChargeEvent).data.object
        purchase_id = charge.payment_intent or charge.id
        # amount_refunded is cumulative and events come in any order: refunding up to it, with the
        # total in the refund's id, applies each total once and an older total not at all.
        action = RefundPurchase(
            purchase_id=purchase_id,
            refund_id=f"{charge.id}-{charge.amount_refunded}",
            refunded_amount=charge.amount_refunded,
        )
        return Delivery(key=key, topic=topic, action=action)
    return _ignored(key, topic, "topic_not_used", f"{topic} earns nothing")


# --- Discourse --------------------------------------------------------------------------------


class _Post(msgspec.Struct):
    id: int
    topic_id: int
    user_id: int


class _User(msgspec.Struct):
    id: int


class _Like(msgspec.Struct):
    post: _Post
    user: _User


class _LikeBody(msgspec.Struct):
    like: _Like


class _SolvedBody(msgspec.Struct):
    solved: _Post


def discourse_host(headers: Mapping[str, str]) -> str:
    """The forum's host name, from X-Discourse-Instance (its base URL)."""
    instance = headers.get("x-discourse-instance", "")
    return (urlsplit(instance).hostname or instance or "discourse")[:64]


# Discourse does not say who accepted an answer: the forum itself stands as the accepter.
FORUM_GIVER = "forum"


def read_discourse(options: Options, headers: Mapping[str, str], body: bytes, now: datetime) -> Delivery:
    event = headers.get("x-discourse-event", "")
    host = discourse_host(headers)
    if event == "ping" or headers.get("x-discourse-event-type") == "ping":
        key = f"ping:{headers.get('x-discourse-event-id', '')}"
        return Delivery(key=key, topic="ping", status="ignored", error_code="ping", error="a ping")
    if event == "post_liked":
        like = msgspec.json.decode(body, type=_LikeBody).like
        post, giver = like.post, str(like.user.id)
        # Discourse retries carry new event ids: the like itself is the key.
        kudos_id = f"discourse:{host}:like:{post.id}:{giver}"
        action = GiveKudos(
            kudos_id=kudos_id,
            source=host,
            post_id=str(post.id),
            thread_id=str(post.topic_id),
            author=str(post.user_id),
            giver=giver,
            kind="like",
            occurred_at=now,
        )
        return Delivery(key=f"{event}:{post.id}:{giver}", topic=event, action=action)
    if event == "accepted_solution":
        post = msgspec.json.decode(body, type=_SolvedBody).solved
        # Accepting another answer of the topic supersedes this one: the key is the topic and post.
        action = GiveKudos(
            kudos_id=f"discourse:{host}:solved:{post.topic_id}:{post.id}",
            source=host,
            post_id=str(post.id),
            thread_id=str(post.topic_id),
            author=str(post.user_id),
            giver=FORUM_GIVER,
            kind="accepted_answer",
            occurred_at=now,
        )
        return Delivery(key=f"{event}:{post.topic_id}:{post.id}", topic=event, action=action)
    key = f"{event or 'unknown'}:{headers.get('x-discourse-event-id', '')}"
    return Delivery(key=key, topic=event or "unknown", status="ignored", error_code="topic_not_used", error="no kudos")


Reader = Callable[[Options, Mapping[str, str], bytes, datetime], Delivery]

READ: dict[str, Reader] = {"shopify": read_shopify, "stripe": read_stripe, "discourse": read_discourse}
