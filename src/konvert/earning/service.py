"""Earning use cases: post a purchase, preview it, refund it. One transaction each, then the cache."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import asyncpg
import msgspec

from konvert import errors, tiers
from konvert.batching import GroupCommit
from konvert.earning import rules, store
from konvert.earning.model import (
    EarningResult,
    PurchaseIn,
    PurchaseOut,
    RefundIn,
    RefundLinePoints,
    RefundOut,
)
from konvert.idempotency import Outcome, replay, request_hash
from konvert.ledger import store as ledger
from konvert.observability import PURCHASE_POSTINGS
from konvert.redemption.rules import expiry_for
from konvert.services import Services

log = logging.getLogger("konvert.earning")

_encode = msgspec.json.Encoder(decimal_format="number").encode
_decode_state = msgspec.json.Decoder(rules.PurchaseRefundState).decode

# A purchase may be posted late, but not from the future beyond clock skew.
_FUTURE_SKEW = timedelta(minutes=10)


def _check_occurred_at(purchase: PurchaseIn, now: datetime) -> None:
    if purchase.occurred_at > now + _FUTURE_SKEW:
        raise errors.ValidationFailed(
            "occurred_at is in the future",
            errors=[{"field": "occurred_at", "message": "must not be later than now"}],
        )


def preview(services: Services, purchase: PurchaseIn) -> EarningResult:
    """The points a purchase would earn, with the rules applied. Writes nothing."""
    _check_occurred_at(purchase, services.clock())
    return rules.compute_earning(services.program, purchase)


class Posted(msgspec.Struct, frozen=True):
    """A purchase written (not yet committed): its outcome, and the cache entry to invalidate."""

    outcome: Outcome
    member_id: str
    version: int | None


async def post_purchase(services: Services, purchase: PurchaseIn) -> Outcome:
    """Record a purchase and credit its points, once per (partner, purchase_id).

    Concurrent postings are group-committed: they are written together (see konvert.batching
    and write_purchase_batch), and each still gets its own outcome; a 2xx means committed.
    """
    check_purchase(services, purchase)
    if services.purchases is None:
        return await post_purchase_alone(services, purchase)
    posted = await services.purchases.submit(Posting(purchase))
    return posted.outcome


class Posting(msgspec.Struct, frozen=True):
    """A checked purchase waiting for its batch (its points depend on its member's tier, which
    the batch reads)."""

    purchase: PurchaseIn


def purchase_batcher(services: Services) -> GroupCommit[Posting, Posted]:
    """Group commit for postings, sorted by member (the order rows are written in)."""
    settings = services.settings

    async def write(conn: asyncpg.Connection, posting: Posting) -> Posted:
        return await write_purchase(services, conn, posting)

    async def write_batch(postings: list[Posting]) -> list[Posted | BaseException]:
        return await write_purchase_batch(services, postings)

    async def committed(posted: list[Posted]) -> None:
        await after_commit(services, posted)

    return GroupCommit(
        services.pool,
        write,
        committed,
        write_batch=write_batch,
        sort_key=lambda p: (p.purchase.member_id, p.purchase.partner, p.purchase.purchase_id),
        batch_size_max=settings.write_batch_size_max,
        batches_in_flight_max=settings.write_batches_in_flight_max,
        overlap_after_seconds=settings.write_batch_overlap_after_seconds,
    )


async def post_purchase_alone(services: Services, purchase: PurchaseIn) -> Outcome:
    """The same in a transaction of its own (for callers without a batcher)."""
    check_purchase(services, purchase)
    posted = await _write_alone(services, Posting(purchase))
    if isinstance(posted, BaseException):
        raise posted
    await after_commit(services, [posted])
    return posted.outcome


def check_purchase(services: Services, purchase: PurchaseIn) -> None:
    """Everything that can refuse a purchase without the database: raise before any write, so
    that the batch's computation of its points (at its member's tier) cannot refuse it."""
    _check_occurred_at(purchase, services.clock())
    rules.earning_rate(services.program, purchase)


async def after_commit(services: Services, posted: list[Posted]) -> None:
    await services.balances.invalidate_many((p.member_id, p.version) for p in posted if p.version is not None)


# Rounds of read-then-write for a batch before its unsettled postings are written one by one.
_OPTIMISTIC_ROUNDS = 3


@dataclass
class Round:
    """What one round of write_purchases settled, by posting index, kept as soon as known: if
    the round fails later, what it committed still reaches its requests (and the cache)."""

    settled: dict[int, Posted | errors.KonvertError] = field(default_factory=dict)
    # Postings that need a transaction of their own (their member has a refund debt to repay).
    alone: set[int] = field(default_factory=set)


async def write_purchase_batch(services: Services, postings: list[Posting]) -> list[Posted | BaseException]:
    """Write and commit a batch of postings; return each one's outcome, in order.

    Optimistic, in two round trips per round and no explicit transaction: one statement reads
    what the batch needs (members, tiers, which purchase ids are taken, fresh ids), then one
    self-committing statement writes every purchase whose member is unchanged since that read.
    Postings of members that changed meanwhile go into the next round. What is still unsettled
    after a few rounds (a member written to all the time from elsewhere), after a round that
    failed, or what repays a refund debt, is written one posting at a time under its member's
    lock.
    """
    outcomes: dict[int, Posted | BaseException] = {}
    todo = list(range(len(postings)))
    alone: list[int] = []
    async with services.pool.acquire() as conn:
        for _ in range(_OPTIMISTIC_ROUNDS):
            round_ = Round()
            failed = False
            try:
                await write_purchases(services, conn, [postings[i] for i in todo], round_)
            except Exception as exc:  # noqa: BLE001 - what the round settled is kept; the rest goes alone
                log.warning(
                    "purchase batch round failed; writing its postings one by one", extra={"error": repr(exc)}
                )
                failed = True
            outcomes.update((todo[j], outcome) for j, outcome in round_.settled.items())
            alone += [todo[j] for j in round_.alone]
            todo = [i for j, i in enumerate(todo) if j not in round_.settled and j not in round_.alone]
            PURCHASE_POSTINGS.labels("optimistic").inc(len(round_.settled))
            if failed or not todo:
                break
            PURCHASE_POSTINGS.labels("retried").inc(len(todo))
    alone = sorted(alone + todo)
    for i in alone:
        outcomes[i] = await _write_alone(services, postings[i])
    PURCHASE_POSTINGS.labels("alone").inc(len(alone))
    return [outcomes[i] for i in range(len(postings))]


async def _write_alone(services: Services, posting: Posting) -> Posted | BaseException:
    """One posting in a transaction of its own; its error is returned, not raised."""
    for _ in range(2):
        try:
            async with services.pool.acquire() as conn, conn.transaction():
                return await write_purchase(services, conn, posting)
        except store.PurchaseTakenConcurrently:
            continue  # the other request has committed now: the next try replays it or refuses
        except Exception as exc:  # noqa: BLE001 - handed to this posting's request, which maps it
            return exc
    return errors.ServiceUnavailable("the purchase id is being posted concurrently; try again")


async def write_purchase(services: Services, conn: asyncpg.Connection, posting: Posting) -> Posted:
    """Write one posting inside the caller's transaction, its member locked first (so, unlike
    the optimistic batch, it cannot find its member changed)."""
    member_id = posting.purchase.member_id
    versions = await store.lock_members(conn, [member_id])
    for _ in range(2):  # a member created meanwhile by another request is locked by the 1st try
        settled = await write_purchases(services, conn, [posting])
        if settled:
            (outcome,) = settled.values()
            if isinstance(outcome, errors.KonvertError):
                raise outcome
            if outcome.version is None and member_id in versions:
                # A replay. Its purchase may be one an optimistic round committed without its
                # answer arriving (a connection lost after the commit): invalidate the cache at
                # the member's current version, as that round would have.
                outcome = msgspec.structs.replace(outcome, version=versions[member_id])
            return outcome
    raise errors.ServiceUnavailable("the member kept changing; try again")


async def write_purchases(
    services: Services, conn: asyncpg.Connection, postings: list[Posting], round_: Round | None = None
) -> dict[int, Posted | errors.KonvertError]:
    """One round of read-then-write for postings sorted by member; ``conn`` may or may not be
    in a transaction. Returns (and records in ``round_``) the outcome of each posting settled, by
    its index: written, or a replay of the purchase already recorded, or an IdempotencyConflict
    for that posting alone. Postings of members that changed since the read are not settled:
    retry them. Outside a transaction, the postings of a member with a refund debt that they
    would repay are not written either but put in ``round_.alone``: repaying takes the member's
    lots, which one self-committing statement does not do.

    A member's tier is carried from one of its new purchases to the next within the list, so the
    outcome is the same as writing them one after another.
    """
    round_ = round_ if round_ is not None else Round()
    program = services.program
    now = services.clock()
    window_start = now - timedelta(days=program.tiers.window_days) if program.tiers.levels else None
    reads = await _read(conn, postings, window_start)
    carried: dict[int, tuple[str | None, datetime | None, int]] = {}
    seen: set[tuple[str, str]] = set()
    prepared = []
    for posting, read in zip(postings, reads, strict=True):
        key = (posting.purchase.partner, posting.purchase.purchase_id)
        # Only a purchase that will really be written moves its member's tier.
        expected_new = not read["taken"] and key not in seen
        seen.add(key)
        prepared.append(
            await _prepare(
                services,
                conn,
                posting,
                read,
                read["qualifying_points"],
                carried,
                expected_new,
                now,
                window_start,
            )
        )
    in_transaction = conn.is_in_transaction()
    debtors = {
        row.member_uid
        for (row, _, new), read in zip(prepared, reads, strict=True)
        if new and row.bucket == "available" and read["points_debt"] > 0
    }
    if not in_transaction:
        round_.alone.update(i for i, (row, _, _) in enumerate(prepared) if row.member_uid in debtors)
    writing = [i for i, (row, _, new) in enumerate(prepared) if new and i not in round_.alone]
    # Only the members written to are locked and compared: a replay reads its stored response.
    versions = {reads[i]["member_uid"]: reads[i]["version"] for i in writing}
    written = await store.insert_purchases(conn, [prepared[i][0] for i in writing], versions)

    for index, i in enumerate(writing):
        if (member := written.get(index)) is not None:
            row, posting, _ = prepared[i]
            round_.settled[i] = Posted(Outcome(row.response), posting.purchase.member_id, member["version"])
    for i, (row, posting, expected_new) in enumerate(prepared):
        if not expected_new and i not in round_.alone:
            existing = await store.select_purchase_replay(
                conn, posting.purchase.partner, posting.purchase.purchase_id
            )
            if existing is None:
                continue  # repeats a posting of this batch that was not written: retry with it
            try:
                round_.settled[i] = Posted(
                    replay(existing, row.request_hash), posting.purchase.member_id, None
                )
            except errors.KonvertError as refused:
                round_.settled[i] = refused
    if in_transaction:
        for member_uid in sorted(debtors):
            member = await ledger.lock_member(conn, member_uid)
            await ledger.settle_debt(conn, member_uid, member["points_debt"])
    return round_.settled


async def _read(
    conn: asyncpg.Connection, postings: list[Posting], window_start: datetime | None
) -> list[asyncpg.Record]:
    """What write_purchases needs, creating the members seen for the first time."""
    keys = [(p.purchase.member_id, p.purchase.partner, p.purchase.purchase_id) for p in postings]
    reads = await store.read_for_purchases(conn, keys, window_start)
    unknown = sorted(
        {member_id for (member_id, _, _), read in zip(keys, reads, strict=True) if read["member_uid"] is None}
    )
    if unknown:
        async with conn.transaction():
            for member_id in unknown:
                await ledger.ensure_member(conn, member_id)
        reads = await store.read_for_purchases(conn, keys, window_start)
    return reads


async def _prepare(
    services: Services,
    conn: asyncpg.Connection,
    posting: Posting,
    member: asyncpg.Record,
    qualifying_before: int,
    carried: dict[int, tuple[str | None, datetime | None, int]],
    expected_new: bool,
    now: datetime,
    window_start: datetime | None,
) -> tuple[store.PurchaseRow, Posting, bool]:
    """The row that records one purchase: its points at the member's tier, its response, and
    the member's tier after it."""
    program = services.program
    purchase = posting.purchase
    member_uid = member["member_uid"]
    tier, below_since, qualifying = carried.get(
        member_uid,
        (
            member["tier"],
            member["tier_below_since"],
            qualifying_before if window_start else member["tier_qualifying_points"],
        ),
    )
    multiplier, tier_name = tiers.tier_multiplier(program, tier)
    earning = rules.compute_earning(program, purchase, tier_multiplier=multiplier, tier_name=tier_name)
    if window_start is not None and expected_new:
        qualifying += earning.points
        standing = tiers.evaluate_tier(program.tiers, qualifying, tier, below_since, now)
        tier, below_since = standing.tier, standing.below_since
        carried[member_uid] = (tier, below_since, qualifying)

    vests_at = purchase.occurred_at + timedelta(days=program.points.return_window_days)
    bucket = "pending" if vests_at > now else "available"
    expires_at = expiry_for(now, program.points)
    has_points = earning.points > 0
    response = _encode(
        PurchaseOut(
            purchase_id=purchase.purchase_id,
            partner=purchase.partner,
            member_id=purchase.member_id,
            currency=purchase.currency,
            points=earning.points,
            status=bucket if has_points else "none",
            vests_at=vests_at if has_points else None,
            expires_at=expires_at if has_points else None,
            lines=earning.lines,
            bonus_points=earning.bonus_points,
            bonuses=earning.bonuses,
            points_before_cap=earning.points_before_cap,
            cap_applied=earning.cap_applied,
            rules=earning.rules,
            lot_id=member["lot_id"] if has_points else None,
            transfer_id=member["transfer_id"] if has_points else None,
        )
    )
    row = store.PurchaseRow(
        partner=purchase.partner,
        purchase_id=purchase.purchase_id,
        member_uid=member_uid,
        currency=purchase.currency,
        occurred_at=purchase.occurred_at,
        total_amount=sum(line.amount for line in purchase.lines) + purchase.shipping + purchase.tax,
        points=earning.points,
        refund_state=_encode(rules.refund_state_for(purchase, earning)).decode(),
        lot_id=member["lot_id"],
        transfer_id=member["transfer_id"],
        request_hash=request_hash(purchase),
        response=response,
        bucket=bucket,
        vests_at=vests_at,
        expires_at=expires_at,
        issued_account_id=await services.accounts.id(conn, "points", f"issued:{purchase.partner}"),
        tier=tier,
        tier_below_since=below_since,
        tier_qualifying_points=qualifying,
    )
    return row, posting, expected_new


