"""Earning's part in a member's export and erasure."""

from __future__ import annotations

import msgspec

from konvert.earning import store
from konvert.idempotency import ERASED_REQUEST_HASH
from konvert.ledger.book import Book, Member

_encode = msgspec.json.Encoder().encode

# What a refund's transfer says once its client's free-text reason is erased.
REFUND_REASON = "points of refunded purchase"


async def forget(book: Book, member: Member, pseudonym: str) -> None:
    """Stored responses name the member: the pseudonym goes in, and old requests can no longer be
    replayed. Refund reasons were the client's free text."""
    renamed = _encode({"member_id": pseudonym}).decode()
    await store.forget_requests(book.conn, member.uid, ERASED_REQUEST_HASH, renamed)
    await book.reset_transfer_reasons(member, "refund", REFUND_REASON)
