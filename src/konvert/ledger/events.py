"""The events konvert announces, and the outbox they are written to.

Every change a member should hear of is announced in the transaction that makes it: the use case
hands an event to its book (``Book.announce``), and the book writes every event of the
transaction to the outbox in one statement just before the commit. Nothing is announced that did
not commit, and nothing that committed goes unannounced. konvert.events publishes the outbox.

An event's ``data`` holds amounts, balances after the change and ids of what caused it, never
personal data: the member appears only as the envelope's ``member_id``, which the publisher reads
from the member's row when it sends the event, so an erased member's undelivered events carry the
pseudonym.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Literal, NamedTuple

import msgspec

from konvert.db import Connection

_encode = msgspec.json.Encoder(decimal_format="number").encode


class Balance(msgspec.Struct, frozen=True, kw_only=True):
    """The member's points after the change."""

    available: int
    pending: int
    held: int


class PurchaseRecorded(msgspec.Struct, frozen=True, kw_only=True):
    partner: str
    purchase_id: str
    currency: str
    occurred_at: datetime
    points: int


class PointsEarned(msgspec.Struct, frozen=True, kw_only=True):
    points: int
    state: Literal["pending", "available"]
    cause_type: str
    cause_ref: str
    lot_id: int
    transfer_id: int
    vests_at: datetime
    expires_at: datetime | None
    balance: Balance


class PointsVested(msgspec.Struct, frozen=True, kw_only=True):
    points: int
    lot_ids: list[int]
    balance: Balance


class PointsRefunded(msgspec.Struct, frozen=True, kw_only=True):
    partner: str
    purchase_id: str
    refund_id: str
    points: int
    shortfall: int
    debt: int
    balance: Balance


class RedemptionChanged(msgspec.Struct, frozen=True, kw_only=True):
    """points.redeemed and every redemption.* event."""

    redemption_id: str
    reward_id: str | None
    points: int
    status: str
    transfer_id: int
    balance: Balance


class PointsExpired(msgspec.Struct, frozen=True, kw_only=True):
    points: int
    lot_ids: list[int]
    balance: Balance


class PointsExpiringSoon(msgspec.Struct, frozen=True, kw_only=True):
    lot_id: int
    points: int
    expires_at: datetime


class PointsAdjusted(msgspec.Struct, frozen=True, kw_only=True):
    adjustment_id: str
    points: int
    reason_code: str
    transfer_id: int
    balance: Balance


class TierChanged(msgspec.Struct, frozen=True, kw_only=True):
    from_tier: str | None = msgspec.field(name="from")
    to_tier: str | None = msgspec.field(name="to")
    qualifying_points: int


class KudosReceived(msgspec.Struct, frozen=True, kw_only=True):
    kudos_id: str
    kind: str
    source: str
    post_id: str
    counted: bool
    reputation_delta: int
    reputation: int


class KudosRetracted(msgspec.Struct, frozen=True, kw_only=True):
    kudos_id: str
    kind: str
    source: str
    post_id: str
    reputation_delta: int
    reputation: int


class RankChanged(msgspec.Struct, frozen=True, kw_only=True):
    from_rank: str | None = msgspec.field(name="from")
    to_rank: str | None = msgspec.field(name="to")
    reputation: int
    kudos_id: str


class PreferenceShared(msgspec.Struct, frozen=True, kw_only=True):
    """Which preference, never its value."""

    key: str
    first_shared: bool
    points: int


class PreferenceWithdrawn(msgspec.Struct, frozen=True, kw_only=True):
    key: str
    points_clawed_back: int
    shortfall: int


class ConsentChanged(msgspec.Struct, frozen=True, kw_only=True):
    purpose: str
    granted: bool


class MemberErased(msgspec.Struct, frozen=True, kw_only=True):
    """The member_id of this and of every undelivered event of the member is the pseudonym."""


class EndpointDisabled(msgspec.Struct, frozen=True, kw_only=True):
    """A webhook endpoint that failed for days was disabled (no member_id)."""

    endpoint_id: str
    failing_since: datetime
    last_error: str | None


# Every event type, with the Struct of its data (for the documentation and the OpenAPI webhooks).
CATALOGUE: dict[str, type[msgspec.Struct]] = {
    "purchase.recorded": PurchaseRecorded,
    "points.earned": PointsEarned,
    "points.vested": PointsVested,
    "points.refunded": PointsRefunded,
    "points.redeemed": RedemptionChanged,
    "redemption.held": RedemptionChanged,
    "redemption.captured": RedemptionChanged,
    "redemption.released": RedemptionChanged,
    "redemption.expired": RedemptionChanged,
    "redemption.cancelled": RedemptionChanged,
    "points.expired": PointsExpired,
    "points.expiring_soon": PointsExpiringSoon,
    "points.adjusted": PointsAdjusted,
    "tier.changed": TierChanged,
    "kudos.received": KudosReceived,
    "kudos.retracted": KudosRetracted,
    "reputation.rank_changed": RankChanged,
    "preference.shared": PreferenceShared,
    "preference.withdrawn": PreferenceWithdrawn,
    "consent.changed": ConsentChanged,
    "member.erased": MemberErased,
    "webhook_endpoint.disabled": EndpointDisabled,
}
EVENT_TYPES = tuple(CATALOGUE)


class Announcement(NamedTuple):
    """An event to write: about a member (``member_uid``), or about konvert itself (None)."""

    member_uid: int | None
    type: str
    data: msgspec.Struct
    occurred_at: datetime


async def insert_events(conn: Connection, announcements: Sequence[Announcement]) -> None:
    """Write events to the outbox in one statement, each member's numbered on from their last
    (under the member's lock, which every writer of a member's events holds)."""
    if not announcements:
        return
    for a in announcements:
        assert type(a.data) is CATALOGUE[a.type], f"{a.type} carries {type(a.data).__name__}"
    await conn.execute(
        _INSERT_EVENTS,
        [a.member_uid for a in announcements],
        [a.type for a in announcements],
        [_encode(a.data).decode() for a in announcements],
        [a.occurred_at for a in announcements],
    )


# Sequences are per member and never reused (event_sequences outlives pruned events); events
# about konvert itself are member_uid 0's, which is no member, and have none.
_INSERT_EVENTS = """
with input as (
    select coalesce(i.member_uid, 0) as member_uid, i.type, i.data, i.occurred_at, i.ord
    from unnest($1::bigint[], $2::text[], $3::text[], $4::timestamptz[])
         with ordinality as i (member_uid, type, data, occurred_at, ord)
), counted as (
    select member_uid, count(*) as n from input where member_uid <> 0 group by member_uid
), numbered as (
    insert into event_sequences as s (member_uid, last_sequence)
    select member_uid, n from counted order by member_uid
    on conflict (member_uid) do update set last_sequence = s.last_sequence + excluded.last_sequence
    returning member_uid, last_sequence
)
insert into outbox_events (member_uid, sequence, type, data, occurred_at)
select i.member_uid,
       n.last_sequence - c.n + row_number() over (partition by i.member_uid order by i.ord),
       i.type, i.data::jsonb, i.occurred_at
from input i
left join counted c using (member_uid)
left join numbered n using (member_uid)
order by i.ord
"""
