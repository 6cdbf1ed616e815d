"""Redemption use cases: rewards, redeeming (immediate or held), capture, release, cancel,
hold timeouts, expiry and adjustments. One transaction each; the member's row is locked first,
which serialises every spend of one member and makes overdrawing impossible.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import asyncpg
import msgspec

from konvert import errors, tiers
from konvert.auth import Principal
from konvert.idempotency import Outcome, replay, request_hash
from konvert.ledger import store as ledger
from konvert.ledger.service import takes_for_spending, work_due_lots
from konvert.pagination import decode_cursor, encode_cursor
from konvert.program import Reward
from konvert.redemption import rules, store
from konvert.redemption.model import (
    AdjustmentIn,
    AdjustmentOut,
    RedemptionIn,
    RedemptionOut,
    RedemptionPage,
    RewardIn,
    RewardList,
    RewardOut,
)
from konvert.services import Services

_encode = msgspec.json.Encoder().encode
_allocations = msgspec.json.Decoder(list[tuple[int, int]]).decode


# --- rewards -------------------------------------------------------------------------------


async def seed_rewards(services: Services) -> None:
    async with services.pool.acquire() as conn:
        await store.seed_rewards(conn, services.program.rewards)


def _reward_out(row: asyncpg.Record) -> RewardOut:
    return RewardOut(**dict(row))


async def available_rewards(services: Services) -> RewardList:
    rows = await store.select_available_rewards(
        services.pool, services.clock(), services.settings.page_size_max
    )
    return RewardList([_reward_out(r) for r in rows])


async def put_reward(services: Services, reward_id: str, reward: RewardIn) -> RewardOut:
    row = await store.upsert_reward(
        services.pool, Reward(reward_id=reward_id, **msgspec.structs.asdict(reward))
    )
    return _reward_out(row)


# --- redemptions ---------------------------------------------------------------------------


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


async def redeem(services: Services, member_id: str, redemption: RedemptionIn) -> Outcome:
    """Spend points on a reward or an amount, at once or as a hold. Never overdraws."""
    now = services.clock()
    digest = request_hash(member_id, redemption)
    # Six round trips (eight for a reward): BEGIN, lock, replay, [reward, stock], lots, write,
    # COMMIT; twelve before 2026-11-30. Concurrent spends of one member queue on its lock, so the
    # fewer round trips while it is held, the more spends per second one member can make.
    async with services.pool.acquire() as conn, conn.transaction():
        member = await store.lock_member_for_spending(conn, member_id)
        if member is None:
            raise errors.MemberNotFound(f"no member {member_id!r}")
        # After the lock, in a statement of its own: a concurrent duplicate that committed while
        # this one waited for the lock is seen here (the lock's statement saw the older snapshot).
        existing = await store.select_redemption_replay(conn, redemption.redemption_id)
        if existing is not None:
            return replay(existing, digest)

        points = redemption.points
        if redemption.reward_id is not None:
            reward_row = await store.select_reward(conn, redemption.reward_id)
            reward = Reward(**dict(reward_row)) if reward_row is not None else None
            if refusal := rules.reward_refusal(reward, redemption.reward_id, now):
                raise refusal
            assert reward is not None
            points = reward.cost_points
            if reward.stock is not None and not await store.take_one_from_stock(conn, reward.reward_id):
                raise errors.OutOfStock(f"reward {reward.reward_id!r} is out of stock")
        assert points is not None
        takes = await takes_for_spending(conn, member, points)

        held = redemption.hold
        transfer_id = member["transfer_id"]
        hold_expires_at = now + timedelta(seconds=services.program.points.hold_ttl_seconds) if held else None
        response = _encode(
            RedemptionOut(
                redemption_id=redemption.redemption_id,
                member_id=member_id,
                reward_id=redemption.reward_id,
                points=points,
                status="held" if held else "captured",
                hold_expires_at=hold_expires_at,
                transfer_id=transfer_id,
                closing_transfer_id=None,
                created_at=now,
                updated_at=now,
            )
        )
        version = await store.write_redemption(
            conn,
            transfer_id=transfer_id,
            member_uid=member["member_uid"],
            debit_account_id=member["available_account_id"],
            credit_account_id=(
                member["held_account_id"] if held else await services.accounts.id(conn, "points", "redeemed")
            ),
            points=points,
            held=held,
            reason=_reason(redemption),
            takes=takes,
            redemption_id=redemption.redemption_id,
            reward_id=redemption.reward_id,
            hold_expires_at=hold_expires_at,
            allocations=_encode(takes).decode(),
            note=redemption.note,
            request_hash=digest,
            response=response,
            now=now,
        )
    await services.balances.invalidate(member_id, version)
    return Outcome(response)


def _reason(redemption: RedemptionIn) -> str:
    what = f"reward {redemption.reward_id}" if redemption.reward_id else "points payment"
    return f"{what}: {redemption.note}" if redemption.note else what


async def _locked_redemption(conn: asyncpg.Connection, redemption_id: str) -> asyncpg.Record:
    """The redemption under lock, after its member's row (the project-wide lock order)."""
    found = await store.select_redemption(conn, redemption_id)
    if found is None:
        raise errors.RedemptionNotFound(f"no redemption {redemption_id!r}")
    await ledger.lock_member(conn, found["member_uid"])
    return await store.select_redemption(conn, redemption_id, lock=True)


