"""Reputation SQL: kudos, reputation entries, the floor. Plain async functions, connection first.

None of these commit: the use case owns the transaction. Every write here happens after the
use case has locked the rows of the members it touches (konvert.ledger.store.lock_member, in
member_uid order), and a kudos row only changes under its author's lock.

Where the rows live (konvert.distribution): a kudos with its author (``author_uid``); what its
giver needs (one standing kudos per post and kind, the daily count, retraction by post) in
``kudos_given``, with the giver; its ``kudos_id`` in ``natural_keys``; a thread's standing
acceptance in ``kudos_threads``. Every statement names the member (or the key) of the rows it
reads, so that it runs on one shard; the rows of a kudos on other shards are written by the
same statement (``insert_kudos``, ``update_kudos_status``), each part naming its own member.

Lock order: an acceptance first takes its thread's lock (lock_thread), then members, then lots.
Only acceptances take a thread lock, one each, before anything else, so this extends the
project's order (members, then what they own) without any possible cycle.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from typing import NamedTuple

import asyncpg

from konvert.db import Connection, Queryable, Row, one
from konvert.ledger import keys
from konvert.ledger.store import select_member_uid

_KUDOS_COLUMNS = """
    k.kudos_pk, k.kudos_id, k.source, k.post_id, k.thread_id, k.author_uid, k.giver_uid,
    a.member_id as author_id, k.kind, k.occurred_at, k.day, k.status,
    k.not_counted_reason, k.value, k.accepter_value, k.author_credited, k.accepter_credited,
    k.bridge_points, k.bridge_shortfall, k.bridge_lot_id, k.bridge_transfer_id,
    k.request_hash, k.response, k.retraction_response
"""
_KUDOS_FROM = """
    from kudos k join members a on a.member_uid = k.author_uid
"""


async def select_kudos(conn: Connection, kudos_id: str) -> asyncpg.Record | None:
    """The kudos recorded under ``kudos_id``: its author from the id's claim, then the row."""
    author_uid = await keys.select_key_member(conn, keys.KUDOS, kudos_id)
    if author_uid is None:
        return None
    return await conn.fetchrow(
        f"select {_KUDOS_COLUMNS} {_KUDOS_FROM} where k.author_uid = $1 and k.kudos_id = $2", author_uid, kudos_id
    )


async def select_kudos_by_pk(conn: Connection, author_uid: int, kudos_pk: int) -> asyncpg.Record:
    return one(
        await conn.fetchrow(
            f"select {_KUDOS_COLUMNS} {_KUDOS_FROM} where k.author_uid = $1 and k.kudos_pk = $2", author_uid, kudos_pk
        )
    )


async def select_kudos_by_key(
    conn: Connection, source: str, post_id: str, giver_uid: int, kind: str
) -> asyncpg.Record | None:
    """The standing kudos with this natural key, else the most recent one that no longer stands:
    found among the giver's, then read from its author's."""
    given = await conn.fetchrow(
        """
        select author_uid, kudos_pk from kudos_given
        where member_uid = $3 and source = $1 and post_id = $2 and kind = $4
        order by standing desc, kudos_pk desc
        limit 1
        """,
        source,
        post_id,
        giver_uid,
        kind,
    )
    return None if given is None else await select_kudos_by_pk(conn, given["author_uid"], given["kudos_pk"])


async def select_giver_day(
    conn: Connection, giver_uid: int, source: str, post_id: str, kind: str, day: date
) -> tuple[str | None, int]:
    """What the giver's limits need, in one statement on the giver's shard: the kudos_id of their
    standing kudos of this kind for the post (None: none stands), and how many kudos they gave on
    the UTC day, standing or not."""
    row = one(
        await conn.fetchrow(
            """
            select (select kudos_id from kudos_given
                    where member_uid = $1 and source = $2 and post_id = $3 and kind = $4 and standing) as standing,
                   (select count(*) from kudos_given where member_uid = $1 and day = $5) as given
            """,
            giver_uid,
            source,
            post_id,
            kind,
            day,
        )
    )
    return row["standing"], row["given"]


class Thread(NamedTuple):
    """A thread's last acceptance that stood (it may have been retracted since)."""

    author_uid: int
    giver_uid: int
    kudos_pk: int


async def lock_thread(conn: Connection, source: str, thread_id: str) -> Thread | None:
    """Serialize acceptances in one thread until the transaction ends, by locking (creating, the
    first time) its row in kudos_threads; returns the acceptance it names.

    Without it, acceptances in one thread by different members lock disjoint member rows and
    meet only on the one-accepted-answer index, over and over under a burst.
    """
    row = one(
        await conn.fetchrow(
            """
            insert into kudos_threads (thread_id, source) values ($2, $1)
            on conflict (thread_id, source) do update set thread_id = excluded.thread_id
            returning author_uid, giver_uid, kudos_pk
            """,
            source,
            thread_id,
        )
    )
    return None if row["kudos_pk"] is None else Thread(row["author_uid"], row["giver_uid"], row["kudos_pk"])


