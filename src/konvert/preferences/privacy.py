"""Preferences' part in a member's erasure (the export reads them through konvert.privacy)."""

from __future__ import annotations

from konvert.ledger.book import Book, Member
from konvert.preferences import store


async def forget(book: Book, member: Member, pseudonym: str) -> None:
    await store.forget(book.conn, member.uid)
