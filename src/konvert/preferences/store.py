"""Preferences, consents and privacy log SQL. Connection first; the use case owns the
transaction. Values travel as JSON text (asyncpg's jsonb codec is text).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import asyncpg

from konvert.db import Connection, Queryable

Conn = Queryable


# --- preferences ---------------------------------------------------------------------------


async def select_preference(conn: Conn, member_uid: int, key: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "select key, value::text as value, consent, updated_at from preferences where member_uid = $1 and key = $2",
        member_uid,
        key,
    )


async def select_preferences(conn: Conn, member_uid: int, limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        """
        select key, value::text as value, consent, updated_at from preferences
        where member_uid = $1 order by key limit $2
        """,
        member_uid,
        limit,
    )


async def upsert_preference(
    conn: Connection, member_uid: int, key: str, value: str, consent: Sequence[str], now: datetime
) -> datetime:
    updated_at: datetime = await conn.fetchval(
        """
        insert into preferences (member_uid, key, value, consent, created_at, updated_at)
        values ($1, $2, $3::jsonb, $4, $5, $5)
        on conflict (member_uid, key) do update set value = excluded.value, consent = excluded.consent,
                                                    updated_at = excluded.updated_at
        returning updated_at
        """,
        member_uid,
        key,
        value,
        list(consent),
        now,
    )
    return updated_at


async def delete_preference(conn: Connection, member_uid: int, key: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "delete from preferences where member_uid = $1 and key = $2 returning value::text as value, consent",
        member_uid,
        key,
    )


# --- awards --------------------------------------------------------------------------------


async def select_award(conn: Conn, member_uid: int, key: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        """
        select key, points, points_awarded, points_clawed_back, transfer_id, lot_id, latest_lot_id, awarded_at
        from preference_awards where member_uid = $1 and key = $2
        """,
        member_uid,
        key,
    )


async def insert_award(conn: Connection, member_uid: int, key: str, points: int, now: datetime) -> bool:
    """Record the member's first share of ``key``; False if one is recorded already."""
    status = await conn.execute(
        """
        insert into preference_awards (member_uid, key, points, awarded_at) values ($1, $2, $3, $4)
        on conflict (member_uid, key) do nothing
        """,
        member_uid,
        key,
        points,
        now,
    )
    return status.endswith(" 1")


async def add_awarded(conn: Connection, member_uid: int, key: str, points: int, transfer_id: int, lot_id: int) -> None:
    await conn.execute(
        """
        update preference_awards
        set points_awarded = points_awarded + $3, transfer_id = coalesce(transfer_id, $4),
            lot_id = coalesce(lot_id, $5), latest_lot_id = $5
        where member_uid = $1 and key = $2
        """,
        member_uid,
        key,
        points,
        transfer_id,
        lot_id,
    )


async def add_clawed_back(conn: Connection, member_uid: int, key: str, points: int) -> None:
    await conn.execute(
        "update preference_awards set points_clawed_back = points_clawed_back + $3 where member_uid = $1 and key = $2",
        member_uid,
        key,
        points,
    )


async def select_awards(conn: Conn, member_uid: int, limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        """
        select key, points, points_awarded, points_clawed_back, awarded_at from preference_awards
        where member_uid = $1 order by awarded_at, key limit $2
        """,
        member_uid,
        limit,
    )


# --- consents ------------------------------------------------------------------------------


async def select_consents(conn: Conn, member_uid: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        "select purpose, granted, changed_at, changed_by from consents where member_uid = $1 order by purpose",
        member_uid,
    )


async def upsert_consent(
    conn: Connection, member_uid: int, purpose: str, granted: bool, now: datetime, client: str
) -> None:
    await conn.execute(
        """
        insert into consents (member_uid, purpose, granted, changed_at, changed_by) values ($1, $2, $3, $4, $5)
        on conflict (member_uid, purpose) do update set granted = excluded.granted, changed_at = excluded.changed_at,
                                                        changed_by = excluded.changed_by
        """,
        member_uid,
        purpose,
        granted,
        now,
        client,
    )


# --- privacy log ---------------------------------------------------------------------------


async def insert_log(
    conn: Connection,
    *,
    member_uid: int,
    kind: str,
    subject: str | None,
    old_value: str | None,
    new_value: str | None,
    points: int,
    client: str,
    now: datetime,
) -> int:
    """The entry's log id."""
    log_id: int = await conn.fetchval(
        """
        insert into privacy_log (member_uid, kind, subject, old_value, new_value, points, client, created_at)
        values ($1, $2, $3, $4::jsonb, $5::jsonb, $6, $7, $8)
        returning log_id
        """,
        member_uid,
        kind,
        subject,
        old_value,
        new_value,
        points,
        client,
        now,
    )
    return log_id


async def select_log(conn: Conn, member_uid: int, limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        """
        select log_id, kind, subject, old_value::text as old_value, new_value::text as new_value, points, client,
               created_at
        from privacy_log where member_uid = $1 order by log_id limit $2
        """,
        member_uid,
        limit,
    )


# --- erasure --------------------------------------------------------------------------------


async def forget(conn: Connection, member_uid: int) -> None:
    """Erasure: the member's preferences and consents go, and the privacy log keeps its entries
    without their values. The log refuses every update outside an erasure's transaction."""
    await conn.execute("set local konvert.erasure = 'on'")
    await conn.execute("delete from preferences where member_uid = $1", member_uid)
    await conn.execute("delete from consents where member_uid = $1", member_uid)
    await conn.execute(
        """
        update privacy_log set old_value = null, new_value = null
        where member_uid = $1 and (old_value is not null or new_value is not null)
        """,
        member_uid,
    )