async def set_thread_accepted(conn: Connection, source: str, thread_id: str, accepted: Thread) -> None:
    """The thread's standing acceptance is now ``accepted`` (its row is locked: lock_thread)."""
    await conn.execute(
        "update kudos_threads set author_uid = $3, giver_uid = $4, kudos_pk = $5 where thread_id = $2 and source = $1",
        source,
        thread_id,
        *accepted,
    )


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
    """Insert a kudos crediting nothing yet, with its id's claim and its giver's row (one
    statement); the use case credits it. Its response comes last. Another author's kudos under
    the id fails the statement on natural_keys_pkey."""
    kudos_pk: int = await conn.fetchval(
        """
        with claimed as (
            insert into natural_keys (key, kind, scope, member_uid) values ($1, 'kudos', '', $5)
            returning member_uid
        ), recorded as (
            insert into kudos (kudos_id, source, post_id, thread_id, author_uid, giver_uid, kind, occurred_at, day,
                               status, not_counted_reason, value, accepter_value, superseded_by_pk, request_hash,
                               response)
            select $1, $2, $3, $4, member_uid, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, '' from claimed
            returning kudos_pk
        ), given as (
            insert into kudos_given (member_uid, author_uid, kudos_pk, kudos_id, source, post_id, kind, day, standing)
            select $6, $5, kudos_pk, $1, $2, $3, $7, $9, $10 = 'standing' from recorded
        )
        select kudos_pk from recorded
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


async def update_kudos_status(conn: Connection, kudos: Row, status: str, superseded_by_pk: int | None = None) -> None:
    """A kudos stops standing (``status``), on its author's shard and its giver's, in one statement."""
    await conn.execute(
        """
        with given as (
            update kudos_given set standing = false where member_uid = $5 and kudos_pk = $1
        )
        update kudos
        set status = $2, superseded_by_pk = coalesce($3, superseded_by_pk),
            retracted_at = case when $2 = 'retracted' then now() else retracted_at end
        where author_uid = $4 and kudos_pk = $1
        """,
        kudos["kudos_pk"],
        status,
        superseded_by_pk,
        kudos["author_uid"],
        kudos["giver_uid"],
    )


async def add_kudos_credit(conn: Connection, author_uid: int, kudos_pk: int, role: str, change: int) -> None:
    column = "author_credited" if role == "author" else "accepter_credited"
    await conn.execute(
        f"update kudos set {column} = {column} + $3 where author_uid = $1 and kudos_pk = $2",
        author_uid,
        kudos_pk,
        change,
    )


async def set_kudos_response(conn: Connection, author_uid: int, kudos_pk: int, response: bytes) -> None:
    await conn.execute(
        "update kudos set response = $3 where author_uid = $1 and kudos_pk = $2", author_uid, kudos_pk, response
    )


async def set_retraction_response(conn: Connection, author_uid: int, kudos_pk: int, response: bytes) -> None:
    await conn.execute(
        "update kudos set retraction_response = $3 where author_uid = $1 and kudos_pk = $2",
        author_uid,
        kudos_pk,
        response,
    )


async def select_day_shares(conn: Connection, author_uid: int, day: date, cap: int) -> list[asyncpg.Record]:
    """The author's standing likes and helpful marks of a day whose share of the cap may change.

    Each row carries ``worth_before``: what the kudos before it (in canonical order) are worth.
    Rows crediting nothing with the cap already full before them are left out: whatever changes,
    they still credit nothing. What is returned is the credited ones plus the first ones past
    the cap, so the work stays proportional to the cap, not to a popular member's day.
    """
    return await conn.fetch(
        """
        select author_uid, kudos_pk, kudos_id, source, value, author_credited, worth_before from (
            select author_uid, kudos_pk, kudos_id, source, occurred_at, value, author_credited,
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


async def select_first_award_transfer(conn: Connection, member_uid: int, kudos_pk: int, role: str) -> int | None:
    """The first ledger credit a kudos made to a member in this role: what its reversals point at."""
    value: int | None = await conn.fetchval(
        """
        select transfer_id from reputation_entries
        where member_uid = $1 and kudos_pk = $2 and role = $3 and posted > 0
        order by entry_id limit 1
        """,
        member_uid,
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
    author_uid: int,
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
        where author_uid = $6 and kudos_pk = $1
        """,
        kudos_pk,
        points,
        shortfall,
        lot_id,
        transfer_id,
        author_uid,
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
    """What the member's standing kudos credit, by source and kind (accepter: for accepting answers).

    What the member's acceptances credit them is the sum of their accepter entries (each kudos
    credits what its entries add up to), read on the member's shard: the kudos are their authors'."""
    return await conn.fetch(
        """
        select source, kind, sum(credited)::bigint as reputation from (
            select source, kind, author_credited as credited from kudos
            where author_uid = $1 and status = 'standing' and author_credited > 0
            union all
            select source, 'accepter', change from reputation_entries
            where member_uid = $1 and role = 'accepter'
        ) credits
        group by source, kind
        having sum(credited) > 0
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

# The kudos a member gave: their authors' rows, named by the giver's (on Citus, a statement over
# the authors' shards: for the export and erasure only).
_GIVEN_BY = "(author_uid, kudos_pk) in (select author_uid, kudos_pk from kudos_given where member_uid = $1)"

# The member's rows of each table, as JSON objects, for the export: (name in the export, table,
# condition naming the member ($1), columns left out). Idempotency blobs and other members'
# internal ids are left out.
EXPORTED: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("kudos_received", "kudos", "author_uid = $1", ("giver_uid",)),
    ("kudos_given", "kudos", _GIVEN_BY, ("author_uid",)),
    ("reputation_entries", "reputation_entries", "member_uid = $1", ()),
)
_NEVER_EXPORTED = ("member_uid", "request_hash", "response", "retraction_response")


async def select_exported(
    conn: Connection, table: str, condition: str, left_out: Sequence[str], member_uid: int, limit: int
) -> list[str]:
    """Rows of ``table`` meeting ``condition`` for the member, as JSON objects (text); ``table``
    and ``condition`` come from EXPORTED, never from a request."""
    rows = await conn.fetch(
        f"select (to_jsonb(t) - $3::text[])::text from {table} t where {condition} limit $2",
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
        where author_uid = $1 or {_GIVEN_BY}
        """,
        member_uid,
        old_member_id,
        pseudonym,
        erased_hash,
    )
