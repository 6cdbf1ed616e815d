"""Redemption use cases: rewards, redeeming (at once or as a hold), capture, release, cancel and
hold timeouts. One transaction each; the member's row is locked first, which serialises every
spend of one member, and the ledger core never overdraws."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Literal

import asyncpg
import msgspec

from konvert import errors
from konvert.batching import GroupCommit
from konvert.db import Row
from konvert.idempotency import Outcome, replay, request_hash
from konvert.ledger import events, keys
from konvert.ledger.accounts import REDEEMED, SystemAccount
from konvert.ledger.book import Book, Member, writing
from konvert.ledger.model import Cause
from konvert.ledger.store import select_member_uid
from konvert.pagination import decode_cursor, encode_cursor
from konvert.program import Reward
from konvert.redemption import rules, store
from konvert.redemption.model import RedemptionIn, RedemptionOut, RedemptionPage, RewardIn, RewardList, RewardOut

if TYPE_CHECKING:
    from konvert.services import Services

_encode = msgspec.json.Encoder().encode
_allocations = msgspec.json.Decoder(list[tuple[int, int]]).decode


# --- rewards -----------------------------------------------------------------------------------


async def seed_rewards(services: Services) -> None:
    """Add the program file's rewards that the catalog does not have yet (operator edits win)."""
    async with services.pool.acquire() as conn:
        await store.seed_rewards(conn, services.program.rewards)


async def available_rewards(services: Services) -> RewardList:
    rows = await store.select_available_rewards(services.pool, services.clock(), services.settings.page_size_max)
    return RewardList([RewardOut(**dict(row)) for row in rows])


async def put_reward(services: Services, reward_id: str, reward: RewardIn) -> RewardOut:
    row = await store.upsert_reward(services.pool, Reward(reward_id=reward_id, **msgspec.structs.asdict(reward)))
    return RewardOut(**dict(row))


# --- redemptions -------------------------------------------------------------------------------


