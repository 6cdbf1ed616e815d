"""Preferences, consents, the privacy log, export reads and erasure SQL. Connection first; the
use case owns the transaction. Values travel as JSON text (asyncpg's jsonb codec is text).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import asyncpg
import msgspec

Conn = asyncpg.Connection | asyncpg.Pool
_encode_json = msgspec.json.Encoder().encode

# Written over an erased member's idempotency digests: no SHA-256 digest is one byte long, so a
# replay of one of their old requests is refused (409) instead of answered with their data.
ERASED_REQUEST_HASH = b"\x00"
# A stored JSON response with the fields of $3 (a JSON object) written over its own.
_PATCHED_RESPONSE = "convert_to((convert_from(response, 'UTF8')::jsonb || $3::jsonb)::text, 'UTF8')"


# --- members -------------------------------------------------------------------------------


async def select_erased_at(conn: Conn, member_uid: int) -> datetime | None:
    return await conn.fetchval("select erased_at from members where member_uid = $1", member_uid)


async def select_live_member_uid(conn: Conn, member_id: str) -> int | None:
    """The member's uid, unless there is no such member or it is an erased member's pseudonym."""
    return await conn.fetchval(
        "select member_uid from members where member_id = $1 and erased_at is null", member_id
    )


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
    conn: asyncpg.Connection, member_uid: int, key: str, value: str, consent: Sequence[str], now: datetime
) -> datetime:
    return await conn.fetchval(
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


async def delete_preference(conn: asyncpg.Connection, member_uid: int, key: str) -> asyncpg.Record | None:
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


async def insert_award(conn: asyncpg.Connection, member_uid: int, key: str, points: int, now: datetime) -> bool:
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


async def add_awarded(
    conn: asyncpg.Connection, member_uid: int, key: str, points: int, transfer_id: int, lot_id: int
) -> None:
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


async def add_clawed_back(conn: asyncpg.Connection, member_uid: int, key: str, points: int) -> None:
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
    conn: asyncpg.Connection, member_uid: int, purpose: str, granted: bool, now: datetime, client: str
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
    conn: asyncpg.Connection,
    *,
    member_uid: int,
    kind: str,
    subject: str | None,
    old_value: str | None,
    new_value: str | None,
    points: int,
    client: str,
    now: datetime,
) -> None:
    await conn.execute(
        """
        insert into privacy_log (member_uid, kind, subject, old_value, new_value, points, client, created_at)
        values ($1, $2, $3, $4::jsonb, $5::jsonb, $6, $7, $8)
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


# --- export --------------------------------------------------------------------------------


async def select_member_for_export(conn: Conn, member_uid: int) -> asyncpg.Record:
    return await conn.fetchrow(
        """
        select member_id, created_at, tier, points_available, points_pending, points_held, points_debt,
               points_lifetime_earned, reputation
        from members where member_uid = $1
        """,
        member_uid,
    )


async def select_lots(conn: Conn, member_uid: int, limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        """
        select lot_id, amount, remaining, state, vests_at, expires_at, created_at from lots
        where member_uid = $1 order by lot_id limit $2
        """,
        member_uid,
        limit,
    )


async def select_purchases(conn: Conn, member_uid: int, limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        """
        select p.partner, p.purchase_id, p.currency, p.occurred_at, p.total_amount, p.points, p.created_at,
               coalesce((
                   select json_agg(json_build_object('refund_id', r.refund_id, 'amount', r.amount,
                                                     'points', r.points, 'shortfall', r.shortfall,
                                                     'created_at', r.created_at) order by r.refund_pk)
                   from refunds r where r.purchase_pk = p.purchase_pk
               ), '[]')::text as refunds
        from purchases p where p.member_uid = $1 order by p.purchase_pk limit $2
        """,
        member_uid,
        limit,
    )


async def select_redemptions(conn: Conn, member_uid: int, limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        """
        select redemption_id, reward_id, points, status, note, created_at, updated_at from redemptions
        where member_uid = $1 order by redemption_pk limit $2
        """,
        member_uid,
        limit,
    )


async def select_adjustments(conn: Conn, member_uid: int, limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        """
        select adjustment_id, points, reason_code, note, key_name as made_by, created_at from adjustments
        where member_uid = $1 order by adjustment_pk limit $2
        """,
        member_uid,
        limit,
    )


async def table_exists(conn: Conn, table: str) -> bool:
    return await conn.fetchval("select to_regclass($1) is not null", table)


