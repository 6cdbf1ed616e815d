"""Reputation's part in a member's export and erasure."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from konvert.db import Connection
from konvert.idempotency import ERASED_REQUEST_HASH
from konvert.ledger.book import Book, Member
from konvert.reputation import store
from konvert.reputation.leaderboard import Leaderboards

if TYPE_CHECKING:
    from konvert.services import Services


async def export(conn: Connection, member_uid: int, limit: int) -> dict[str, list[Any]]:
    """The member's kudos (received and given), and reputation entries, ``limit`` rows of
    each at most, by name in the export."""
    return {
        name: [
            msgspec.json.decode(row)
            for row in await store.select_exported(conn, table, condition, left_out, member_uid, limit)
        ]
        for name, table, condition, left_out in store.EXPORTED
    }


async def forget(book: Book, member: Member, pseudonym: str) -> None:
    await store.rename_in_kudos(book.conn, member.uid, member.id, pseudonym, ERASED_REQUEST_HASH)


async def rebuild_leaderboards(services: Services, old_member_id: str, pseudonym: str | None) -> None:
    """After an erasure: drop the leaderboards' build marker, so the next read rebuilds them
    without the erased member."""
    if pseudonym is None:
        return
    keys = await services.shared(Leaderboards).keys(services.pool)
    await services.redis.delete(keys.marker)
