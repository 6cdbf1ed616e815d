"""Reputation SQL: kudos, reputation entries, the floor. Plain async functions, connection first.

None of these commit: the use case owns the transaction. Every write here happens after the
use case has locked the rows of the members it touches (konvert.ledger.store.lock_member, in
member_uid order), and a kudos row only changes under its author's lock.

Lock order: an acceptance first takes its thread's lock (lock_thread), then members, then lots.
Only acceptances take a thread lock, one each, before anything else, so this extends the
project's order (members, then what they own) without any possible cycle.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime

import asyncpg

from konvert.db import Connection, Queryable, one
from konvert.ledger.store import select_member_uid

_KUDOS_COLUMNS = """
    k.kudos_pk, k.kudos_id, k.source, k.post_id, k.thread_id, k.author_uid, k.giver_uid,
    a.member_id as author_id, g.member_id as giver_id, k.kind, k.occurred_at, k.day, k.status,
    k.not_counted_reason, k.value, k.accepter_value, k.author_credited, k.accepter_credited,
    k.bridge_points, k.bridge_shortfall, k.bridge_lot_id, k.bridge_transfer_id,
    k.request_hash, k.response, k.retraction_response
"""
_KUDOS_FROM = """
    from kudos k join members a on a.member_uid = k.author_uid join members g on g.member_uid = k.giver_uid
"""


async def select_kudos(conn: Connection, kudos_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow(f"select {_KUDOS_COLUMNS} {_KUDOS_FROM} where k.kudos_id = $1", kudos_id)


async def select_kudos_by_pk(conn: Connection, kudos_pk: int) -> asyncpg.Record:
    return one(await conn.fetchrow(f"select {_KUDOS_COLUMNS} {_KUDOS_FROM} where k.kudos_pk = $1", kudos_pk))


async def select_kudos_by_key(
    conn: Connection, source: str, post_id: str, giver_uid: int, kind: str
) -> asyncpg.Record | None:
    """The standing kudos with this natural key, else the most recent one that no longer stands."""
    return await conn.fetchrow(
        f"""
        select {_KUDOS_COLUMNS} {_KUDOS_FROM}
        where k.source = $1 and k.post_id = $2 and k.giver_uid = $3 and k.kind = $4
        order by k.status = 'standing' desc, k.kudos_pk desc
        limit 1
        """,
        source,
        post_id,
        giver_uid,
        kind,
    )


async def select_standing_kudos_id(
    conn: Connection, source: str, post_id: str, giver_uid: int, kind: str
) -> str | None:
    value: str | None = await conn.fetchval(
        """
        select kudos_id from kudos
        where source = $1 and post_id = $2 and giver_uid = $3 and kind = $4 and status = 'standing'
        """,
        source,
        post_id,
        giver_uid,
        kind,
    )
    return value


async def select_thread_accepted(conn: Connection, source: str, thread_id: str) -> asyncpg.Record | None:
    """The thread's standing accepted answer, if any."""
    return await conn.fetchrow(
        f"""
        select {_KUDOS_COLUMNS} {_KUDOS_FROM}
        where k.source = $1 and k.thread_id = $2 and k.kind = 'accepted_answer' and k.status = 'standing'
        """,
        source,
        thread_id,
    )


async def lock_thread(conn: Connection, source: str, thread_id: str) -> None:
    """Serialize acceptances in one thread until the transaction ends.

    Without it, acceptances in one thread by different members lock disjoint member rows and
    meet only on the one-accepted-answer index, over and over under a burst.
    """
    await conn.execute(
        "select pg_advisory_xact_lock(hashtext('konvert.kudos.thread'), hashtext($1 || '/' || $2))",
        source,
        thread_id,
    )


async def count_kudos_given(conn: Connection, giver_uid: int, day: date) -> int:
    """Kudos the giver gave on a UTC day, standing or not."""
    value: int = await conn.fetchval("select count(*) from kudos where giver_uid = $1 and day = $2", giver_uid, day)
    return value


async def select_member_since(conn: Connection, member_uid: int) -> datetime:
    value: datetime = await conn.fetchval("select created_at from members where member_uid = $1", member_uid)
    return value


async def insert_kudos(
    conn: Connection,
    *,
    kudos_id: str,
    source: str,
    post_id: str,
    thread_id: str,
    author_uid: int,
    giver_uid: int,
    kind: str,
    occurred_at: datetime,
    day: date,
    status: str,
    not_counted_reason: str | None,
    value: int,
    accepter_value: int,
    superseded_by_pk: int | None,
    request_hash: bytes,
) -> int:
    """Insert a kudos crediting nothing yet; the use case credits it. Its response comes last."""
    kudos_pk: int = await conn.fetchval(
        """
        insert into kudos (kudos_id, source, post_id, thread_id, author_uid, giver_uid, kind, occurred_at, day,
                           status, not_counted_reason, value, accepter_value, superseded_by_pk, request_hash,
                           response)
        values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, '')
        returning kudos_pk
        """,
        kudos_id,
        source,
        post_id,
        thread_id,
        author_uid,
        giver_uid,
        kind,
        occurred_at,
        day,
        status,
        not_counted_reason,
        value,
        accepter_value,
        superseded_by_pk,
        request_hash,
    )
    return kudos_pk


