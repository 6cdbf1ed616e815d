"""Adjustments: an operator's correction of a member's points, with a reason code from the
program file; the API key that made it is recorded."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from konvert import errors
from konvert.auth import Principal
from konvert.idempotency import ERASED_REQUEST_HASH, Outcome, replay, request_hash
from konvert.ledger import events, store
from konvert.ledger.accounts import ADJUSTMENTS
from konvert.ledger.book import Book, Member, writing
from konvert.ledger.model import AdjustmentIn, AdjustmentOut, Cause
from konvert.ledger.rules import expiry_for

if TYPE_CHECKING:
    from konvert.services import Services

_encode = msgspec.json.Encoder().encode


async def adjust(services: Services, member_id: str, adjustment: AdjustmentIn, principal: Principal) -> Outcome:
    """A credit is a new lot (available at once, expiring like any other); a debit takes available
    points soonest-expiring first and never overdraws. Once per adjustment_id."""
    reason_codes = services.program.adjustments.reason_codes
    if adjustment.reason_code not in reason_codes:
        raise errors.ValidationFailed(
            f"reason_code must be one of {', '.join(reason_codes)}",
            errors=[{"field": "reason_code", "message": "unknown reason code"}],
        )
    now = services.clock()
    digest = request_hash(member_id, adjustment)
    # A replay or a refused one is answered before the member is created: a refusal changes nothing.
    if (existing := await store.select_adjustment_replay(services.pool, adjustment.adjustment_id)) is not None:
        return replay(existing, digest)
    cause = Cause("adjustment", adjustment.adjustment_id)
    reason = f"{adjustment.reason_code}: {adjustment.note}" if adjustment.note else adjustment.reason_code
    points = abs(adjustment.points)
    async with writing(services) as book:
        member = await book.member(member_id, create=True)
        assert member is not None
        # Under the member's lock: a concurrent identical request has committed by now.
        if (existing := await store.select_adjustment_replay(book.conn, adjustment.adjustment_id)) is not None:
            return replay(existing, digest)
        lot_id = None
        if adjustment.points > 0:
            expires_at = expiry_for(now, services.program.points)
            credit = await book.credit(
                member,
                points,
                source=ADJUSTMENTS,
                code="adjust",
                cause=cause,
                reason=reason,
                expires_at=expires_at,
                vests_at=now,
                lifetime=False,
                announce=False,  # announced as points.adjusted
            )
            transfer_id, lot_id = credit.transfer_id, credit.lot_id
        else:
            spend = await book.spend(member, points, to=ADJUSTMENTS, code="adjust", cause=cause, reason=reason)
            transfer_id = spend.transfer_id
        adjusted = events.PointsAdjusted(
            adjustment_id=adjustment.adjustment_id,
            points=adjustment.points,
            reason_code=adjustment.reason_code,
            transfer_id=transfer_id,
            balance=book.balance(member),
        )
        book.announce(member, "points.adjusted", adjusted)
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
            book.conn,
            adjustment_id=adjustment.adjustment_id,
            member_uid=member.uid,
            points=adjustment.points,
            reason_code=adjustment.reason_code,
            note=adjustment.note,
            key_id=principal.key_id,
            key_name=principal.name,
            transfer_id=transfer_id,
            request_hash=digest,
            response=response,
        )
    return Outcome(response)


async def forget(book: Book, member: Member, pseudonym: str) -> None:
    """The adjustments' part in erasing a member: notes go, responses get the pseudonym."""
    renamed = _encode({"member_id": pseudonym, "note": ""}).decode()
    await store.forget_adjustments(book.conn, member.uid, ERASED_REQUEST_HASH, renamed)
