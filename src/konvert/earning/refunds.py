"""Refunding purchases: claw back exactly the points the refunded lines (or amount) earned."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from konvert import errors
from konvert.earning import rules, store
from konvert.earning.model import RefundIn, RefundLinePoints, RefundOut
from konvert.earning.privacy import REFUND_REASON
from konvert.idempotency import Outcome, replay, request_hash
from konvert.ledger import events
from konvert.ledger import store as ledger_store
from konvert.ledger.accounts import issued
from konvert.ledger.book import Book, Clawback, InTransaction, writing
from konvert.ledger.model import Cause
from konvert.tiers.service import reevaluate

if TYPE_CHECKING:
    from konvert.services import Services

_encode = msgspec.json.Encoder(decimal_format="number").encode
_decode_state = msgspec.json.Decoder(rules.PurchaseRefundState).decode


async def refund_purchase(
    services: Services, purchase_id: str, refund: RefundIn, also: InTransaction | None = None
) -> Outcome:
    """Claw back the points the refunded lines (or amount) earned, once per refund_id: from the
    purchase's own lot first (pending or available), then the member's other available lots.
    ``also`` runs in the same transaction, after the refund (or its replay)."""
    async with writing(services) as book:
        outcome = await _refund(services, book, purchase_id, refund)
        if also is not None:
            await also(book, outcome)
    return outcome


async def _refund(services: Services, book: Book, purchase_id: str, refund: RefundIn) -> Outcome:
    partner = refund.partner or await _partner_of(book.conn, purchase_id)
    # The member first, then the purchase (which serialises refunds of one purchase): the
    # order of every writer that takes both, so that none of them deadlock.
    member_uid = await store.select_purchase_member(book.conn, partner, purchase_id)
    if member_uid is None:
        raise errors.PurchaseNotFound(f"no purchase {purchase_id!r} from partner {partner!r}")
    member = await book.member_by_uid(member_uid)
    purchase = await store.lock_purchase(book.conn, member_uid, partner, purchase_id)
    digest = request_hash(partner, purchase_id, msgspec.structs.replace(refund, partner=partner))
    existing = await store.select_refund_replay(book.conn, member_uid, purchase["purchase_pk"], refund.refund_id)
    if existing is not None:
        return replay(existing, digest)

    state = _decode_state(purchase["refund_state"])
    plan = _plan(state, refund)
    # What the purchase's lot lost to expiry was taken from the member once already.
    already_expired = 0
    if purchase["lot_id"] is not None:
        expired = await ledger_store.select_expired_from_lot(book.conn, member_uid, purchase["lot_id"])
        counted = await store.select_expiry_refunded(book.conn, member_uid, purchase["purchase_pk"])
        already_expired = min(plan.points, expired - counted)
    clawback = await book.claw_back(
        member,
        plan.points - already_expired,
        own_lot_id=purchase["lot_id"],
        to=issued(partner),
        code="refund",
        cause=Cause("refund", f"{partner}/{purchase_id}/{refund.refund_id}"),
        reverses_transfer_id=purchase["transfer_id"],
        reason=refund.reason or REFUND_REASON,
        allow_negative=services.program.points.allow_negative_balance,
        lifetime=True,
    )
    new_state = rules.apply_refund(state, plan)
    response = _response(
        refund, purchase_id, partner, purchase["member_id"], plan, clawback, already_expired, new_state
    )
    await store.update_refund_state(book.conn, member_uid, purchase["purchase_pk"], _encode(new_state))
    await store.insert_refund(
        book.conn,
        store.RefundRow(
            purchase_pk=purchase["purchase_pk"],
            refund_id=refund.refund_id,
            member_uid=member_uid,
            amount=plan.amount,
            points=clawback.points,
            shortfall=clawback.shortfall,
            already_expired=already_expired,
            detail=_encode(plan),
            request_hash=digest,
            response=response,
        ),
    )
    refunded = events.PointsRefunded(
        partner=partner,
        purchase_id=purchase_id,
        refund_id=refund.refund_id,
        points=clawback.points,
        shortfall=clawback.shortfall,
        debt=clawback.debt,
        balance=book.balance(member),
    )
    book.announce(member, "points.refunded", refunded)
    if clawback.transfer_ids:
        # After the refund row exists: the refund lowers the qualifying points.
        await reevaluate(services, book, member, services.clock())  # (a clawback leaves tiers as they were)
    return Outcome(response)


def _plan(state: rules.PurchaseRefundState, refund: RefundIn) -> rules.RefundPlan:
    if refund.lines is not None:
        return rules.plan_refund_by_lines(state, refund.lines)
    if refund.amount is not None:
        return rules.plan_refund_by_amount(state, refund.amount)
    target = state.total_amount if refund.remaining else refund.refunded_amount
    assert target is not None
    if target <= state.refunded_amount:
        raise errors.AlreadyRefunded(
            f"the purchase was refunded {state.refunded_amount} minor units already",
            refunded_amount=state.refunded_amount,
        )
    return rules.plan_refund_by_amount(state, target - state.refunded_amount)


def _response(
    refund: RefundIn,
    purchase_id: str,
    partner: str,
    member_id: str,
    plan: rules.RefundPlan,
    clawback: Clawback,
    already_expired: int,
    state: rules.PurchaseRefundState,
) -> bytes:
    return _encode(
        RefundOut(
            refund_id=refund.refund_id,
            purchase_id=purchase_id,
            partner=partner,
            member_id=member_id,
            amount=plan.amount,
            points=clawback.points,
            shortfall=clawback.shortfall,
            already_expired=already_expired,
            lines=[RefundLinePoints(line_id, points) for line_id, points in plan.line_points],
            bonus_points=plan.bonus_points_clawed,
            transfer_ids=clawback.transfer_ids,
            refunded_amount=state.refunded_amount,
            refundable_amount=state.total_amount - state.refunded_amount,
        )
    )


async def _partner_of(conn: store.Conn, purchase_id: str) -> str:
    partners = await store.select_partners_of_purchase(conn, purchase_id)
    if not partners:
        raise errors.PurchaseNotFound(f"no purchase {purchase_id!r}")
    if len(partners) > 1:
        raise errors.Unprocessable(f"several partners have a purchase {purchase_id!r}; name the partner")
    return partners[0]
