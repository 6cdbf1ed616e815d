"""The webhooks scenario: signed Shopify ``orders/paid`` deliveries, shaped like Shopify's sample
order (tests/fixtures/webhooks/shopify-orders-create.json), built and signed per request by
loadtests/wrk/shopify.lua.

The harness connects one Shopify integration per side through the admin API and links one
Shopify customer per seeded member, as ``PUT /v1/members/{id}/identities/...`` would (in SQL,
like the rest of the seed: 100,000 links take a second). Every id in a delivery is a Shopify id
beyond 2**53, so the service reads them exactly or the checks find the purchases missing:

* customer of member ``m<u>``: ``10**16 + u``;
* order: ``9<5 digits of the run's tag><thread, 3 digits><counter, 9 digits>``, 18 digits, below
  2**63; recorded as the purchase id, so the checks tell one run's orders from every other's;
* line item ``k`` of an order: ``8<the order's 17 digits after the 9><k>``, 19 digits.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from harness.service import http_json

SAMPLE_ORDER = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "webhooks" / "shopify-orders-create.json"
INTEGRATION_NAME = "loadtests-shopify"
TOPIC = "orders/paid"
CUSTOMER_ID_BASE = 10**16
LINES = 3
# Line items as a shop sells them: a book, a gadget, groceries.
_TITLES = ("Paperback novel", "USB-C charger", "Organic coffee beans 1 kg")


def customer_id(member: int) -> int:
    return CUSTOMER_ID_BASE + member


def order_prefix(tag: str) -> str:
    """The first six digits of every order id a wrk run with this tag sends."""
    return f"9{int(tag[1:], 16) % 100_000:05d}"


def parse_order_id(value: str, prefix: str) -> tuple[int, int] | None:
    """An order id of the run with this prefix -> (thread, counter); None for any other id."""
    if len(value) != 18 or not value.startswith(prefix) or not value.isdigit():
        return None
    return int(value[6:9]), int(value[9:])


# A placeholder for a number: json.dumps quotes it, order_template takes the quotes off again.
_NUMBER = re.compile(r'"\$#(\w+)"')


def _number(name: str) -> str:
    return f"$#{name}"


def order_template(currency: str) -> str:
    """The sample order as a template with ``$name`` placeholders (shopify.lua fills them in):
    paid, not a test, ``LINES`` line items, this currency, no tax."""
    order: dict[str, Any] = json.loads(SAMPLE_ORDER.read_text())
    item = order["line_items"][0]
    lines = []
    for k in range(1, LINES + 1):
        money = {"amount": f"$price{k}", "currency_code": currency}
        lines.append(
            item
            | {
                "id": _number(f"line{k}_id"),
                "admin_graphql_api_id": f"gid://shopify/LineItem/$line{k}_id",
                "name": _TITLES[k - 1],
                "title": _TITLES[k - 1],
                "sku": f"$sku{k}",
                "quantity": _number(f"quantity{k}"),
                "fulfillable_quantity": _number(f"quantity{k}"),
                "price": f"$price{k}",
                "price_set": {"shop_money": money, "presentment_money": money},
            }
        )
    customer = order["customer"]
    customer |= {
        "id": _number("customer_id"),
        "admin_graphql_api_id": "gid://shopify/Customer/$customer_id",
        "currency": currency,
        "default_address": customer["default_address"] | {"customer_id": _number("customer_id")},
    }
    order |= {
        "id": _number("order_id"),
        "admin_graphql_api_id": "gid://shopify/Order/$order_id",
        "name": "#$order_id",
        "test": False,
        "financial_status": "paid",
        "cancelled_at": None,
        "cancel_reason": None,
        "created_at": "$processed_at",
        "processed_at": "$processed_at",
        "currency": currency,
        "presentment_currency": currency,
        "customer": customer,
        "line_items": lines,
        "total_tax": "0.00",
    }
    return _NUMBER.sub(r"$\1", json.dumps(order, separators=(",", ":")))


@dataclass(frozen=True)
class Shop:
    """A side's connected Shopify integration: where its deliveries go and the secret they are
    signed with."""

    path: str
    secret: str


def connect_shop(base_url: str, api_key: str, partner: str) -> Shop | None:
    """Connect the Shopify integration through the admin API (again: the secret is replaced);
    None where the install has no integrations (an older baseline commit)."""
    secret = f"shpss_{secrets.token_hex(16)}"
    status, body = http_json(
        "PUT",
        f"{base_url}/v1/integrations/{INTEGRATION_NAME}",
        api_key,
        {"kind": "shopify", "secrets": [secret], "partner": partner, "options": {"earn_on": TOPIC}},
    )
    if status in (404, 405):  # no such route
        return None
    if status not in (200, 201) or not isinstance(body, dict):
        raise RuntimeError(f"connecting the Shopify integration failed: {status} {body}")
    return Shop(path=body["webhook_path"], secret=secret)


def wrk_env(shop: Shop, tag: str, currency: str) -> dict[str, str]:
    """What shopify.lua needs for one wrk run."""
    return {
        "KONVERT_BENCH_ORDER_TEMPLATE": order_template(currency),
        "KONVERT_BENCH_ORDER_PREFIX": order_prefix(tag),
        "KONVERT_BENCH_WEBHOOK_PATH": shop.path,
        "KONVERT_BENCH_WEBHOOK_SECRET": shop.secret,
    }


async def link_customers(database_url: str, members: int) -> int:
    """One identity link per member ``m1 .. m<members>`` (those not linked yet); how many were made."""
    conn = await asyncpg.connect(database_url)
    try:
        status = await conn.execute(
            """
            insert into identity_links (integration_id, external_id, member_uid)
            select i.integration_id, ($3::bigint + m.member_uid)::text, m.member_uid
            from integrations i, members m
            where i.name = $1 and m.member_uid <= $2 and m.member_id = 'm' || m.member_uid
            on conflict do nothing
            """,
            INTEGRATION_NAME,
            members,
            CUSTOMER_ID_BASE,
        )
    finally:
        await conn.close()
    return int(status.split()[-1])
