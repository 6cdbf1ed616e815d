"""Wire Structs for reputation: kudos in, what they credited out, reputation and leaderboards.

Request Structs forbid unknown fields; ids and names are bounded aliases. A kudos' ``source``
names the forum (it becomes part of a system account name and of leaderboard keys), so it is
restricted to a short identifier without ``:``.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from konvert.ledger.model import NO_CONTROL_CHARACTERS, UNPRINTABLE, MemberId

KudosId = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=128,
        # No "/": every kudos can be named in the URL that retracts it.
        pattern=rf"^[^{UNPRINTABLE}/]+$(?!\n)",
        description="The caller's id for this kudos (no `/`); unique across sources, its idempotency key.",
    ),
]
Source = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="The forum the kudos comes from, e.g. `forum` or `discourse.example.org`.",
    ),
]
ExternalId = Annotated[str, Meta(min_length=1, max_length=128, pattern=NO_CONTROL_CHARACTERS)]
AwareDatetime = Annotated[datetime, Meta(tz=True)]
KudosKind = Literal["like", "helpful", "accepted_answer"]
KudosStatus = Literal["standing", "retracted", "superseded"]
Role = Literal["author", "accepter"]
ChangeReason = Literal["award", "retraction", "superseded", "cap_freed", "cap_taken"]
Period = Literal["all", "week", "month"]


class KudosIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A kudos as a forum posts it: someone liked a post, marked it helpful, or accepted it as the answer."""

    kudos_id: KudosId
    source: Source
    post_id: ExternalId
    thread_id: ExternalId
    # The member who wrote the post and receives the reputation.
    author_id: MemberId
    # The member who liked, marked helpful or accepted.
    giver_id: MemberId
    kind: KudosKind
    occurred_at: AwareDatetime

    def __post_init__(self) -> None:
        # Meta(tz=True) covers decoding; this covers Structs built in code.
        if self.occurred_at.tzinfo is None:
            raise ValueError("occurred_at: needs a UTC offset")


class RetractionIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Names a kudos by what it is rather than by its kudos_id (for forums that only know that)."""

    source: Source
    post_id: ExternalId
    giver_id: MemberId
    kind: KudosKind


class ReputationChange(msgspec.Struct, frozen=True, kw_only=True):
    """One change to what a kudos credits a member, made by this request."""

    member_id: str
    # The kudos whose credit changed: the one posted or retracted, or another kudos of the same
    # day whose share of the daily cap moved.
    kudos_id: str
    role: Role
    reason: ChangeReason
    # The change to the kudos' credit.
    amount: int
    # The change to the member's reputation: equal to amount, except where the floor kept
    # reputation back or a credit first made up for what the floor had kept.
    reputation_delta: int
    transfer_id: int | None


class KudosOut(msgspec.Struct, frozen=True, kw_only=True):
    """A kudos and what it credits, as of the request that answered it."""

    kudos_id: str
    source: str
    post_id: str
    thread_id: str
    author_id: str
    giver_id: str
    kind: KudosKind
    occurred_at: datetime
    # The UTC day whose daily cap the kudos counts against.
    day: date
    status: KudosStatus
    # False when the kudos stands but awards nothing: see not_counted_reason.
    counted: bool
    # giver_without_standing, self_accept, or superseded (a later accepted answer of the thread).
    not_counted_reason: str | None
    # Reputation this kudos credits now: to the author (after the daily cap) and to the accepter.
    author_reputation: int
    accepter_reputation: int
    # Loyalty points the accepted answer credits to the author (only if the program says so).
    bridge_points: int
    changes: list[ReputationChange]


class BreakdownItem(msgspec.Struct, frozen=True):
    source: str
    # like, helpful, accepted_answer (the author's award) or accepter (for accepting an answer).
    kind: str
    reputation: int


class MemberReputation(msgspec.Struct, frozen=True, kw_only=True):
    member_id: str
    reputation: int
    rank: str
    # None at the top rank.
    next_rank: str | None
    needed_for_next_rank: int | None
    # What the standing kudos credit, by source and kind. Adds up to reputation - kept_by_floor.
    breakdown: list[BreakdownItem]
    # Reputation the floor kept when retractions would have taken the member below it.
    kept_by_floor: int
    # Today (UTC): what likes and helpful marks are worth, and what they credit after the cap.
    today_before_cap: int
    today_capped: int
    daily_cap: int


class LeaderboardEntry(msgspec.Struct, frozen=True):
    # Dense: members with equal reputation share a rank, the next rank is one more.
    rank: int
    member_id: str
    reputation: int


class Leaderboard(msgspec.Struct, frozen=True, kw_only=True):
    period: Period
    # all, an ISO week (2026-W47) or a month (2026-11), in UTC.
    period_key: str
    source: str | None
    # Reputation gained in the period, most first.
    entries: list[LeaderboardEntry]


class LeaderboardPosition(msgspec.Struct, frozen=True, kw_only=True):
    member_id: str
    period: Period
    period_key: str
    source: str | None
    # None when the member gained nothing in the period.
    rank: int | None
    reputation: int