# Member-scoped tables of optional features (reputation), read as whole rows so the export
# keeps up with their columns. Idempotency blobs and other members' internal ids are left out.
# (name in the export, table, column naming the member, columns left out)
OPTIONAL_MEMBER_TABLES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("kudos_received", "kudos", "author_uid", ("giver_uid",)),
    ("kudos_given", "kudos", "giver_uid", ("author_uid",)),
    ("reputation_entries", "reputation_entries", "member_uid", ()),
    ("events", "events", "member_uid", ()),
)
_ALWAYS_LEFT_OUT = ("member_uid", "request_hash", "response", "retraction_response")


async def select_optional_rows(
    conn: Conn, table: str, member_column: str, left_out: Sequence[str], member_uid: int, limit: int
) -> list[str]:
    """Rows of ``table`` naming the member in ``member_column``, as JSON objects (text).

    ``table`` and ``member_column`` come from OPTIONAL_MEMBER_TABLES, never from a request.
    """
    rows = await conn.fetch(
        f"""
        select (to_jsonb(t) - $3::text[])::text from {table} t
        where {member_column} = $1 limit $2
        """,  # noqa: S608 - constant identifiers only
        member_uid,
        limit,
        [*_ALWAYS_LEFT_OUT, *left_out],
    )
    return [r[0] for r in rows]


# --- erasure -------------------------------------------------------------------------------


async def erase_member(
    conn: asyncpg.Connection, member_uid: int, old_member_id: str, pseudonym: str, now: datetime
) -> int:
    """Remove the member's personal data and rename them to ``pseudonym``; return the new version.

    Needs the member's row lock and ``set local konvert.erasure = 'on'`` (for the privacy log).
    Amounts, accounts, lots and transfers stay, so the books still balance; what they said about
    the person (free-text notes and reasons, the member id in stored responses) goes.
    """
    await conn.execute("delete from preferences where member_uid = $1", member_uid)
    await conn.execute("delete from consents where member_uid = $1", member_uid)
    await conn.execute(
        """
        update privacy_log set old_value = null, new_value = null
        where member_uid = $1 and (old_value is not null or new_value is not null)
        """,
        member_uid,
    )
    # Transfer reasons that carried a client's free text: back to what they say without it.
    await conn.execute(
        """
        update transfers t set reason = case when r.reward_id is not null then 'reward ' || r.reward_id
                                             else 'points payment' end
        from redemptions r
        where r.member_uid = $1 and t.transfer_id = r.transfer_id and t.member_uid = $1 and r.note is not null
        """,
        member_uid,
    )
    await conn.execute(
        """
        update transfers t set reason = a.reason_code
        from adjustments a
        where a.member_uid = $1 and t.transfer_id = a.transfer_id and t.member_uid = $1 and a.note <> ''
        """,
        member_uid,
    )
    await conn.execute(
        """
        update transfers set reason = 'points of refunded purchase'
        where member_uid = $1 and cause_type = 'refund' and reason is distinct from 'points of refunded purchase'
        """,
        member_uid,
    )
    # Stored idempotency responses name the member (and an adjustment's note); their digests
    # are replaced so that an old request can never be replayed into the pseudonym.
    renamed = _encode_json({"member_id": pseudonym}).decode()
    for table in ("purchases", "refunds", "redemptions"):
        await conn.execute(
            f"update {table} set request_hash = $2, response = {_PATCHED_RESPONSE} where member_uid = $1",  # noqa: S608
            member_uid,
            ERASED_REQUEST_HASH,
            renamed,
        )
    await conn.execute(
        f"update adjustments set note = '', request_hash = $2, response = {_PATCHED_RESPONSE} where member_uid = $1",
        member_uid,
        ERASED_REQUEST_HASH,
        _encode_json({"member_id": pseudonym, "note": ""}).decode(),
    )
    await conn.execute("update redemptions set note = null where member_uid = $1 and note is not null", member_uid)
    return await conn.fetchval(
        """
        update members set member_id = $2, erased_at = $3, version = version + 1
        where member_uid = $1 returning version
        """,
        member_uid,
        pseudonym,
        now,
    )


# For other features' erasure steps: replace a member id ($2) by the pseudonym ($3) wherever it is
# a whole JSON string in a column. Both parse the JSON first, so that the member id is matched in
# PostgreSQL's own encoding of it.
RENAMED_JSONB = "replace({column}::text, to_jsonb($2::text)::text, to_jsonb($3::text)::text)::jsonb"
RENAMED_BYTEA = (
    "convert_to(replace(convert_from({column}, 'UTF8')::jsonb::text, to_jsonb($2::text)::text, "
    "to_jsonb($3::text)::text), 'UTF8')"
)
