"""Webhooks in: verify, read, record in the inbox and apply, in one transaction.

A delivery's way through konvert:

1. **Verify** the signature over the raw body with the integration's secrets (any of them);
   a bad or missing one is 401 and nothing is recorded but a counter.
2. **Read** what it asks for (konvert.integrations.sources); a body that cannot be read is
   recorded ``failed`` (200: another try would read no better).
3. **Duplicates** (the same delivery key again) answer with what was recorded, changing nothing.
4. **Apply** through the features' own use cases (a purchase is group-committed like
   ``POST /v1/purchases``), with the inbox row written by a step of the same transaction: a
   delivery is recorded ``applied`` exactly when its change committed. The writes' own
   idempotency keys are derived from the delivery (order id, refund id, the like itself), so
   even a race of two copies applies once; the copy that loses the race on the inbox's unique
   key rolls back and answers as a duplicate.
5. A refusal by the program's rules (a self-like, the giver's daily limit, an order recorded
   before with other contents) is recorded ``ignored``; one an operator can fix (an unknown
   partner or currency, a refund of an unknown order) ``failed``, re-applied by ``retry``. A
   shop's customer not linked to a member is ``parked`` until the link is made.
6. Anything transient (the database down) propagates: 503, and the sender retries.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, NamedTuple

import asyncpg
import msgspec

from konvert import errors
from konvert.batching import BatchedLookups
from konvert.earning import refunds
from konvert.earning import service as earning
from konvert.idempotency import Outcome
from konvert.integrations import sources, store
from konvert.integrations.model import (
    Action,
    Delivery,
    DeliveryOut,
    EarnPurchase,
    GiveKudos,
    Options,
    RefundPurchase,
)
from konvert.integrations.signatures import VERIFY
from konvert.ledger.book import Book, writing
from konvert.observability import WEBHOOK_DELIVERIES
from konvert.reputation import service as reputation
from konvert.vault import Vault

if TYPE_CHECKING:
    from konvert.services import Services

_encode = msgspec.json.encode
_decode_action = msgspec.json.Decoder(Action).decode
_decode_options = msgspec.json.Decoder(Options).decode
_RESULT_FIELDS = ("purchase_id", "refund_id", "kudos_id", "member_id", "points", "author_id")
# Refusals an operator can fix (the program, a link, the order arriving): retried later.
_FIXABLE = frozenset(
    {"unknown_partner", "unsupported_currency", "purchase_not_found", "validation_failed", "refund_exceeds_purchase"}
)
_REGISTRY_ENTRIES_MAX = 1_000
RETRY_BATCH = 100


class Integration(NamedTuple):
    integration_id: int
    name: str
    kind: str
    partner: str | None
    options: Options
    # Opened (decrypted) signing secrets.
    secrets: list[str]


class Registry:
    """This process's integrations, remembered for ``auth_cache_seconds`` like API keys: a change
    made through another process takes effect here within that time."""

    def __init__(self, services: Services) -> None:
        self._services = services
        self._entries: dict[str, tuple[float, Integration | None]] = {}

    async def get(self, name: str) -> Integration:
        now = time.monotonic()
        entry = self._entries.get(name)
        if entry is None or entry[0] <= now:
            row = await store.select_integration(self._services.pool, name)
            found = None if row is None else _integration(self._services, row)
            if len(self._entries) >= _REGISTRY_ENTRIES_MAX:
                self._entries.clear()
            entry = self._entries[name] = (now + self._services.settings.auth_cache_seconds, found)
        if entry[1] is None:
            raise errors.IntegrationNotFound(f"no integration {name!r}")
        return entry[1]

    def forget(self, name: str) -> None:
        self._entries.pop(name, None)


# The delivery recorded under an arrival's key (None: new), and the member its customer is linked to.
_Arrived = tuple[asyncpg.Record | None, str | None]


class Arrivals:
    """Arriving deliveries' duplicate checks and customer links, batched: concurrent deliveries
    share one query (as balance reads do), so a burst of webhooks costs a statement per turn of
    the event loop rather than one each."""

    def __init__(self, services: Services) -> None:
        pool = services.pool

        async def many(arrivals: list[store.Arrival]) -> dict[store.Arrival, _Arrived]:
            return await store.select_arrivals(pool, arrivals)

        self.lookups: BatchedLookups[store.Arrival, _Arrived] = BatchedLookups(
            many,
            batch_size_max=services.settings.read_batch_size_max,
            batches_in_flight_max=services.settings.read_batches_in_flight_max,
        )

    async def get(self, arrival: store.Arrival) -> _Arrived | None:
        return await self.lookups.get(arrival)

    async def aclose(self) -> None:
        await self.lookups.aclose()


def _integration(services: Services, row: asyncpg.Record) -> Integration:
    return Integration(
        integration_id=row["integration_id"],
        name=row["name"],
        kind=row["kind"],
        partner=row["partner"],
        options=_decode_options(row["options"]),
        secrets=services.shared(Vault).open(row["secrets"]),
    )


# --- receiving --------------------------------------------------------------------------------


async def receive(services: Services, name: str, headers: Mapping[str, str], body: bytes) -> DeliveryOut:
    """Verify, record and apply one webhook delivery; its inbox entry as it stands after."""
    integration = await services.shared(Registry).get(name)
    now = services.clock()
    try:
        VERIFY[integration.kind](integration.secrets, headers, body, now)
    except errors.InvalidSignature:
        WEBHOOK_DELIVERIES.labels(integration.kind, "invalid_signature").inc()
        raise
    delivery = _read(integration, headers, body, now)
    out = await _receive(services, integration, delivery, now)
    WEBHOOK_DELIVERIES.labels(integration.kind, "duplicate" if out.duplicate else out.status).inc()
    return out


def _read(integration: Integration, headers: Mapping[str, str], body: bytes, now: datetime) -> Delivery:
    try:
        delivery = sources.READ[integration.kind](integration.options, headers, body, now)
        if delivery.action is not None:
            # Structs built in code skip their Meta bounds: a round trip through JSON checks them.
            delivery = msgspec.structs.replace(delivery, action=_decode_action(_encode(delivery.action)))
        return delivery
    except (msgspec.DecodeError, msgspec.ValidationError, sources.Unreadable, ValueError) as exc:
        return Delivery(
            key=_fallback_key(integration.kind, headers, body),
            topic=(headers.get("x-shopify-topic") or headers.get("x-discourse-event") or "unknown")[:100],
            status="failed",
            error_code="unreadable",
            error=str(exc)[:500],
        )


def _fallback_key(kind: str, headers: Mapping[str, str], body: bytes) -> str:
    """A key for a delivery that could not be read: the sender's delivery id, else the body's digest."""
    sent = headers.get("x-shopify-webhook-id") if kind == "shopify" else None
    return (sent or "sha256:" + hashlib.sha256(body).hexdigest())[:300]


async def _receive(services: Services, integration: Integration, delivery: Delivery, now: datetime) -> DeliveryOut:
    action = delivery.action
    # A shop's purchase names its customer: the link is read with the duplicate check, in one
    # round trip, since nearly every delivery is new and needs both.
    customer = _customer_to_link(action, delivery.external_id)
    arrival = await services.shared(Arrivals).get((integration.integration_id, delivery.key, customer))
    assert arrival is not None  # every arrival looked up has an answer
    existing, linked = arrival
    if existing is not None:
        return delivery_out(existing, duplicate=True)
    if action is None:
        assert delivery.status is not None
        return await _record_alone(
            services, integration, _Target(delivery), delivery.status, delivery.error_code, delivery.error, now
        )
    member_id = linked if customer is not None else _member_named(action)
    if isinstance(action, EarnPurchase) and member_id is None:
        why = f"customer {delivery.external_id} is not linked to a member yet"
        return await _record_alone(services, integration, _Target(delivery), "parked", "not_linked", why, now)
    return await _apply(services, integration, _Target(delivery=delivery), member_id, now)


class _Target(NamedTuple):
    """What an apply records its result in: a new delivery, or one in the inbox (a retry)."""

    delivery: Delivery
    delivery_pk: int | None = None


class _Duplicate(Exception):
    """The delivery was recorded meanwhile by a concurrent copy of it."""


def _customer_to_link(action: Action | None, external_id: str | None) -> str | None:
    """The shop customer whose link names a purchase's member; None where the delivery names the
    member itself (Stripe's client_reference_id) or is no purchase."""
    if not isinstance(action, EarnPurchase) or action.member_id is not None:
        return None
    return external_id


def _member_named(action: Action | None) -> str | None:
    return action.member_id if isinstance(action, EarnPurchase) else None


async def _member_for(
    services: Services, integration: Integration, action: Action, external_id: str | None
) -> str | None:
    """The member a purchase is for (None: not linked yet). Kudos resolve their own members."""
    if (customer := _customer_to_link(action, external_id)) is None:
        return _member_named(action)
    async with services.pool.acquire() as conn:
        linked = await store.select_linked_members(conn, integration.integration_id, [customer])
    return linked.get(customer)


async def _apply(
    services: Services, integration: Integration, target: _Target, member_id: str | None, now: datetime
) -> DeliveryOut:
    """Apply the delivery's action through its feature, recording it in the same transaction."""
    recorded: list[DeliveryOut] = []

    async def record(book: Book, outcome: Outcome | errors.KonvertError) -> None:
        if isinstance(outcome, errors.KonvertError):
            status, code, why, results = _refused(outcome), outcome.code, outcome.detail, b"{}"
        else:
            status, code, why, results = "applied", None, None, _results(outcome.body)
        book.gathered(_Inbox).add(_Entry(integration, target, status, code, why, results, now, recorded))

    action = target.delivery.action
    try:
        if isinstance(action, EarnPurchase):
            assert member_id is not None and integration.partner is not None
            await earning.post_purchase(services, action.purchase(integration.partner, member_id), also=record)
        elif isinstance(action, RefundPurchase):
            assert integration.partner is not None
            await refunds.refund_purchase(services, action.purchase_id, action.refund(integration.partner), also=record)
        elif isinstance(action, GiveKudos):
            author, giver = await _forum_members(services, integration, action)
            await reputation.give_kudos(services, action.kudos(author, giver), also=record)
    except _Duplicate:
        return await _recorded_before(services, integration, target.delivery)
    except errors.KonvertError as refused:
        if refused.status >= 500:
            raise
        if recorded:  # a purchase's refusal, recorded in its batch's transaction
            return recorded[-1]
        return await _record_alone(services, integration, target, _refused(refused), refused.code, refused.detail, now)
    return recorded[-1]


def _refused(refusal: errors.KonvertError) -> str:
    return "failed" if refusal.code in _FIXABLE else "ignored"


def _results(body: bytes) -> bytes:
    response = msgspec.json.decode(body)
    return _encode({name: response[name] for name in _RESULT_FIELDS if response.get(name) is not None})


class _Entry(NamedTuple):
    """A delivery's state to record, and where its inbox entry goes once recorded."""

    integration: Integration
    target: _Target
    status: str
    code: str | None
    why: str | None
    results: bytes
    now: datetime
    out: list[DeliveryOut]


class _Inbox:
    """A transaction's inbox entries, written just before it commits: a purchase batch's new
    deliveries in one statement. _Duplicate (rolling everything back) if a concurrent copy of a
    delivery was recorded first."""

    def __init__(self) -> None:
        self._entries: list[_Entry] = []

    def add(self, entry: _Entry) -> None:
        self._entries.append(entry)

    async def flush(self, book: Book) -> None:
        entries, self._entries = self._entries, []
        new = [entry for entry in entries if entry.target.delivery_pk is None]
        if new:
            rows = await store.insert_deliveries(book.conn, [_new_delivery(entry) for entry in new])
            if len(rows) != len(new):
                raise _Duplicate
            by_key = {(row["integration_id"], row["delivery_key"]): row for row in rows}
            for entry in new:
                entry.out.append(delivery_out(by_key[entry.integration.integration_id, entry.target.delivery.key]))
        for entry in entries:
            if (delivery_pk := entry.target.delivery_pk) is not None:
                row = await store.update_delivery(
                    book.conn,
                    delivery_pk,
                    entry.status,
                    entry.now,
                    member_id=_member_of(entry.results),
                    results=entry.results,
                    error_code=entry.code,
                    error=entry.why,
                )
                if row is None:
                    raise _Duplicate
                entry.out.append(delivery_out(row))


def _new_delivery(entry: _Entry) -> store.NewDelivery:
    delivery = entry.target.delivery
    return store.NewDelivery(
        integration_id=entry.integration.integration_id,
        key=delivery.key,
        topic=delivery.topic,
        received_at=entry.now,
        status=entry.status,
        external_id=delivery.external_id if entry.status == "parked" else None,
        member_id=_member_of(entry.results),
        action=None if delivery.action is None else _encode(delivery.action),
        results=entry.results,
        error_code=entry.code,
        error=entry.why,
    )


def _member_of(results: bytes) -> str | None:
    decoded = msgspec.json.decode(results)
    member: str | None = decoded.get("member_id") or decoded.get("author_id")
    return member


async def _record_alone(
    services: Services,
    integration: Integration,
    target: _Target,
    status: str,
    code: str | None,
    why: str | None,
    now: datetime,
) -> DeliveryOut:
    """Record a delivery that applies nothing (ignored, parked, failed) in a transaction of its own."""
    out: list[DeliveryOut] = []
    try:
        async with writing(services) as book:
            book.gathered(_Inbox).add(_Entry(integration, target, status, code, why, b"{}", now, out))
    except _Duplicate:
        return await _recorded_before(services, integration, target.delivery)
    return out[-1]


async def _recorded_before(services: Services, integration: Integration, delivery: Delivery) -> DeliveryOut:
    existing = await store.select_delivery(services.pool, integration.integration_id, delivery.key)
    assert existing is not None
    return delivery_out(existing, duplicate=True)


async def _forum_members(services: Services, integration: Integration, action: GiveKudos) -> tuple[str, str]:
    """The members a forum's users are: linked ones, else a member of their own per forum user."""
    async with services.pool.acquire() as conn:
        linked = await store.select_linked_members(conn, integration.integration_id, [action.author, action.giver])
    return (
        linked.get(action.author) or forum_member_id(action.source, action.author),
        linked.get(action.giver) or forum_member_id(action.source, action.giver),
    )


def forum_member_id(host: str, user_id: str) -> str:
    """The member id of a forum user with no link: ``discourse:<host>:<user id>``."""
    return f"discourse:{host}:{user_id}"


def delivery_out(row: asyncpg.Record, *, duplicate: bool = False) -> DeliveryOut:
    return DeliveryOut(
        delivery_id=row["delivery_pk"],
        key=row["delivery_key"],
        topic=row["topic"],
        status=row["status"],
        received_at=row["received_at"],
        updated_at=row["updated_at"],
        attempts=row["attempts"],
        external_id=row["external_id"],
        action=None if row["action"] is None else _decode_action(row["action"]),
        results=msgspec.json.decode(row["results"]),
        error_code=row["error_code"],
        error=row["error"],
        duplicate=duplicate,
    )


# --- retrying and parking ---------------------------------------------------------------------


async def retry(
    services: Services, integration: Integration, statuses: tuple[str, ...], external_id: str | None = None
) -> list[DeliveryOut]:
    """Apply failed or parked deliveries again (oldest first), each as a new delivery would be."""
    done: list[DeliveryOut] = []
    after = 0
    while True:
        async with services.pool.acquire() as conn:
            pks = await store.select_to_retry(
                conn, integration.integration_id, statuses, external_id, after, RETRY_BATCH
            )
        for pk in pks:
            done.append(await _retry_one(services, integration, pk))
        if len(pks) < RETRY_BATCH:
            return done
        after = pks[-1]


async def apply_parked(services: Services, integration: Integration, external_id: str) -> list[DeliveryOut]:
    """Apply what was parked for a newly linked customer, then the refunds of those purchases
    that failed because they came first."""
    applied = await retry(services, integration, ("parked",), external_id)
    purchases = [str(d.results["purchase_id"]) for d in applied if d.status == "applied" and "purchase_id" in d.results]
    if purchases:
        async with services.pool.acquire() as conn:
            waiting = await store.select_failed_refunds_of(conn, integration.integration_id, purchases)
        for pk in waiting:
            await _retry_one(services, integration, pk)
    return applied


async def _retry_one(services: Services, integration: Integration, delivery_pk: int) -> DeliveryOut:
    async with services.pool.acquire() as conn:
        row = await store.select_delivery_by_pk(conn, delivery_pk)
    assert row is not None and row["action"] is not None
    action = _decode_action(row["action"])
    delivery = Delivery(key=row["delivery_key"], topic=row["topic"], action=action, external_id=row["external_id"])
    now = services.clock()
    member_id = await _member_for(services, integration, action, row["external_id"])
    if isinstance(action, EarnPurchase) and member_id is None:
        return delivery_out(row)
    return await _apply(services, integration, _Target(delivery, delivery_pk), member_id, now)


async def drop_expired_parked(services: Services) -> int:
    """A job: parked deliveries older than KONVERT_PARKED_DELIVERY_DAYS are dropped, in batches."""
    older_than = services.clock() - timedelta(days=services.settings.parked_delivery_days)
    async with services.pool.acquire() as conn:
        return await store.delete_expired_parked(conn, older_than, services.settings.jobs_batch_size)
