"""Redemption's part in a member's erasure."""

from __future__ import annotations

import msgspec

from konvert.idempotency import ERASED_REQUEST_HASH
from konvert.ledger.book import Book, Member
from konvert.redemption import store

_encode = msgspec.json.Encoder().encode


async def forget(book: Book, member: Member, pseudonym: str) -> None:
    """Notes go, from redemptions and from the reasons of their transfers; stored responses get
    the pseudonym, and old requests can no longer be replayed."""
    noted = await store.select_noted_transfers(book.conn, member.uid)
    reasons = [
        (row["transfer_id"], f"reward {row['reward_id']}" if row["reward_id"] else "points payment") for row in noted
    ]
    await book.replace_transfer_reasons(member, reasons)
    await store.forget_requests(book.conn, member.uid, ERASED_REQUEST_HASH, _encode({"member_id": pseudonym}).decode())