async def capture(services: Services, redemption_id: str) -> RedemptionOut:
    """Spend held points for good. Capturing a captured redemption again returns it unchanged."""
    now = services.clock()
    async with services.pool.acquire() as conn, conn.transaction():
        row = await _locked_redemption(conn, redemption_id)
        if row["status"] == "captured":
            return _redemption_out(row)
        _require_active_hold(row, now)
        accounts = await ledger.select_member_account_ids(conn, row["member_uid"])
        transfer_id = await ledger.insert_transfer(
            conn,
            member_uid=row["member_uid"],
            asset="points",
            debit_account_id=accounts["held"],
            credit_account_id=await services.accounts.id(conn, "points", "redeemed"),
            amount=row["points"],
            code="capture",
            cause_type="redemption",
            cause_ref=redemption_id,
            reverses_transfer_id=None,
            reason="hold captured",
        )
        version = await ledger.update_member_points(conn, row["member_uid"], held=-row["points"])
        updated = await store.close_redemption(conn, row["redemption_pk"], "captured", transfer_id, now)
    await services.balances.invalidate(row["member_id"], version)
    return _closed(row, "captured", transfer_id, updated["updated_at"])


def _require_active_hold(row: asyncpg.Record, now: datetime) -> None:
    if row["status"] != "held":
        raise errors.HoldNotActive(f"redemption {row['redemption_id']!r} is {row['status']}, not held")
    if row["hold_expires_at"] <= now:
        raise errors.HoldNotActive(f"the hold of redemption {row['redemption_id']!r} has timed out")


def _closed(row: asyncpg.Record, status: str, transfer_id: int, updated_at: datetime) -> RedemptionOut:
    return msgspec.structs.replace(
        _redemption_out(row), status=status, closing_transfer_id=transfer_id, updated_at=updated_at
    )


async def release(
    services: Services, redemption_id: str, *, timed_out: bool = False, now: datetime | None = None
) -> RedemptionOut:
    """Return held points to the lots they came from. Releasing a released one returns it unchanged."""
    now = now or services.clock()
    async with services.pool.acquire() as conn, conn.transaction():
        row = await _locked_redemption(conn, redemption_id)
        final_status = "expired" if timed_out else "released"
        if row["status"] in ("released", "expired"):
            return _redemption_out(row)
        if row["status"] != "held" or (timed_out and row["hold_expires_at"] > now):
            raise errors.HoldNotActive(f"redemption {redemption_id!r} is {row['status']}, not held")
        transfer_id, version = await _give_back(
            services,
            conn,
            row,
            from_bucket="held",
            code="release",
            reason="hold timed out" if timed_out else "hold released",
        )
        updated = await store.close_redemption(conn, row["redemption_pk"], final_status, transfer_id, now)
    await services.balances.invalidate(row["member_id"], version)
    return _closed(row, final_status, transfer_id, updated["updated_at"])


async def cancel(services: Services, redemption_id: str) -> RedemptionOut:
    """Undo a captured redemption: the points go back to the same lots, the reward to stock."""
    now = services.clock()
    async with services.pool.acquire() as conn, conn.transaction():
        row = await _locked_redemption(conn, redemption_id)
        if row["status"] == "cancelled":
            return _redemption_out(row)
        if row["status"] != "captured":
            raise errors.Conflict(
                f"redemption {redemption_id!r} is {row['status']}; only captured ones can be cancelled"
            )
        transfer_id, version = await _give_back(
            services, conn, row, from_bucket="redeemed", code="cancel", reason="redemption cancelled"
        )
        updated = await store.close_redemption(conn, row["redemption_pk"], "cancelled", transfer_id, now)
    await services.balances.invalidate(row["member_id"], version)
    return _closed(row, "cancelled", transfer_id, updated["updated_at"])


