"""Webhooks in, end to end through the API: signed real deliveries apply once and only once."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from konvert.vault import Vault
from tests.conftest import AppClient, make_settings
from tests.integration.test_foundation import konvert_env, run_konvert

SAMPLES = Path(__file__).parents[1] / "fixtures" / "webhooks"
SECRET = "shpss_integration_test_secret"


def sample(name: str) -> Any:
    return json.loads((SAMPLES / name).read_text())


def shopify_signed(body: bytes, topic: str, webhook_id: str, secret: str = SECRET) -> dict[str, str]:
    digest = base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()
    return {"X-Shopify-Hmac-Sha256": digest, "X-Shopify-Topic": topic, "X-Shopify-Webhook-Id": webhook_id}


def stripe_signed(body: bytes, secret: str = SECRET, at: int | None = None) -> dict[str, str]:
    at = int(time.time()) if at is None else at
    v1 = hmac.new(secret.encode(), f"{at}.".encode() + body, hashlib.sha256).hexdigest()
    return {"Stripe-Signature": f"t={at},v1={v1}"}


def discourse_signed(body: bytes, event: str, secret: str = SECRET) -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {
        "X-Discourse-Event": event,
        "X-Discourse-Event-Type": "like" if event == "post_liked" else "solved",
        "X-Discourse-Event-Id": str(time.time_ns()),
        "X-Discourse-Instance": "https://forum.example.org",
        "X-Discourse-Event-Signature": f"sha256={digest}",
    }


def order(order_id: int, customer_id: int, *, prices: tuple[str, ...] = ("10.00",), **changes: Any) -> dict[str, Any]:
    """A paid Shopify order, shaped like the sample, of one unit per price."""
    body = sample("shopify-orders-create.json")
    item = body["line_items"][0]
    lines = [
        item | {"id": order_id * 10 + n, "admin_graphql_api_id": None, "price": price, "sku": f"SKU-{n}"}
        for n, price in enumerate(prices)
    ]
    body |= {
        "id": order_id,
        "admin_graphql_api_id": f"gid://shopify/Order/{order_id}",
        "test": False,
        "financial_status": "paid",
        "cancelled_at": None,
        "processed_at": "2026-11-01T10:00:00Z",
        "currency": "EUR",
        "customer": {"id": customer_id, "email": "someone@example.com"},
        "line_items": lines,
        "shipping_lines": [],
        "total_tax": "0.00",
    }
    return body | changes


@pytest.fixture
def unique() -> Callable[[], int]:
    """Shopify-sized ids (beyond 2**53) that no other test uses."""
    return lambda: 2**60 + time.time_ns() % 2**59


@pytest.fixture
async def connect(client: AppClient, admin_headers: dict[str, str], new_id: Callable[[str], str]):
    """Connect an integration under a new name; its webhook path."""

    async def connect(kind: str, **body: Any) -> tuple[str, str]:
        name = new_id(kind)
        wanted = {"kind": kind, "secrets": [SECRET]} | ({"partner": "webshop"} if kind != "discourse" else {}) | body
        response = await client.put(f"/v1/integrations/{name}", json=wanted, headers=admin_headers)
        assert response.status_code == 201, response.text
        return name, response.json()["webhook_path"]

    return connect


async def deliver(client: AppClient, path: str, body: dict[str, Any] | bytes, headers: dict[str, str]) -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    signed = headers(raw) if callable(headers) else headers
    response = await client.post(path, content=raw, headers=signed | {"Content-Type": "application/json"})
    return response


async def points(client: AppClient, admin_headers: dict[str, str], member_id: str) -> int:
    response = await client.get(f"/v1/members/{member_id}/balance", headers=admin_headers)
    if response.status_code == 404:
        return 0
    body = response.json()
    return body["available"] + body["pending"]


async def link(client: AppClient, admin_headers: dict[str, str], member_id: str, name: str, external_id: object):
    response = await client.put(f"/v1/members/{member_id}/identities/{name}/{external_id}", headers=admin_headers)
    assert response.status_code in (200, 201), response.text
    return response.json()


# --- integrations ---------------------------------------------------------------------------------


async def test_an_integration_never_shows_its_secrets(client, admin_headers, connect) -> None:
    name, path = await connect("shopify")

    shown = (await client.get(f"/v1/integrations/{name}", headers=admin_headers)).json()
    listed = (await client.get("/v1/integrations", headers=admin_headers)).text

    assert shown["webhook_path"] == path == f"/v1/integrations/{name}/webhooks"
    assert (shown["secrets_count"], shown["partner"]) == (1, "webshop")
    assert SECRET not in json.dumps(shown) and SECRET not in listed


async def test_secrets_are_stored_encrypted_when_a_key_is_set(database_url, redis_url, program) -> None:
    from cryptography.fernet import Fernet

    from konvert import composition
    from konvert.integrations import admin
    from konvert.integrations.model import IntegrationIn

    settings = make_settings(database_url, redis_url, secret_key=Fernet.generate_key().decode())
    services = await composition.open_services(settings, program)
    try:
        wanted = IntegrationIn(kind="discourse", secrets=("a-forum-secret-1",))
        out, _ = await admin.put_integration(services, f"sealed-{time.time_ns()}", wanted)
        stored = await services.pool.fetchval("select secrets from integrations where name = $1", out.name)
    finally:
        await services.close()

    assert out.secrets_encrypted and stored[0].startswith("fernet:")
    assert "a-forum-secret-1" not in stored[0]
    assert Vault(services).open(stored) == ["a-forum-secret-1"]


async def test_a_shop_integration_must_name_a_partner_of_the_program(client, admin_headers, new_id) -> None:
    for body in ({"kind": "shopify", "secrets": [SECRET]}, {"kind": "shopify", "secrets": [SECRET], "partner": "nope"}):
        response = await client.put(f"/v1/integrations/{new_id('s')}", json=body, headers=admin_headers)
        assert response.status_code == 422, response.text


# --- Shopify --------------------------------------------------------------------------------------


async def test_a_paid_order_earns_once_however_often_it_is_delivered(
    client, admin_headers, connect, new_id, unique
) -> None:
    name, path = await connect("shopify")
    member, customer, order_id = new_id("m"), unique(), unique()
    await link(client, admin_headers, member, name, customer)
    body = order(order_id, customer, prices=("19.99", "5.00"))
    headers = lambda raw: shopify_signed(raw, "orders/paid", f"wh-{order_id}")  # noqa: E731

    first = await deliver(client, path, body, headers)
    again = await deliver(client, path, body, headers)
    # Shopify re-sends the same order under a new webhook id: the purchase is recorded once.
    other = await deliver(client, path, body, lambda raw: shopify_signed(raw, "orders/paid", f"wh2-{order_id}"))

    assert first.status_code == again.status_code == other.status_code == 200
    assert first.json()["status"] == "applied" and first.json()["results"]["purchase_id"] == str(order_id)
    assert again.json()["duplicate"] is True and again.json()["delivery_id"] == first.json()["delivery_id"]
    assert other.json()["status"] == "applied" and other.json()["duplicate"] is False
    assert await points(client, admin_headers, member) == 24  # 19.99 + 5.00 EUR at 1 point per euro, floored


async def test_concurrent_copies_of_a_delivery_apply_once(client, admin_headers, connect, new_id, unique) -> None:
    name, path = await connect("shopify")
    member, customer, order_id = new_id("m"), unique(), unique()
    await link(client, admin_headers, member, name, customer)
    raw = json.dumps(order(order_id, customer, prices=("30.00",))).encode()
    headers = shopify_signed(raw, "orders/paid", f"wh-{order_id}")

    answers = await asyncio.gather(*(deliver(client, path, raw, headers) for _ in range(8)))

    assert {a.status_code for a in answers} == {200}
    assert sorted(a.json()["duplicate"] for a in answers) == [False] + [True] * 7
    assert await points(client, admin_headers, member) == 30


async def test_a_bad_signature_is_refused_and_nothing_is_recorded(client, admin_headers, connect, unique) -> None:
    name, path = await connect("shopify")
    raw = json.dumps(order(unique(), unique())).encode()
    refused_before = await invalid_signatures(client)

    wrong = await deliver(client, path, raw, shopify_signed(raw, "orders/paid", "wh-bad", secret="not-the-secret"))
    missing = await deliver(client, path, raw, {"X-Shopify-Topic": "orders/paid", "X-Shopify-Webhook-Id": "wh-x"})
    deliveries = (await client.get(f"/v1/integrations/{name}/deliveries", headers=admin_headers)).json()

    assert (wrong.status_code, wrong.json()["code"]) == (401, "invalid_signature")
    assert wrong.headers["content-type"].startswith("application/problem+json")
    assert (missing.status_code, missing.json()["code"]) == (401, "invalid_signature")
    assert deliveries["items"] == []
    assert await invalid_signatures(client) == refused_before + 2


async def invalid_signatures(client: AppClient) -> float:
    """The invalid_signature count of Shopify deliveries in /metrics."""
    metrics = (await client.get("/metrics")).text
    wanted = 'konvert_webhook_deliveries_total{kind="shopify",outcome="invalid_signature"}'
    return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(wanted))


async def test_an_unknown_integration_is_404(client) -> None:
    response = await client.post("/v1/integrations/no-such-thing/webhooks", content=b"{}")

    assert (response.status_code, response.json()["code"]) == (404, "integration_not_found")


async def test_test_and_voided_orders_earn_nothing(client, admin_headers, connect, new_id, unique) -> None:
    name, path = await connect("shopify")
    member, customer = new_id("m"), unique()
    await link(client, admin_headers, member, name, customer)

    for n, changes in enumerate(({"test": True}, {"financial_status": "voided"})):
        body = order(unique(), customer, **changes)
        answer = await deliver(
            client, path, body, lambda raw, n=n: shopify_signed(raw, "orders/paid", f"v{n}-{raw[:20]!r}")
        )
        assert answer.json()["status"] == "ignored"

    assert await points(client, admin_headers, member) == 0


async def test_an_unlinked_customer_is_parked_until_linked(client, admin_headers, connect, new_id, unique) -> None:
    name, path = await connect("shopify")
    customer, member = unique(), new_id("m")
    for n in range(2):
        body = order(unique(), customer, prices=("12.00",))
        parked = await deliver(
            client, path, body, lambda raw, n=n: shopify_signed(raw, "orders/paid", f"p{n}-{customer}")
        )
        assert parked.json()["status"] == "parked"
        # Only what the program needs is kept: no e-mail of the customer.
        assert "someone@example.com" not in parked.text

    linked = await link(client, admin_headers, member, name, customer)
    parked_left = (await client.get(f"/v1/integrations/{name}/deliveries?status=parked", headers=admin_headers)).json()

    assert linked["applied_deliveries"] == 2
    assert parked_left["items"] == []
    assert await points(client, admin_headers, member) == 24


async def test_refunds_and_cancellations_claw_back_once(client, admin_headers, connect, new_id, unique) -> None:
    name, path = await connect("shopify")
    member, customer, order_id = new_id("m"), unique(), unique()
    await link(client, admin_headers, member, name, customer)
    paid = order(order_id, customer, prices=("40.00", "60.00"))
    await deliver(client, path, paid, lambda raw: shopify_signed(raw, "orders/paid", f"o-{order_id}"))
    refund = sample("shopify-refunds-create.json") | {"id": unique(), "order_id": order_id}
    refund["refund_line_items"] = [{"line_item_id": order_id * 10, "quantity": 1}]

    refunded = await deliver(client, path, refund, lambda raw: shopify_signed(raw, "refunds/create", f"r-{order_id}"))
    replayed = await deliver(client, path, refund, lambda raw: shopify_signed(raw, "refunds/create", f"r-{order_id}"))
    after_refund = await points(client, admin_headers, member)
    cancelled = await deliver(client, path, paid, lambda raw: shopify_signed(raw, "orders/cancelled", f"c-{order_id}"))

    assert refunded.json()["status"] == "applied" and replayed.json()["duplicate"] is True
    assert after_refund == 60
    assert cancelled.json()["status"] == "applied"
    assert await points(client, admin_headers, member) == 0


async def test_a_refund_of_an_unknown_order_fails_and_retry_applies_it_later(
    client, admin_headers, connect, new_id, unique
) -> None:
    name, path = await connect("shopify")
    member, customer, order_id = new_id("m"), unique(), unique()
    await link(client, admin_headers, member, name, customer)
    refund = sample("shopify-refunds-create.json") | {"id": unique(), "order_id": order_id}
    refund["refund_line_items"] = [{"line_item_id": order_id * 10, "quantity": 1}]

    failed = await deliver(client, path, refund, lambda raw: shopify_signed(raw, "refunds/create", f"r-{order_id}"))
    paid = order(order_id, customer, prices=("25.00",))
    await deliver(client, path, paid, lambda raw: shopify_signed(raw, "orders/paid", f"o-{order_id}"))
    retried = await client.post(f"/v1/integrations/{name}/deliveries/retry", headers=admin_headers)
    again = await client.post(f"/v1/integrations/{name}/deliveries/retry", headers=admin_headers)

    assert (failed.json()["status"], failed.json()["error_code"]) == ("failed", "purchase_not_found")
    assert retried.json() == {"tried": 1, "applied": 1, "still_failed": 0, "still_parked": 0}
    assert again.json()["tried"] == 0
    assert await points(client, admin_headers, member) == 0


async def test_an_unreadable_delivery_fails_once_with_its_reason(client, admin_headers, connect) -> None:
    _name, path = await connect("shopify")
    raw = b'{"id": "not an order"}'

    answer = await deliver(client, path, raw, shopify_signed(raw, "orders/paid", "wh-unreadable"))

    assert (answer.status_code, answer.json()["status"], answer.json()["error_code"]) == (200, "failed", "unreadable")


# --- Stripe ---------------------------------------------------------------------------------------


def checkout(event_id: str, intent: str, member: str, amount: int) -> dict[str, Any]:
    body = sample("stripe-checkout-session-completed.json")
    body["id"] = event_id
    body["data"]["object"] |= {
        "payment_intent": intent,
        "client_reference_id": member,
        "amount_total": amount,
        "currency": "eur",
    }
    return body


def charge_refunded(event_id: str, intent: str, refunded: int) -> dict[str, Any]:
    body = sample("stripe-charge-refunded.json")
    body["id"] = event_id
    body["data"]["object"] |= {"payment_intent": intent, "amount_refunded": refunded, "amount": 10000}
    return body


async def test_stripe_refunds_apply_their_cumulative_amount_in_any_order(
    client, admin_headers, connect, new_id
) -> None:
    _name, path = await connect("stripe")
    member, intent = new_id("m"), new_id("pi")
    paid = await deliver(client, path, checkout(new_id("evt"), intent, member, 10000), stripe_signed)

    later = await deliver(client, path, charge_refunded(new_id("evt"), intent, 8000), stripe_signed)
    earlier = await deliver(client, path, charge_refunded(new_id("evt"), intent, 5000), stripe_signed)

    assert paid.json()["status"] == "applied"
    assert later.json()["status"] == "applied"
    assert (earlier.json()["status"], earlier.json()["error_code"]) == ("ignored", "already_refunded")
    assert await points(client, admin_headers, member) == 20


async def test_a_stale_stripe_signature_is_refused(client, admin_headers, connect, new_id) -> None:
    name, path = await connect("stripe")
    body = json.dumps(checkout(new_id("evt"), new_id("pi"), new_id("m"), 1000)).encode()

    stale = await deliver(client, path, body, stripe_signed(body, at=int(time.time()) - 301))

    assert (stale.status_code, stale.json()["code"]) == (401, "invalid_signature")
    assert (await client.get(f"/v1/integrations/{name}/deliveries", headers=admin_headers)).json()["items"] == []


# --- Discourse ------------------------------------------------------------------------------------


def liked(post_id: int, author: int, liker: int) -> dict[str, Any]:
    body = sample("discourse-post-liked.json")
    body["like"]["post"] |= {"id": post_id, "user_id": author, "topic_id": post_id + 1}
    body["like"]["user"]["id"] = liker
    return body


async def reputation(client: AppClient, admin_headers: dict[str, str], member_id: str) -> int:
    response = await client.get(f"/v1/members/{member_id}/reputation", headers=admin_headers)
    return response.json()["reputation"] if response.status_code == 200 else 0


async def test_a_like_gives_kudos_once_to_the_author(client, admin_headers, connect, unique) -> None:
    _name, path = await connect("discourse")
    post, author, liker = unique(), unique() % 10**9, unique() % 10**9
    body = liked(post, author, liker)

    first = await deliver(client, path, body, lambda raw: discourse_signed(raw, "post_liked"))
    # Discourse's retry of the same like carries a new event id: still one kudos.
    retry = await deliver(client, path, body, lambda raw: discourse_signed(raw, "post_liked"))

    author_id = f"discourse:forum.example.org:{author}"
    assert first.json()["status"] == "applied" and retry.json()["duplicate"] is True
    assert await reputation(client, admin_headers, author_id) > 0
    kudos = first.json()["results"]["kudos_id"]
    assert kudos == f"discourse:forum.example.org:like:{post}:{liker}"


async def test_a_self_like_is_ignored(client, admin_headers, connect, unique) -> None:
    _name, path = await connect("discourse")
    user = unique() % 10**9

    answer = await deliver(client, path, liked(unique(), user, user), lambda raw: discourse_signed(raw, "post_liked"))

    assert (answer.json()["status"], answer.json()["error_code"]) == ("ignored", "self_kudos")


async def test_a_linked_forum_user_earns_as_their_member(client, admin_headers, connect, new_id, unique) -> None:
    name, path = await connect("discourse")
    member, author = new_id("m"), unique() % 10**9
    await link(client, admin_headers, member, name, author)

    await deliver(
        client, path, liked(unique(), author, unique() % 10**9), lambda raw: discourse_signed(raw, "post_liked")
    )
    solved = sample("discourse-accepted-solution.json")
    solved["solved"] |= {"user_id": author, "id": unique(), "topic_id": unique()}
    accepted = await deliver(client, path, solved, lambda raw: discourse_signed(raw, "accepted_solution"))

    assert accepted.json()["status"] == "applied"
    assert await reputation(client, admin_headers, member) > 0


async def test_a_ping_answers_200(client, connect) -> None:
    _name, path = await connect("discourse")
    raw = b'{"ping":"OK"}'
    headers = discourse_signed(raw, "ping") | {"X-Discourse-Event-Type": "ping"}

    answer = await deliver(client, path, raw, headers)

    assert (answer.status_code, answer.json()["status"]) == (200, "ignored")


# --- identity links and partner-bound keys ----------------------------------------------------------


async def test_an_external_id_belongs_to_one_member(client, admin_headers, connect, new_id, unique) -> None:
    name, _ = await connect("shopify")
    customer, first, second = unique(), new_id("m"), new_id("m")
    await link(client, admin_headers, first, name, customer)

    taken = await client.put(f"/v1/members/{second}/identities/{name}/{customer}", headers=admin_headers)
    listed = (await client.get(f"/v1/members/{first}/identities", headers=admin_headers)).json()
    removed = await client.delete(f"/v1/members/{first}/identities/{name}/{customer}", headers=admin_headers)

    assert taken.status_code == 409
    assert [(i["integration"], i["external_id"]) for i in listed["items"]] == [(name, str(customer))]
    assert removed.status_code == 204


async def test_export_and_erasure_include_links_and_deliveries(client, admin_headers, connect, new_id, unique) -> None:
    name, path = await connect("shopify")
    member, customer, order_id = new_id("m"), unique(), unique()
    await link(client, admin_headers, member, name, customer)
    await deliver(
        client, path, order(order_id, customer), lambda raw: shopify_signed(raw, "orders/paid", f"e-{order_id}")
    )

    exported = (await client.get(f"/v1/members/{member}/export", headers=admin_headers)).json()
    erased = await client.delete(f"/v1/members/{member}", headers=admin_headers)
    database = client.app.state.services.pool
    links_left = await database.fetchval(
        "select count(*) from identity_links l join integrations i using (integration_id) where i.name = $1", name
    )

    assert [link["external_id"] for link in exported["other"]["identity_links"]] == [str(customer)]
    assert [d["results"]["purchase_id"] for d in exported["other"]["deliveries"]] == [str(order_id)]
    assert erased.status_code == 204 and links_left == 0


async def test_a_partner_bound_key_writes_purchases_only_for_its_partners(client, make_key, new_id) -> None:
    from tests.conftest import purchase_body

    conn = await asyncpg.connect(client.app.state.services.settings.database_url)
    try:
        from konvert import auth

        key, _ = await auth.insert_key(conn, "berlin till", ["purchases:write"], ["store-berlin"])
    finally:
        await conn.close()
    headers = {"Authorization": f"Bearer {key}"}
    member, purchase = new_id("m"), new_id("p")

    other = await client.post("/v1/purchases", json=purchase_body(member), headers=headers)
    own = await client.post(
        "/v1/purchases", json=purchase_body(member, purchase, partner="store-berlin"), headers=headers
    )
    refund = await client.post(
        f"/v1/purchases/{purchase}/refunds", json={"refund_id": "r1", "amount": 100}, headers=headers
    )

    assert (other.status_code, other.json()["code"]) == (403, "partner_forbidden")
    assert own.status_code == 201
    # Bound to one partner, the key need not name it.
    assert refund.status_code == 201, refund.text


async def test_a_refund_that_came_before_its_parked_order_applies_with_the_link(
    client, admin_headers, connect, new_id, unique
) -> None:
    name, path = await connect("shopify")
    member, customer, order_id = new_id("m"), unique(), unique()
    paid = order(order_id, customer, prices=("40.00", "60.00"))
    refund = sample("shopify-refunds-create.json") | {"id": unique(), "order_id": order_id}
    refund["refund_line_items"] = [{"line_item_id": order_id * 10 + 1, "quantity": 1}]

    parked = await deliver(client, path, paid, lambda raw: shopify_signed(raw, "orders/paid", f"o-{order_id}"))
    failed = await deliver(client, path, refund, lambda raw: shopify_signed(raw, "refunds/create", f"r-{order_id}"))
    linked = await link(client, admin_headers, member, name, customer)
    refund_now = (await client.get(f"/v1/integrations/{name}/deliveries", headers=admin_headers)).json()["items"][0]

    assert (parked.json()["status"], failed.json()["error_code"]) == ("parked", "purchase_not_found")
    assert linked["applied_deliveries"] == 1
    assert (refund_now["topic"], refund_now["status"], refund_now["attempts"]) == ("refunds/create", "applied", 2)
    assert await points(client, admin_headers, member) == 40


async def test_a_delivery_that_cannot_apply_leaves_no_trace_but_its_entry(
    client, admin_headers, connect, new_id, unique
) -> None:
    name, path = await connect("shopify")
    member, customer, order_id = new_id("m"), unique(), unique()
    await link(client, admin_headers, member, name, customer)
    pounds = order(unique(), customer, currency="GBP")
    paid = order(order_id, customer, prices=("30.00",))
    await deliver(client, path, paid, lambda raw: shopify_signed(raw, "orders/paid", f"o-{order_id}"))
    too_much = sample("shopify-refunds-create.json") | {"id": unique(), "order_id": order_id}
    too_much["refund_line_items"] = [{"line_item_id": order_id * 10, "quantity": 2}]
    pool = client.app.state.services.pool
    purchases_before = await pool.fetchval(
        "select count(*) from purchases p join members m using (member_uid) where m.member_id = $1", member
    )

    unpriced = await deliver(client, path, pounds, lambda raw: shopify_signed(raw, "orders/paid", f"gbp-{order_id}"))
    refused = await deliver(client, path, too_much, lambda raw: shopify_signed(raw, "refunds/create", f"r-{order_id}"))
    purchases_after = await pool.fetchval(
        "select count(*) from purchases p join members m using (member_uid) where m.member_id = $1", member
    )

    assert (unpriced.json()["status"], unpriced.json()["error_code"]) == ("failed", "unsupported_currency")
    assert (refused.json()["status"], refused.json()["error_code"]) == ("failed", "refund_exceeds_purchase")
    assert purchases_before == purchases_after == 1
    assert await points(client, admin_headers, member) == 30


async def test_parked_deliveries_are_dropped_after_the_configured_days(
    client, admin_headers, connect, services, clock, unique
) -> None:
    from konvert.integrations.service import drop_expired_parked

    name, path = await connect("shopify")
    customer = unique()
    await deliver(
        client, path, order(unique(), customer), lambda raw: shopify_signed(raw, "orders/paid", f"d-{customer}")
    )

    clock.advance(days=services.settings.parked_delivery_days - 1)
    kept = await drop_expired_parked(services)
    clock.advance(days=2)
    dropped = await drop_expired_parked(services)
    left = (await client.get(f"/v1/integrations/{name}/deliveries?status=parked", headers=admin_headers)).json()

    assert (kept, left["items"]) == (0, [])
    assert dropped >= 1


async def test_accepting_another_answer_of_the_topic_moves_the_reputation(
    client, admin_headers, connect, unique
) -> None:
    _name, path = await connect("discourse")
    topic, first_author, second_author = unique(), unique() % 10**9, unique() % 10**9

    async def accept(post: int, author: int) -> None:
        solved = sample("discourse-accepted-solution.json")
        solved["solved"] |= {"id": post, "user_id": author, "topic_id": topic}
        answer = await deliver(client, path, solved, lambda raw: discourse_signed(raw, "accepted_solution"))
        assert answer.json()["status"] == "applied", answer.text

    await accept(unique(), first_author)
    first_before = await reputation(client, admin_headers, f"discourse:forum.example.org:{first_author}")
    await accept(unique(), second_author)

    assert first_before > 0
    assert await reputation(client, admin_headers, f"discourse:forum.example.org:{first_author}") == 0
    assert await reputation(client, admin_headers, f"discourse:forum.example.org:{second_author}") == first_before


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/v1/integrations/Not%20A%20Name"),
        ("PUT", "/v1/integrations/" + "a" * 65),
        ("POST", "/v1/integrations/shop%0A/webhooks"),
        ("PUT", "/v1/members/m1/identities/shop/" + "1" * 129),
        ("PUT", "/v1/members/m1/identities/shop/12%0A"),
        ("DELETE", "/v1/members/m%0A1/identities/shop/12"),
    ],
)
async def test_bad_path_parameters_are_refused_with_422(client, admin_headers, method, path) -> None:
    body = (
        {"kind": "discourse", "secrets": [SECRET]} if path.startswith("/v1/integrations/") and method == "PUT" else None
    )

    response = await client.request(method, path, json=body, headers=admin_headers)

    assert (response.status_code, response.json()["code"]) == (422, "validation_failed"), response.text


@pytest.fixture
def cli_env(database_url: str, redis_url: str) -> dict[str, str]:
    return konvert_env(KONVERT_DATABASE_URL=database_url, KONVERT_REDIS_URL=redis_url)


def test_the_cli_connects_and_lists_sources(cli_env, new_id) -> None:
    name = new_id("cli")
    added = run_konvert(
        "integrations",
        "add",
        "--kind",
        "shopify",
        "--name",
        name,
        "--partner",
        "webshop",
        "--secret",
        SECRET,
        env=cli_env,
    )
    listed = run_konvert("integrations", "list", env=cli_env)
    refused = run_konvert(
        "integrations", "add", "--kind", "shopify", "--name", new_id("cli"), "--secret", SECRET, env=cli_env
    )
    key = run_konvert("integrations", "generate-key", env=cli_env)

    assert added.returncode == 0, added.stderr
    assert f"/v1/integrations/{name}/webhooks" in added.stderr and SECRET not in added.stderr + added.stdout
    assert f"{name}\tshopify\twebshop\t1 secret(s), NOT encrypted" in listed.stdout
    assert refused.returncode == 2 and "partner" in refused.stderr
    assert len(key.stdout.strip()) == 44


async def test_the_cli_shows_and_retries_parked_deliveries(cli_env, client, connect, unique) -> None:
    name, path = await connect("shopify")
    customer = unique()
    await deliver(
        client, path, order(unique(), customer), lambda raw: shopify_signed(raw, "orders/paid", f"cli-{customer}")
    )

    shown = await asyncio.to_thread(run_konvert, "integrations", "deliveries", name, "--status", "parked", env=cli_env)
    retried = await asyncio.to_thread(run_konvert, "integrations", "retry", name, env=cli_env)

    assert "\torders/paid\tparked\t" in shown.stdout, shown.stderr
    assert (retried.returncode, json.loads(retried.stdout)) == (
        0,
        {"tried": 1, "applied": 0, "still_failed": 0, "still_parked": 1},
    )


async def test_deleting_an_integration_takes_its_links_and_deliveries(
    client, admin_headers, connect, new_id, unique
) -> None:
    name, path = await connect("shopify")
    member, customer = new_id("m"), unique()
    await link(client, admin_headers, member, name, customer)
    await deliver(
        client, path, order(unique(), customer), lambda raw: shopify_signed(raw, "orders/paid", f"x-{customer}")
    )
    pool = client.app.state.services.pool
    integration_id = await pool.fetchval("select integration_id from integrations where name = $1", name)

    deleted = await client.delete(f"/v1/integrations/{name}", headers=admin_headers)
    again = await client.delete(f"/v1/integrations/{name}", headers=admin_headers)
    webhook = await deliver(client, path, b"{}", {})
    left = await pool.fetchval(
        "select (select count(*) from deliveries where integration_id = $1)"
        " + (select count(*) from identity_links where integration_id = $1)",
        integration_id,
    )

    assert (deleted.status_code, again.status_code, webhook.status_code) == (204, 404, 404)
    assert left == 0
    assert await points(client, admin_headers, member) == 10  # what it applied stays