async def update_kudos_status(
    conn: Connection, kudos_pk: int, status: str, superseded_by_pk: int | None = None
) -> None:
    await conn.execute(
        """
        update kudos
        set status = $2, superseded_by_pk = coalesce($3, superseded_by_pk),
            retracted_at = case when $2 = 'retracted' then now() else retracted_at end
        where kudos_pk = $1
        """,
        kudos_pk,
        status,
        superseded_by_pk,
    )


async def add_kudos_credit(conn: Connection, kudos_pk: int, role: str, change: int) -> None:
    column = "author_credited" if role == "author" else "accepter_credited"
    await conn.execute(f"update kudos set {column} = {column} + $2 where kudos_pk = $1", kudos_pk, change)


async def set_kudos_response(conn: Connection, kudos_pk: int, response: bytes) -> None:
    await conn.execute("update kudos set response = $2 where kudos_pk = $1", kudos_pk, response)


async def set_retraction_response(conn: Connection, kudos_pk: int, response: bytes) -> None:
    await conn.execute("update kudos set retraction_response = $2 where kudos_pk = $1", kudos_pk, response)


async def select_day_shares(conn: Connection, author_uid: int, day: date, cap: int) -> list[asyncpg.Record]:
    """The author's standing likes and helpful marks of a day whose share of the cap may change.

    Each row carries ``worth_before``: what the kudos before it (in canonical order) are worth.
    Rows crediting nothing with the cap already full before them are left out: whatever changes,
    they still credit nothing. What is returned is the credited ones plus the first ones past
    the cap, so the work stays proportional to the cap, not to a popular member's day.
    """
    return await conn.fetch(
        """
        select kudos_pk, kudos_id, source, value, author_credited, worth_before from (
            select kudos_pk, kudos_id, source, occurred_at, value, author_credited,
                   coalesce(sum(value) over (order by occurred_at, kudos_id collate "C"
                                             rows between unbounded preceding and 1 preceding), 0) as worth_before
            from kudos
            where author_uid = $1 and day = $2 and status = 'standing' and kind in ('like', 'helpful')
        ) day
        where author_credited > 0 or worth_before < $3
        order by occurred_at, kudos_id collate "C"
        """,
        author_uid,
        day,
        cap,
    )


async def select_first_award_transfer(conn: Connection, kudos_pk: int, role: str) -> int | None:
    """The first ledger credit a kudos made to a member in this role: what its reversals point at."""
    value: int | None = await conn.fetchval(
        """
        select transfer_id from reputation_entries
        where kudos_pk = $1 and role = $2 and posted > 0
        order by entry_id limit 1
        """,
        kudos_pk,
        role,
    )
    return value


async def insert_entry(
    conn: Connection,
    *,
    member_uid: int,
    kudos_pk: int,
    role: str,
    source: str,
    day: date,
    reason: str,
    change: int,
    posted: int,
    transfer_id: int | None,
    cause_kudos_pk: int,
) -> None:
    await conn.execute(
        """
        insert into reputation_entries (member_uid, kudos_pk, role, source, day, reason, change, posted,
                                        transfer_id, cause_kudos_pk)
        values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
        """,
        member_uid,
        kudos_pk,
        role,
        source,
        day,
        reason,
        change,
        posted,
        transfer_id,
        cause_kudos_pk,
    )


async def select_floor_kept(conn: Connection, member_uid: int) -> int:
    value: int = await conn.fetchval(
        "select coalesce((select floor_kept from reputation_members where member_uid = $1), 0)", member_uid
    )
    return value


async def set_floor_kept(conn: Connection, member_uid: int, floor_kept: int) -> None:
    await conn.execute(
        """
        insert into reputation_members (member_uid, floor_kept) values ($1, $2)
        on conflict (member_uid) do update set floor_kept = excluded.floor_kept, updated_at = now()
        """,
        member_uid,
        floor_kept,
    )


# --- the points bridge ----------------------------------------------------------------------


async def set_kudos_bridge(
    conn: Connection,
    kudos_pk: int,
    *,
    points: int,
    shortfall: int = 0,
    lot_id: int | None = None,
    transfer_id: int | None = None,
) -> None:
    await conn.execute(
        """
        update kudos
        set bridge_points = $2, bridge_shortfall = bridge_shortfall + $3,
            bridge_lot_id = coalesce($4, bridge_lot_id), bridge_transfer_id = coalesce($5, bridge_transfer_id)
        where kudos_pk = $1
        """,
        kudos_pk,
        points,
        shortfall,
        lot_id,
        transfer_id,
    )


# --- reads ----------------------------------------------------------------------------------