async def _give_back(
    services: Services,
    conn: asyncpg.Connection,
    row: asyncpg.Record,
    *,
    from_bucket: str,
    code: str,
    reason: str,
) -> tuple[int, int]:
    """Return a redemption's points to its lots; points whose lot expired meanwhile expire now.

    Returns the main transfer's id and the member's new version.
    """
    member_uid = row["member_uid"]
    allocations = _allocations(row["allocations"])
    states = await ledger.lock_lot_states(conn, [lot for lot, _ in allocations])
    alive = [(lot, points) for lot, points in allocations if states[lot] != "expired"]
    dead_points = sum(points for lot, points in allocations if states[lot] == "expired")
    alive_points = row["points"] - dead_points
    accounts = await ledger.select_member_account_ids(conn, member_uid)
    source = (
        accounts["held"] if from_bucket == "held" else await services.accounts.id(conn, "points", "redeemed")
    )
    common = {
        "member_uid": member_uid,
        "asset": "points",
        "cause_type": "redemption",
        "cause_ref": row["redemption_id"],
    }
    transfer_id = None
    if alive_points:
        transfer_id = await ledger.insert_transfer(
            conn, **common, debit_account_id=source, credit_account_id=accounts["available"], amount=alive_points,
            code=code, reverses_transfer_id=row["transfer_id"], reason=reason,
        )  # fmt: skip
        await ledger.return_to_lots(conn, member_uid, alive, transfer_id, code)
    if dead_points:
        expired_id = await ledger.insert_transfer(
            conn, **common, debit_account_id=source,
            credit_account_id=await services.accounts.id(conn, "points", "expired"), amount=dead_points,
            code="expire", reverses_transfer_id=row["transfer_id"], reason=f"{reason}; their lots had expired",
        )  # fmt: skip
        transfer_id = transfer_id or expired_id
    member = await ledger.lock_member(conn, member_uid)
    version = await ledger.update_member_points(
        conn, member_uid, available=alive_points, held=-row["points"] if from_bucket == "held" else 0
    )
    await ledger.settle_debt(conn, member_uid, member["points_debt"])
    if row["reward_id"] is not None:
        await store.change_stock(conn, row["reward_id"], +1)
    assert transfer_id is not None
    return transfer_id, version


async def member_redemptions(
    services: Services, member_id: str, cursor: str | None, limit: int
) -> RedemptionPage:
    member_uid = await ledger.select_member_uid(services.pool, member_id)
    if member_uid is None:
        raise errors.MemberNotFound(f"no member {member_id!r}")
    before = decode_cursor("r", cursor) if cursor else None
    rows = await store.select_member_redemptions(services.pool, member_uid, before, limit + 1)
    next_cursor = encode_cursor("r", rows[limit - 1]["redemption_pk"]) if len(rows) > limit else None
    return RedemptionPage([_redemption_out(r) for r in rows[:limit]], next_cursor)


# --- jobs ----------------------------------------------------------------------------------


async def release_timed_out_holds(services: Services, now: datetime | None = None) -> int:
    """Release holds whose time is up. Lives in PostgreSQL, so restarts and Redis flushes never
    leave a hold stuck; safe in several processes (each hold is re-checked under its lock)."""
    now = now or services.clock()
    released = 0
    for redemption_id in await store.select_expired_holds(
        services.pool, now, services.settings.jobs_batch_size
    ):
        try:
            await release(services, redemption_id, timed_out=True, now=now)
            released += 1
        except errors.HoldNotActive:
            continue  # Captured or released by someone else in the meantime.
    return released


async def expire_due_lots(services: Services, now: datetime | None = None) -> int:
    """Expire lots whose date has come; return the number of lots expired.

    Every lot not spent in time comes through here, so it works in batches
    (``ledger.service.work_due_lots``): the due lots with their members locked, then every lot
    expired with its transfer, its lot entry and its member's balances in one statement
    (``store.expire_locked_lots``).
    """
    now = now or services.clock()

    async def expire(conn: asyncpg.Connection, lot_ids: list[int]) -> list[asyncpg.Record]:
        expired_account = await services.accounts.id(conn, "points", "expired")
        return await store.expire_locked_lots(conn, lot_ids, now, expired_account)

    return await work_due_lots(
        services,
        "expiry",
        lock=lambda conn, passed_over: store.lock_expiring_lots(
            conn, now, services.settings.jobs_batch_size, passed_over
        ),
        write=expire,
        alone=lambda member_uid, _: _expire_member(services, member_uid, now),
    )