async def refund_purchase(services: Services, purchase_id: str, refund: RefundIn) -> Outcome:
    """Claw back the points the refunded lines (or amount) earned, once per refund_id."""
    async with services.pool.acquire() as conn, conn.transaction():
        partner = refund.partner or await _partner_of(conn, purchase_id)
        # The member first, then the purchase: the order of every writer that takes both (an
        # erasure locks the member, then rewrites its purchases), so the two cannot deadlock.
        member_uid = await store.select_purchase_member(conn, partner, purchase_id)
        if member_uid is None:
            raise errors.PurchaseNotFound(f"no purchase {purchase_id!r} from partner {partner!r}")
        await ledger.lock_member(conn, member_uid)
        purchase = await store.lock_purchase(conn, partner, purchase_id)
        digest = request_hash(partner, purchase_id, msgspec.structs.replace(refund, partner=partner))
        existing = await store.select_refund_replay(conn, purchase["purchase_pk"], refund.refund_id)
        if existing is not None:
            return replay(existing, digest)

        state = _decode_state(purchase["refund_state"])
        if refund.lines is not None:
            plan = rules.plan_refund_by_lines(state, refund.lines)
        else:
            assert refund.amount is not None
            plan = rules.plan_refund_by_amount(state, refund.amount)
        clawback = await _claw_back(services, conn, purchase, refund.refund_id, plan.points, refund.reason)
        new_state = rules.apply_refund(state, plan)
        response = _encode(
            RefundOut(
                refund_id=refund.refund_id,
                purchase_id=purchase_id,
                partner=partner,
                member_id=purchase["member_id"],
                amount=plan.amount,
                points=clawback.points,
                shortfall=clawback.shortfall,
                already_expired=clawback.already_expired,
                lines=[RefundLinePoints(line_id, points) for line_id, points in plan.line_points],
                bonus_points=plan.bonus_points_clawed,
                transfer_ids=clawback.transfer_ids,
                refunded_amount=new_state.refunded_amount,
                refundable_amount=new_state.total_amount - new_state.refunded_amount,
            )
        )
        await store.update_refund_state(conn, purchase["purchase_pk"], _encode(new_state))
        await store.insert_refund(
            conn,
            purchase_pk=purchase["purchase_pk"],
            refund_id=refund.refund_id,
            member_uid=purchase["member_uid"],
            amount=plan.amount,
            points=clawback.points,
            shortfall=clawback.shortfall,
            already_expired=clawback.already_expired,
            detail=_encode(plan),
            request_hash=digest,
            response=response,
        )
        if clawback.version is not None:
            # After the refund row exists: the refund lowers the qualifying points.
            await tiers.reevaluate(conn, services.program, purchase["member_uid"], services.clock())
    if clawback.version is not None:
        await services.balances.invalidate(purchase["member_id"], clawback.version)
    return Outcome(response)