async def select_member_reputation(conn: Queryable, member_id: str) -> asyncpg.Record | None:
    member_uid = await select_member_uid(conn, member_id)
    if member_uid is None:
        return None
    return await conn.fetchrow(
        """
        select m.member_uid, m.member_id, m.reputation, coalesce(r.floor_kept, 0) as floor_kept
        from members m left join reputation_members r using (member_uid)
        where m.member_uid = $1
        """,
        member_uid,
    )


async def select_breakdown(conn: Queryable, member_uid: int) -> list[asyncpg.Record]:
    """What the member's standing kudos credit, by source and kind (accepter: for accepting answers)."""
    return await conn.fetch(
        """
        select source, kind, sum(credited)::bigint as reputation from (
            select source, kind, author_credited as credited from kudos
            where author_uid = $1 and status = 'standing' and author_credited > 0
            union all
            select source, 'accepter', accepter_credited from kudos
            where giver_uid = $1 and status = 'standing' and accepter_credited > 0
        ) credits
        group by source, kind
        order by source, kind
        """,
        member_uid,
    )


async def select_day_totals(conn: Queryable, member_uid: int, day: date) -> asyncpg.Record:
    return one(
        await conn.fetchrow(
            """
        select coalesce(sum(value), 0)::bigint as before_cap, coalesce(sum(author_credited), 0)::bigint as capped
        from kudos
        where author_uid = $1 and day = $2 and status = 'standing' and kind in ('like', 'helpful')
        """,
            member_uid,
            day,
        )
    )


async def select_member_ids(conn: Queryable, member_uids: Sequence[int]) -> dict[int, str]:
    rows = await conn.fetch(
        "select member_uid, member_id from members where member_uid = any($1::bigint[])", list(member_uids)
    )
    return {r["member_uid"]: r["member_id"] for r in rows}


# The leaderboards, as PostgreSQL knows them: reputation moved per board, source and member
# (erased members are left out).
# Weeks and months from the given first days on (the current periods, and any later one a
# kudos from a clock a little ahead may already have touched).
LEADERBOARD_SCORES = """
    with e as (
        select member_uid, source, day, posted from reputation_entries
        where posted <> 0 and member_uid not in (select member_uid from members where erased_at is not null)
    ), boards as (
        select 'all' as board, source, member_uid, posted from e
        union all
        select 'week:' || to_char(day, 'IYYY-"W"IW'), source, member_uid, posted from e where day >= $1
        union all
        select 'month:' || to_char(day, 'YYYY-MM'), source, member_uid, posted from e where day >= $2
    )
    select board, coalesce(source, '*') as source, member_uid, sum(posted)::bigint as score
    from boards
    group by grouping sets ((board, source, member_uid), (board, member_uid))
    having sum(posted) <> 0
"""


# --- export and erasure --------------------------------------------------------------------

# The member's rows of each table, as JSON objects, for the export: (name in the export, table,
# column naming the member, columns left out). Idempotency blobs and other members' internal ids
# are left out.
EXPORTED: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("kudos_received", "kudos", "author_uid", ("giver_uid",)),
    ("kudos_given", "kudos", "giver_uid", ("author_uid",)),
    ("reputation_entries", "reputation_entries", "member_uid", ()),
)
_NEVER_EXPORTED = ("member_uid", "request_hash", "response", "retraction_response")


async def select_exported(
    conn: Connection, table: str, member_column: str, left_out: Sequence[str], member_uid: int, limit: int
) -> list[str]:
    """Rows of ``table`` naming the member in ``member_column``, as JSON objects (text); ``table``
    and ``member_column`` come from EXPORTED, never from a request."""
    rows = await conn.fetch(
        f"select (to_jsonb(t) - $3::text[])::text from {table} t where {member_column} = $1 limit $2",
        member_uid,
        limit,
        [*_NEVER_EXPORTED, *left_out],
    )
    return [row[0] for row in rows]


# The member id ($2) replaced by the pseudonym ($3) wherever it is a whole JSON string in a column,
# matched in PostgreSQL's own encoding of it.
_RENAMED_BYTEA = (
    "convert_to(replace(convert_from({column}, 'UTF8')::jsonb::text, to_jsonb($2::text)::text, "
    "to_jsonb($3::text)::text), 'UTF8')"
)


async def rename_in_kudos(
    conn: Connection, member_uid: int, old_member_id: str, pseudonym: str, erased_hash: bytes
) -> None:
    """Kudos keep their stored responses (which name author and giver), with the pseudonym
    instead of the member id; the member's kudos requests cannot be replayed."""
    await conn.execute(
        f"""
        update kudos set response = {_RENAMED_BYTEA.format(column="response")},
                         retraction_response = {_RENAMED_BYTEA.format(column="retraction_response")},
                         request_hash = $4
        where author_uid = $1 or giver_uid = $1
        """,
        member_uid,
        old_member_id,
        pseudonym,
        erased_hash,
    )