def _redemption_out(row: asyncpg.Record) -> RedemptionOut:
    return RedemptionOut(
        redemption_id=row["redemption_id"],
        member_id=row["member_id"],
        reward_id=row["reward_id"],
        points=row["points"],
        status=row["status"],
        hold_expires_at=row["hold_expires_at"],
        transfer_id=row["transfer_id"],
        closing_transfer_id=row["closing_transfer_id"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


class Redemptions:
    """This process's redemptions, group-committed like purchases: the redemptions that arrive
    while a batch is being written go into the next one, one transaction for them all, sorted
    by member (konvert.batching.GroupCommit)."""

    def __init__(self, services: Services) -> None:
        settings = services.settings

        async def write(items: list[tuple[str, RedemptionIn]]) -> list[Outcome | errors.KonvertError]:
            return await write_redemptions(services, items)

        self._batches: GroupCommit[tuple[str, RedemptionIn], Outcome] = GroupCommit(
            write,
            sort_key=lambda item: (item[0], item[1].redemption_id),
            batch_size_max=settings.write_batch_size_max,
            batches_in_flight_max=settings.write_batches_in_flight_max,
            overlap_after_seconds=settings.write_batch_overlap_after_seconds,
        )

    async def redeem(self, member_id: str, redemption: RedemptionIn) -> Outcome:
        return await self._batches.submit((member_id, redemption))

    async def aclose(self) -> None:
        await self._batches.aclose()


async def redeem(services: Services, member_id: str, redemption: RedemptionIn) -> Outcome:
    """Spend points on a reward or an amount, at once or as a hold. Never overdraws."""
    return await services.shared(Redemptions).redeem(member_id, redemption)


async def write_redemptions(
    services: Services, items: Sequence[tuple[str, RedemptionIn]]
) -> list[Outcome | errors.KonvertError]:
    """Redemptions (member id, redemption) in one transaction; each one's outcome in order: its
    redemption, the replay of what was recorded under its id (earlier, or in this batch), or its
    refusal. A refusal comes before its redemption writes anything, so it fails that redemption
    alone; a database error fails the transaction, and GroupCommit then writes each redemption in
    one of its own. The batch's redemptions are recorded together, in one statement."""
    now = services.clock()
    outcomes: list[Outcome | errors.KonvertError] = []
    async with writing(services) as book:
        members = {member.id: member for member in await book.lock(ids={member_id for member_id, _ in items})}
        # After the lock, in a statement of its own: a concurrent duplicate that committed while
        # this batch waited for the lock is seen here (the lock's statement saw the older snapshot).
        wanted = [(members[m].uid, r.redemption_id) for m, r in items if m in members]
        recorded: dict[tuple[int, str], Row] = dict(await store.select_redemption_replays(book.conn, wanted))
        new: list[store.NewRedemption] = []
        for member_id, redemption in items:
            try:
                member = members.get(member_id)
                if member is None:
                    raise errors.MemberNotFound(f"no member {member_id!r}")
                digest = request_hash(member.id, redemption)
                if (existing := recorded.get((member.uid, redemption.redemption_id))) is not None:
                    outcomes.append(replay(existing, digest))
                    continue
                row = await _redeem(services, book, member, redemption, digest, now)
                recorded[(member.uid, redemption.redemption_id)] = {"request_hash": digest, "response": row.response}
                new.append(row)
                outcomes.append(Outcome(row.response))
            except errors.KonvertError as refusal:
                outcomes.append(refusal)
        if new:
            await store.insert_redemptions(book.conn, new)
    return outcomes


async def _redeem(
    services: Services, book: Book, member: Member, redemption: RedemptionIn, digest: bytes, now: datetime
) -> store.NewRedemption:
    """One redemption in a batch's transaction, its member locked: the points spent, the event
    announced; the row to record."""
    points = await _price(book, member, redemption, now)
    held = redemption.hold
    spend = await book.spend(
        member,
        points,
        to="held" if held else REDEEMED,
        code="hold" if held else "redeem",
        cause=Cause("redemption", redemption.redemption_id),
        reason=_reason(redemption),
    )
    hold_expires_at = now + timedelta(seconds=services.program.points.hold_ttl_seconds) if held else None
    status: Literal["held", "captured"] = "held" if held else "captured"
    changed = _changed(book, member, redemption.redemption_id, redemption.reward_id, points, status, spend.transfer_id)
    book.announce(member, "redemption.held" if held else "points.redeemed", changed)
    response = _encode(
        RedemptionOut(
            redemption_id=redemption.redemption_id,
            member_id=member.id,
            reward_id=redemption.reward_id,
            points=points,
            status=status,
            hold_expires_at=hold_expires_at,
            transfer_id=spend.transfer_id,
            closing_transfer_id=None,
            created_at=now,
            updated_at=now,
        )
    )
    return store.NewRedemption(
        redemption_id=redemption.redemption_id,
        member_uid=member.uid,
        reward_id=redemption.reward_id,
        points=points,
        status=status,
        hold_expires_at=hold_expires_at,
        allocations=_encode(spend.takes).decode(),
        transfer_id=spend.transfer_id,
        note=redemption.note,
        request_hash=digest,
        response=response,
        created_at=now,
    )


async def _price(book: Book, member: Member, redemption: RedemptionIn, now: datetime) -> int:
    """The points a redemption costs; a reward with a stock gives up one unit (under its lock),
    only once the member is known to have the points: nothing is written before a refusal."""
    if redemption.reward_id is None:
        assert redemption.points is not None
        return redemption.points
    row = await store.select_reward(book.conn, redemption.reward_id)
    reward = Reward(**dict(row)) if row is not None else None
    if refusal := rules.reward_refusal(reward, redemption.reward_id, now):
        raise refusal
    assert reward is not None
    book.ensure_available(member, reward.cost_points)
    if reward.stock is not None and not await store.take_one_from_stock(book.conn, reward.reward_id):
        raise errors.OutOfStock(f"reward {reward.reward_id!r} is out of stock")
    return reward.cost_points


def _changed(
    book: Book, member: Member, redemption_id: str, reward_id: str | None, points: int, status: str, transfer_id: int
) -> events.RedemptionChanged:
    """A redemption event's data, with the member's balance as the book holds it now."""
    return events.RedemptionChanged(
        redemption_id=redemption_id,
        reward_id=reward_id,
        points=points,
        status=status,
        transfer_id=transfer_id,
        balance=book.balance(member),
    )


def _reason(redemption: RedemptionIn) -> str:
    what = f"reward {redemption.reward_id}" if redemption.reward_id else "points payment"
    return f"{what}: {redemption.note}" if redemption.note else what


async def _locked_redemption(book: Book, redemption_id: str) -> tuple[asyncpg.Record, Member]:
    """The redemption under lock, after its member's row (the project-wide lock order)."""
    member_uid = await keys.select_key_member(book.conn, keys.REDEMPTION, redemption_id)
    if member_uid is None:
        raise errors.RedemptionNotFound(f"no redemption {redemption_id!r}")
    member = await book.member_by_uid(member_uid)
    locked = await store.select_redemption(book.conn, member_uid, redemption_id, lock=True)
    assert locked is not None  # redemptions are never deleted
    return locked, member


async def capture(services: Services, redemption_id: str) -> RedemptionOut:
    """Spend held points for good. Capturing a captured redemption again returns it unchanged."""
    now = services.clock()
    async with writing(services) as book:
        row, member = await _locked_redemption(book, redemption_id)
        if row["status"] == "captured":
            return _redemption_out(row)
        _require_active_hold(row, now)
        transfer_id = await book.capture(
            member, row["points"], to=REDEEMED, cause=Cause("redemption", redemption_id), reason="hold captured"
        )
        updated = await store.close_redemption(
            book.conn, member.uid, row["redemption_pk"], "captured", transfer_id, now
        )
        changed = _changed(book, member, redemption_id, row["reward_id"], row["points"], "captured", transfer_id)
        book.announce(member, "redemption.captured", changed)
        book.announce(member, "points.redeemed", changed)
    return _closed(row, "captured", transfer_id, updated["updated_at"])


def _require_active_hold(row: asyncpg.Record, now: datetime) -> None:
    if row["status"] != "held":
        raise errors.HoldNotActive(f"redemption {row['redemption_id']!r} is {row['status']}, not held")
    if row["hold_expires_at"] <= now:
        raise errors.HoldNotActive(f"the hold of redemption {row['redemption_id']!r} has timed out")


def _closed(row: asyncpg.Record, status: str, transfer_id: int, updated_at: datetime) -> RedemptionOut:
    return msgspec.structs.replace(
        _redemption_out(row),
        status=status,
        closing_transfer_id=transfer_id,
        updated_at=updated_at,
    )


async def release(
    services: Services, redemption_id: str, *, timed_out: bool = False, now: datetime | None = None
) -> RedemptionOut:
    """Return held points to the lots they came from. Releasing a released one returns it unchanged."""
    now = now or services.clock()
    async with writing(services) as book:
        row, member = await _locked_redemption(book, redemption_id)
        final_status = "expired" if timed_out else "released"
        if row["status"] in ("released", "expired"):
            return _redemption_out(row)
        if row["status"] != "held" or (timed_out and row["hold_expires_at"] > now):
            raise errors.HoldNotActive(f"redemption {redemption_id!r} is {row['status']}, not held")
        reason = "hold timed out" if timed_out else "hold released"
        transfer_id = await _give_back(book, member, row, source="held", code="release", reason=reason)
        updated = await store.close_redemption(
            book.conn, member.uid, row["redemption_pk"], final_status, transfer_id, now
        )
        changed = _changed(book, member, redemption_id, row["reward_id"], row["points"], final_status, transfer_id)
        book.announce(member, f"redemption.{final_status}", changed)
    return _closed(row, final_status, transfer_id, updated["updated_at"])


async def cancel(services: Services, redemption_id: str) -> RedemptionOut:
    """Undo a captured redemption: the points go back to the same lots, the reward to stock."""
    now = services.clock()
    async with writing(services) as book:
        row, member = await _locked_redemption(book, redemption_id)
        if row["status"] == "cancelled":
            return _redemption_out(row)
        if row["status"] != "captured":
            raise errors.Conflict(
                f"redemption {redemption_id!r} is {row['status']}; only captured ones can be cancelled"
            )
        transfer_id = await _give_back(book, member, row, source=REDEEMED, code="cancel", reason="redemption cancelled")
        updated = await store.close_redemption(
            book.conn, member.uid, row["redemption_pk"], "cancelled", transfer_id, now
        )
        changed = _changed(book, member, redemption_id, row["reward_id"], row["points"], "cancelled", transfer_id)
        book.announce(member, "redemption.cancelled", changed)
    return _closed(row, "cancelled", transfer_id, updated["updated_at"])


async def _give_back(
    book: Book,
    member: Member,
    row: asyncpg.Record,
    *,
    source: SystemAccount | Literal["held"],
    code: str,
    reason: str,
) -> int:
    """A redemption's points back to its lots (those of lots expired meanwhile expire now), and
    its reward back to stock; returns the main transfer's id."""
    transfer_id = await book.give_back(
        member,
        _allocations(row["allocations"]),
        source=source,
        code=code,
        cause=Cause("redemption", row["redemption_id"]),
        reverses_transfer_id=row["transfer_id"],
        reason=reason,
    )
    if row["reward_id"] is not None:
        await store.change_stock(book.conn, row["reward_id"], +1)
    return transfer_id


async def member_redemptions(services: Services, member_id: str, cursor: str | None, limit: int) -> RedemptionPage:
    member_uid = await select_member_uid(services.pool, member_id)
    if member_uid is None:
        raise errors.MemberNotFound(f"no member {member_id!r}")
    before = decode_cursor("r", cursor) if cursor else None
    rows = await store.select_member_redemptions(services.pool, member_uid, before, limit + 1)
    next_cursor = encode_cursor("r", rows[limit - 1]["redemption_pk"]) if len(rows) > limit else None
    return RedemptionPage([_redemption_out(r) for r in rows[:limit]], next_cursor)


async def release_timed_out_holds(services: Services, now: datetime | None = None) -> int:
    """The job that releases holds whose time is up. Holds time out in PostgreSQL, so restarts and
    Redis flushes never leave one stuck; safe in several processes (each hold is checked again
    under its lock)."""
    now = now or services.clock()
    released = 0
    for redemption_id in await store.select_expired_holds(services.pool, now, services.settings.jobs_batch_size):
        try:
            await release(services, redemption_id, timed_out=True, now=now)
            released += 1
        except errors.HoldNotActive:
            continue  # Captured or released by someone else in the meantime.
    return released