async def _expire_member(services: Services, member_uid: int, now: datetime) -> int:
    async with services.pool.acquire() as conn, conn.transaction():
        member = await ledger.lock_member(conn, member_uid)
        lots = await store.lock_due_lots(conn, member_uid, now)
        if not lots:
            return 0
        accounts = await ledger.select_member_account_ids(conn, member_uid)
        expired_account = await services.accounts.id(conn, "points", "expired")
        taken = {"available": 0, "pending": 0}
        for lot in lots:
            if lot["remaining"] == 0:
                continue
            transfer_id = await ledger.insert_transfer(
                conn,
                member_uid=member_uid,
                asset="points",
                debit_account_id=accounts[lot["state"]],
                credit_account_id=expired_account,
                amount=lot["remaining"],
                code="expire",
                cause_type="lot",
                cause_ref=str(lot["lot_id"]),
                lot_id=lot["lot_id"],
                reason=f"points expired on {lot['expires_at']:%Y-%m-%d}",
            )
            await ledger.take_from_lots(
                conn, member_uid, [(lot["lot_id"], lot["remaining"])], transfer_id, "expire"
            )
            taken[lot["state"]] += lot["remaining"]
        await store.mark_lots_expired(conn, [lot["lot_id"] for lot in lots])
        version = await ledger.update_member_points(
            conn, member_uid, available=-taken["available"], pending=-taken["pending"]
        )
    await services.balances.invalidate(member["member_id"], version)
    return len(lots)


async def reevaluate_tiers(services: Services, now: datetime | None = None) -> int:
    """Re-evaluate tiers this job has not evaluated in the last day, members new to a tier first
    (the window slides; downgrades fall due). Purchases re-evaluate their member's tier but leave
    ``tier_evaluated_at`` to this job, so every member with a tier comes up once a day: one
    batch of ``jobs_batch_size`` members per transaction (``tiers.reevaluate_due``); processes
    running the job at once take different members."""
    if not services.program.tiers.levels:
        return 0
    now = now or services.clock()
    async with services.pool.acquire() as conn, conn.transaction():
        count, changed = await tiers.reevaluate_due(
            conn, services.program, now, now - timedelta(days=1), services.settings.jobs_batch_size
        )
    await services.balances.invalidate_many((m.member_id, m.version) for m in changed)
    return count


# --- adjustments ---------------------------------------------------------------------------


async def adjust(
    services: Services, member_id: str, adjustment: AdjustmentIn, principal: Principal
) -> Outcome:
    """An operator's correction with a reason code; the key that made it is recorded.

    A credit is a new lot (available at once, expiring like any other); a debit takes available
    points soonest-expiring first and never overdraws.
    """
    if adjustment.reason_code not in services.program.adjustments.reason_codes:
        raise errors.ValidationFailed(
            f"reason_code must be one of {', '.join(services.program.adjustments.reason_codes)}",
            errors=[{"field": "reason_code", "message": "unknown reason code"}],
        )
    now = services.clock()
    digest = request_hash(member_id, adjustment)
    async with services.pool.acquire() as conn, conn.transaction():
        member_uid = await ledger.ensure_member(conn, member_id)
        member = await ledger.lock_member(conn, member_uid)
        # After the member's lock: a concurrent identical request has committed by now, and
        # this one replays it instead of tripping over its unique key.
        existing = await store.select_adjustment_replay(conn, adjustment.adjustment_id)
        if existing is not None:
            return replay(existing, digest)
        accounts = await ledger.select_member_account_ids(conn, member_uid)
        system = await services.accounts.id(conn, "points", "adjustments")
        points = abs(adjustment.points)
        credit = adjustment.points > 0
        lot_id = None
        if credit:
            lot_id = await store.insert_lot(
                conn, member_uid, points, "available", now, rules.expiry_for(now, services.program.points)
            )
        else:
            takes = await takes_for_spending(conn, member, points)
        transfer_id = await ledger.insert_transfer(
            conn,
            member_uid=member_uid,
            asset="points",
            debit_account_id=system if credit else accounts["available"],
            credit_account_id=accounts["available"] if credit else system,
            amount=points,
            code="adjust",
            cause_type="adjustment",
            cause_ref=adjustment.adjustment_id,
            lot_id=lot_id,
            reason=f"{adjustment.reason_code}: {adjustment.note}"
            if adjustment.note
            else adjustment.reason_code,
        )
        if not credit:
            await ledger.take_from_lots(conn, member_uid, takes, transfer_id, "adjust")
        version = await ledger.update_member_points(conn, member_uid, available=adjustment.points)
        if credit:
            await ledger.settle_debt(conn, member_uid, member["points_debt"])
        response = _encode(
            AdjustmentOut(
                adjustment_id=adjustment.adjustment_id,
                member_id=member_id,
                points=adjustment.points,
                reason_code=adjustment.reason_code,
                note=adjustment.note,
                made_by=principal.name,
                transfer_id=transfer_id,
                lot_id=lot_id,
                created_at=now,
            )
        )
        await store.insert_adjustment(
            conn,
            adjustment_id=adjustment.adjustment_id,
            member_uid=member_uid,
            points=adjustment.points,
            reason_code=adjustment.reason_code,
            note=adjustment.note,
            key_id=principal.key_id,
            key_name=principal.name,
            transfer_id=transfer_id,
            request_hash=digest,
            response=response,
        )
    await services.balances.invalidate(member_id, version)
    return Outcome(response)
