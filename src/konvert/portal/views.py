"""What each portal page shows, read through the features' own services: the same balance, the
same activity, rewards, reputation and consents that the API gives, for the session's member."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import msgspec

from konvert.ledger import balances, reads
from konvert.ledger.model import ActivityItem, Balance
from konvert.preferences import service as preferences
from konvert.redemption import service as redemption
from konvert.reputation import leaderboard
from konvert.reputation import service as reputation
from konvert.reputation.rules import rank_for

if TYPE_CHECKING:
    from konvert.services import Services

ACTIVITY_PAGE_SIZE = 20
VESTING_DATES_SHOWN = reads.VESTING_DATES_MAX
LEADERBOARD_SIZE = 10
PERIODS = ("week", "month", "all")


def _percent(part: int, whole: int) -> int:
    return max(0, min(100, round(100 * part / whole))) if whole > 0 else 100


async def balance(services: Services, member_id: str) -> Balance:
    """The member's balance as GET /v1/members/{id}/balance gives it (from the cache if current)."""
    return balances.decode_balance(await balances.balance_body(services, member_id))


def standing(services: Services, current: Balance) -> dict[str, Any]:
    """Tier and rank, and how far the member is from the next of each."""
    program = services.program
    rank = rank_for(program.reputation.ranks, current.reputation)
    thresholds = {r.name: r.min_reputation for r in program.reputation.ranks}
    tier = current.tier
    tier_progress = None
    if tier is not None and tier.next_tier is not None and tier.points_to_next_tier is not None:
        needed = tier.qualifying_points + tier.points_to_next_tier
        tier_progress = _percent(tier.qualifying_points, needed)
    rank_progress = None
    if rank.next_rank is not None:
        floor, ceiling = thresholds[rank.rank], thresholds[rank.next_rank]
        rank_progress = _percent(current.reputation - floor, ceiling - floor)
    return {"tier": tier, "tier_progress": tier_progress, "rank": rank, "rank_progress": rank_progress}


async def overview(services: Services, member_id: str) -> dict[str, Any]:
    current = await balance(services, member_id)
    vesting = current.vesting
    if current.pending > 0 and not vesting:
        # A balance cached by a konvert from before balances listed their vesting dates.
        vesting = await balances.vesting(services, member_id, VESTING_DATES_SHOWN)
    return {"balance": current, "vesting": vesting, **standing(services, current)}


# What a transfer was, in the member's words (msgids of the catalog), by its code and cause.
_WORDS = {
    ("earn", "purchase"): "Purchase %(ref)s at %(partner)s",
    ("earn", "preference"): "Shared a preference: %(ref)s",
    ("vest", "purchase"): "Points of purchase %(ref)s at %(partner)s became available",
    ("refund", "refund"): "Refund",
    ("redeem", "redemption"): "Redeemed: %(reason)s",
    ("hold", "redemption"): "Reserved for a redemption",
    ("capture", "redemption"): "Redemption completed",
    ("release", "redemption"): "Reservation released",
    ("cancel", "redemption"): "Redemption cancelled",
    ("expire", ""): "Expired",
    ("adjust", "adjustment"): "Adjustment: %(reason)s",
    ("kudos", "kudos"): "Kudos received",
    ("retract", "kudos"): "Kudos retracted",
    ("bonus", "kudos"): "Points for an accepted answer",
    ("clawback", "preference"): "Points of a withdrawn preference taken back",
}


def describe(services: Services, item: ActivityItem) -> tuple[str, dict[str, str]]:
    """The message id and its values for an activity line ("Purchase 1001 at Web shop")."""
    message = _WORDS.get((item.code, item.cause.type)) or _WORDS.get((item.code, "")) or item.code
    ref, partner = item.cause.ref, ""
    if item.cause.type in ("purchase", "refund") and "/" in ref:
        partner_id, _, ref = ref.partition("/")
        partner = next((p.name or p.id for p in services.program.partners if p.id == partner_id), partner_id)
        ref = ref.split("/")[0]
    return message, {"ref": ref, "partner": partner, "reason": item.reason or ""}


async def activity(services: Services, member_id: str, cursor: str | None) -> dict[str, Any]:
    page = await balances.activity(services, member_id, cursor, ACTIVITY_PAGE_SIZE)
    lines = [(item, *describe(services, item)) for item in page.items]
    return {"lines": lines, "next_cursor": page.next_cursor}


async def rewards(services: Services, member_id: str) -> dict[str, Any]:
    current, offered = await asyncio.gather(balance(services, member_id), redemption.available_rewards(services))
    return {"balance": current, "rewards": offered.items}


async def reward(services: Services, member_id: str, reward_id: str) -> dict[str, Any]:
    found = await rewards(services, member_id)
    chosen = next((r for r in found["rewards"] if r.reward_id == reward_id), None)
    return found | {"reward": chosen}


async def reputation_page(services: Services, member_id: str) -> dict[str, Any]:
    standing_now = await reputation.member_reputation(services, member_id)
    boards = {}
    for period in PERIODS:
        top = await leaderboard.top(services, period, None, LEADERBOARD_SIZE)
        mine = await leaderboard.position(services, member_id, period, None)
        boards[period] = {"top": top, "mine": mine}
    ranks = services.program.reputation.ranks
    return {"reputation": standing_now, "boards": boards, "ranks": ranks}


async def privacy(services: Services, member_id: str) -> dict[str, Any]:
    catalog = preferences.catalog(services)
    shared = await preferences.list_preferences(services, member_id, None)
    consents = await preferences.consents(services, member_id)
    by_key = {item.key: item for item in shared.items}
    return {"catalog": catalog, "shared": by_key, "consents": consents}


def to_json(value: Any) -> bytes:
    return msgspec.json.encode(value)
