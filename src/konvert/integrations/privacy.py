"""Integrations' part in a member's export and erasure: identity links and deliveries."""

from __future__ import annotations

from typing import Any

import msgspec

from konvert.db import Connection
from konvert.integrations import store
from konvert.integrations.service import delivery_out
from konvert.ledger.book import Book, Member


async def export(conn: Connection, member_uid: int, limit: int) -> dict[str, list[Any]]:
    """The member's identity links and the deliveries applied to them, ``limit`` of each at most."""
    links = [dict(row) for row in await store.select_member_links(conn, member_uid)][:limit]
    deliveries = [
        {"integration": row["integration"]} | msgspec.structs.asdict(delivery_out(row))
        for row in await store.select_member_deliveries(conn, member_uid, limit)
    ]
    return {"identity_links": links, "deliveries": deliveries}


async def forget(book: Book, member: Member, pseudonym: str) -> None:
    """The member's links go, with the deliveries still parked for their ids; applied deliveries
    keep their keys (so a re-sent one stays a duplicate) but no longer say whose they were."""
    await store.forget_member(book.conn, member.uid)
