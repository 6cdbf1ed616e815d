"""Wire Structs of the integrations API, and the actions konvert reads out of a delivery.

An action holds only what the program needs (ids, amounts, lines, the sender's customer or user
id): it is what the inbox keeps of a delivery, and what a parked or failed delivery is applied
from later. Nothing else of a delivery's body is stored.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from konvert.earning.model import (
    AwareDatetime,
    Category,
    CurrencyCode,
    MinorAmount,
    PartnerId,
    PurchaseId,
    PurchaseIn,
    PurchaseLine,
    RefundId,
    RefundIn,
    RefundLineIn,
)
from konvert.ledger.model import NO_CONTROL_CHARACTERS, UNPRINTABLE, MemberId
from konvert.reputation.model import ExternalId as PostId
from konvert.reputation.model import KudosId, KudosIn, Source

# "(?!\n)": a "$" alone would let a trailing newline through.
INTEGRATION_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$(?!\n)"
EXTERNAL_ID_PATTERN = rf"^[^{UNPRINTABLE}/]+$(?!\n)"
IntegrationName = Annotated[
    str,
    Meta(
        pattern=INTEGRATION_NAME_PATTERN,
        description="Lower-case letters, digits, `-` and `_`; at most 64 characters.",
    ),
]
Kind = Literal["shopify", "stripe", "discourse"]
Secret = Annotated[str, Meta(min_length=8, max_length=256, pattern=NO_CONTROL_CHARACTERS)]
# A customer or user id at the source (Shopify customer id, Stripe cus_ id, Discourse user id).
ExternalId = Annotated[
    str, Meta(min_length=1, max_length=128, pattern=EXTERNAL_ID_PATTERN, description="The id at the source.")
]
DeliveryStatus = Literal["applied", "ignored", "parked", "failed"]
SHOP_KINDS = ("shopify", "stripe")


class Options(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """What an integration does beyond its kind's defaults."""

    # Shopify: the order topic that earns points (orders/paid, or orders/create for shops that
    # count an order when it is placed).
    earn_on: Literal["orders/paid", "orders/create"] = "orders/paid"
    # Shops: the category of lines whose source names none (purchase rules match on it).
    category: Category = "general"


class IntegrationIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A source to connect, or its new settings. ``secrets`` replaces the stored list: send old and
    new together while the source switches over, then the new one alone."""

    kind: Kind
    secrets: Annotated[tuple[Secret, ...], Meta(min_length=1, max_length=4)]
    # The partner a shop's purchases are recorded for; shops only.
    partner: PartnerId | None = None
    options: Options = Options()

    def __post_init__(self) -> None:
        if self.kind in SHOP_KINDS and self.partner is None:
            raise ValueError(f"a {self.kind} integration needs the partner its purchases are recorded for")
        if self.kind not in SHOP_KINDS and self.partner is not None:
            raise ValueError(f"a {self.kind} integration records no purchases: it takes no partner")


class IntegrationOut(msgspec.Struct, frozen=True, kw_only=True):
    """A connected source. Its secrets are never shown: only how many there are."""

    name: str
    kind: Kind
    partner: str | None
    options: Options
    secrets_count: int
    # Whether the secrets are stored encrypted (KONVERT_SECRET_KEY is set).
    secrets_encrypted: bool
    # Where the source sends its webhooks, relative to konvert's base URL.
    webhook_path: str
    created_at: datetime
    updated_at: datetime


class IntegrationList(msgspec.Struct, frozen=True):
    items: list[IntegrationOut]


# --- actions ----------------------------------------------------------------------------------


class EarnPurchase(msgspec.Struct, frozen=True, tag="purchase", kw_only=True):
    """A paid order: a purchase for the integration's partner, once the member is known."""

    purchase_id: PurchaseId
    currency: CurrencyCode
    occurred_at: AwareDatetime
    lines: tuple[PurchaseLine, ...]
    shipping: MinorAmount = 0
    tax: MinorAmount = 0
    # The member, when the source names konvert's id itself (Stripe's client_reference_id).
    member_id: MemberId | None = None

    def purchase(self, partner: str, member_id: str) -> PurchaseIn:
        return PurchaseIn(
            purchase_id=self.purchase_id,
            member_id=member_id,
            partner=partner,
            currency=self.currency,
            occurred_at=self.occurred_at,
            lines=self.lines,
            shipping=self.shipping,
            tax=self.tax,
        )


class RefundPurchase(msgspec.Struct, frozen=True, tag="refund", kw_only=True):
    """A refund of lines, up to a cumulative refunded amount, or of what remains of an order."""

    purchase_id: PurchaseId
    refund_id: RefundId
    lines: tuple[RefundLineIn, ...] | None = None
    amount: int | None = None
    refunded_amount: int | None = None
    remaining: bool | None = None

    def refund(self, partner: str) -> RefundIn:
        return RefundIn(
            refund_id=self.refund_id,
            partner=partner,
            lines=self.lines,
            amount=self.amount,
            refunded_amount=self.refunded_amount,
            remaining=self.remaining,
        )


class GiveKudos(msgspec.Struct, frozen=True, tag="kudos", kw_only=True):
    """A like or an accepted answer; author and giver are users at the source."""

    kudos_id: KudosId
    source: Source
    post_id: PostId
    thread_id: PostId
    author: ExternalId
    giver: ExternalId
    kind: Literal["like", "accepted_answer"]
    occurred_at: AwareDatetime

    def kudos(self, author_id: str, giver_id: str) -> KudosIn:
        return KudosIn(
            kudos_id=self.kudos_id,
            source=self.source,
            post_id=self.post_id,
            thread_id=self.thread_id,
            author_id=author_id,
            giver_id=giver_id,
            kind=self.kind,
            occurred_at=self.occurred_at,
        )


Action = EarnPurchase | RefundPurchase | GiveKudos


class Delivery(msgspec.Struct, frozen=True, kw_only=True):
    """What konvert read out of a verified delivery: its duplicate key and topic, and either the
    action to apply (with the customer it is for, if the source names one) or why it is ignored
    or cannot be applied."""

    key: str
    topic: str
    action: Action | None = None
    external_id: str | None = None
    # For a delivery that applies nothing: ignored (a test order, a ping) or failed (unreadable).
    status: Literal["ignored", "failed"] | None = None
    error_code: str | None = None
    error: str | None = None


class DeliveryOut(msgspec.Struct, frozen=True, kw_only=True):
    """A delivery in the inbox, as the API shows it (and as a webhook's response)."""

    delivery_id: int
    key: str
    topic: str
    status: DeliveryStatus
    received_at: datetime
    updated_at: datetime
    attempts: int
    external_id: str | None
    action: Action | None
    # What it made in konvert: purchase_id, refund_id, kudos_id, member_id.
    results: dict[str, str | int]
    error_code: str | None
    error: str | None
    # True when the delivery was received before (a duplicate): nothing changed.
    duplicate: bool = False


class DeliveryPage(msgspec.Struct, frozen=True):
    items: list[DeliveryOut]
    # Pass as ?before= for the next (older) page; null on the last one.
    next_before: int | None


class RetryResult(msgspec.Struct, frozen=True):
    """What a retry of failed or parked deliveries did."""

    tried: int
    applied: int
    still_failed: int
    still_parked: int


class IdentityOut(msgspec.Struct, frozen=True, kw_only=True):
    integration: str
    external_id: str
    member_id: str
    linked_at: datetime
    # Parked deliveries of this external id that the link applied.
    applied_deliveries: int = 0


class IdentityList(msgspec.Struct, frozen=True):
    items: list[IdentityOut]