async def _partner_of(conn: asyncpg.Connection, purchase_id: str) -> str:
    partners = await store.select_partners_of_purchase(conn, purchase_id)
    if not partners:
        raise errors.PurchaseNotFound(f"no purchase {purchase_id!r}")
    if len(partners) > 1:
        raise errors.Unprocessable(f"several partners have a purchase {purchase_id!r}; name the partner")
    return partners[0]


class Clawback(msgspec.Struct, frozen=True):
    points: int
    shortfall: int
    already_expired: int
    transfer_ids: list[int]
    version: int | None


async def _claw_back(
    services: Services,
    conn: asyncpg.Connection,
    purchase: asyncpg.Record,
    refund_id: str,
    points: int,
    reason: str | None,
) -> Clawback:
    """Take ``points`` back: from the purchase's own lot first (pending or available), then from
    the member's other available lots soonest-expiring first. What is still missing becomes a
    negative balance if the program allows it, else a recorded shortfall.
    """
    if points == 0:
        return Clawback(0, 0, 0, [], None)
    member_uid = purchase["member_uid"]
    await ledger.lock_member(conn, member_uid)
    own_lot = await ledger.lock_lot(conn, purchase["lot_id"]) if purchase["lot_id"] else None
    own_take = (
        min(points, own_lot["remaining"]) if own_lot is not None and own_lot["state"] != "expired" else 0
    )
    own_bucket = own_lot["state"] if own_lot is not None else "available"
    # What the purchase's lot lost to expiry was taken from the member once already.
    expired = (
        await store.select_unrefunded_expiry(conn, purchase["purchase_pk"], purchase["lot_id"])
        if own_lot
        else 0
    )
    already_expired = min(points - own_take, expired)
    other_lots = await ledger.lock_available_lots(conn, member_uid, purchase["lot_id"])
    other_takes, missing = ledger.plan_takes(other_lots, points - own_take - already_expired)
    allow_negative = services.program.points.allow_negative_balance
    debt = missing if allow_negative else 0
    shortfall = 0 if allow_negative else missing

    pending_points = own_take if own_bucket == "pending" else 0
    available_points = points - already_expired - shortfall - pending_points
    accounts = await ledger.select_member_account_ids(conn, member_uid)
    issued = await services.accounts.id(conn, "points", f"issued:{purchase['partner']}")
    cause_ref = f"{purchase['partner']}/{purchase['purchase_id']}/{refund_id}"
    transfer_ids = []
    for bucket, amount, takes in (
        ("pending", pending_points, [(own_lot["lot_id"], own_take)] if pending_points else []),
        (
            "available",
            available_points,
            ([(own_lot["lot_id"], own_take)] if own_take and not pending_points else []) + other_takes,
        ),
    ):
        if amount == 0:
            continue
        transfer_id = await ledger.insert_transfer(
            conn,
            member_uid=member_uid,
            asset="points",
            debit_account_id=accounts[bucket],
            credit_account_id=issued,
            amount=amount,
            code="refund",
            cause_type="refund",
            cause_ref=cause_ref,
            lot_id=purchase["lot_id"],
            reverses_transfer_id=purchase["transfer_id"],
            reason=reason or "points of refunded purchase",
        )
        await ledger.take_from_lots(conn, member_uid, takes, transfer_id, "refund")
        transfer_ids.append(transfer_id)
    version = await ledger.update_member_points(
        conn,
        member_uid,
        available=-available_points,
        pending=-pending_points,
        debt=debt,
        lifetime_earned=-(points - already_expired - shortfall),
    )
    return Clawback(points - already_expired - shortfall, shortfall, already_expired, transfer_ids, version)
