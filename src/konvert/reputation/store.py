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


class Claims(NamedTuple):
    """What ``natural_keys`` says of a batch: the members of its member ids and the authors of its
    kudos ids already claimed."""

    members: dict[str, int]
    kudos: dict[str, int]


async def select_claims(conn: Connection, member_ids: Sequence[str], kudos_ids: Sequence[str]) -> Claims:
    """The claims of a batch's member ids and kudos ids, in one statement on the ids' shards,
    before the members are locked: a kudos id another author claims after this is found by the
    claim that records the kudos (``insert_kudos``)."""
    rows = await conn.fetch(
        """
        select kind, key, member_uid from natural_keys
        where (key = any($1::text[]) and kind = 'member' or key = any($2::text[]) and kind = 'kudos') and scope = ''
        """,
        list(member_ids),
        list(kudos_ids),
    )
    return Claims(
        {row["key"]: row["member_uid"] for row in rows if row["kind"] == "member"},
        {row["key"]: row["member_uid"] for row in rows if row["kind"] == "kudos"},
    )


async def select_replays(conn: Connection, kudos: Sequence[tuple[int, str]]) -> dict[str, asyncpg.Record]:
    """The recorded kudos among (author_uid, kudos_id) pairs, by kudos_id: what a replay needs."""
    rows = await conn.fetch(
        """
        select k.kudos_id, k.request_hash, k.response
        from unnest($1::bigint[], $2::text[]) as w (author_uid, kudos_id)
        join kudos k on k.author_uid = w.author_uid and k.kudos_id = w.kudos_id
        -- Named as values too, so that a distributed database reads only these authors' shards.
        where k.author_uid = any($1::bigint[]) and k.kudos_id = any($2::text[])
        """,
        [author_uid for author_uid, _ in kudos],
        [kudos_id for _, kudos_id in kudos],
    )
    return {row["kudos_id"]: row for row in rows}


class GiverKey(NamedTuple):
    """One standing kudos per giver, post and kind."""

    giver_uid: int
    source: str
    post_id: str
    kind: str


class Givers(NamedTuple):
    """What givers' limits need: the kudos_id of each standing kudos among the keys asked for,
    how many kudos each gave on each day asked for (standing or not), and since when each giver
    has been a member."""

    standing: dict[GiverKey, str]
    given: dict[tuple[int, date], int]
    since: dict[int, datetime]


async def select_givers(conn: Connection, keys: Sequence[GiverKey], days: Sequence[date]) -> Givers:
    """``Givers`` for kudos keys (``days``: each key's UTC day), in one statement on the givers'
    shards."""
    uids = [key.giver_uid for key in keys]
    rows = await conn.fetch(
        """
        select 'standing' as what, g.member_uid, g.source, g.post_id, g.kind, g.kudos_id,
               null::date as day, null::bigint as given, null::timestamptz as since
        from unnest($1::bigint[], $2::text[], $3::text[], $4::text[]) as k (member_uid, source, post_id, kind)
        join kudos_given g on g.member_uid = k.member_uid and g.source = k.source and g.post_id = k.post_id
                          and g.kind = k.kind and g.standing
        where g.member_uid = any($1::bigint[])
        union all
        select 'given', d.member_uid, null, null, null, null, d.day,
               (select count(*) from kudos_given g
                where g.member_uid = d.member_uid and g.day = d.day and g.member_uid = any($1::bigint[])),
               null
        from (select distinct member_uid, day from unnest($1::bigint[], $5::date[]) as d (member_uid, day)) d
        union all
        select 'since', member_uid, null, null, null, null, null, null, created_at
        from members where member_uid = any($1::bigint[])
        """,
        uids,
        [key.source for key in keys],
        [key.post_id for key in keys],
        [key.kind for key in keys],
        list(days),
    )
    givers = Givers({}, {}, {})
    for row in rows:
        if row["what"] == "standing":
            key = GiverKey(row["member_uid"], row["source"], row["post_id"], row["kind"])
            givers.standing[key] = row["kudos_id"]
        elif row["what"] == "given":
            givers.given[(row["member_uid"], row["day"])] = row["given"]
        else:
            givers.since[row["member_uid"]] = row["since"]
    return givers


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


class NewKudos(NamedTuple):
    """A kudos to record, crediting nothing yet (author and giver by uid)."""

    kudos_id: str
    source: str
    post_id: str
    thread_id: str
    author_uid: int
    giver_uid: int
    kind: str
    occurred_at: datetime
    day: date
    status: str
    not_counted_reason: str | None
    value: int
    accepter_value: int
    superseded_by_pk: int | None
    request_hash: bytes


async def insert_kudos(conn: Connection, kudos: Sequence[NewKudos]) -> list[int]:
    """Insert kudos crediting nothing yet, each with its id's claim and its giver's row, in one
    statement; return their kudos_pk in order. The use case credits them; their responses come
    last. Another author's kudos under an id fails the statement on natural_keys_pkey."""
    columns = list(zip(*kudos, strict=True))
    rows = await conn.fetch(
        """
        with new as materialized (
            select n.*, nextval('kudos_kudos_pk_seq') as kudos_pk
            from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::bigint[], $7::text[],
                        $8::timestamptz[], $9::date[], $10::text[], $11::text[], $12::bigint[], $13::bigint[],
                        $14::bigint[], $15::bytea[])
                 with ordinality as n (kudos_id, source, post_id, thread_id, author_uid, giver_uid, kind,
                                       occurred_at, day, status, not_counted_reason, value, accepter_value,
                                       superseded_by_pk, request_hash, ord)
        ), claimed as (
            insert into natural_keys (key, kind, scope, member_uid)
            select kudos_id, 'kudos', '', author_uid from new
        ), recorded as (
            insert into kudos (kudos_pk, kudos_id, source, post_id, thread_id, author_uid, giver_uid, kind,
                               occurred_at, day, status, not_counted_reason, value, accepter_value,
                               superseded_by_pk, request_hash, response)
            overriding system value
            select kudos_pk, kudos_id, source, post_id, thread_id, author_uid, giver_uid, kind, occurred_at, day,
                   status, not_counted_reason, value, accepter_value, superseded_by_pk, request_hash, ''
            from new
        ), given as (
            insert into kudos_given (member_uid, author_uid, kudos_pk, kudos_id, source, post_id, kind, day, standing)
            select giver_uid, author_uid, kudos_pk, kudos_id, source, post_id, kind, day, status = 'standing' from new
        )
        select kudos_pk from new order by ord
        """,
        *columns,
    )
    return [row["kudos_pk"] for row in rows]


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


async def set_kudos_responses(conn: Connection, responses: Sequence[tuple[int, int, bytes]]) -> None:
    """Store kudos' responses: (author_uid, kudos_pk, body) each, in one statement."""
    await conn.execute(
        """
        update kudos k set response = r.response
        from unnest($1::bigint[], $2::bigint[], $3::bytea[]) as r (author_uid, kudos_pk, response)
        where k.author_uid = any($1::bigint[]) and k.kudos_pk = any($2::bigint[])
          and k.author_uid = r.author_uid and k.kudos_pk = r.kudos_pk
        """,
        *zip(*responses, strict=True),
    )


async def set_retraction_response(conn: Connection, author_uid: int, kudos_pk: int, response: bytes) -> None:
    await conn.execute(
        "update kudos set retraction_response = $3 where author_uid = $1 and kudos_pk = $2",
        author_uid,
        kudos_pk,
        response,
    )


async def select_day_shares(
    conn: Connection, days: Sequence[tuple[int, date]], cap: int, arrived: Sequence[int] = ()
) -> list[asyncpg.Record]:
    """The standing likes and helpful marks whose share of the cap may change, on authors' days
    ((author_uid, day) each), in canonical order per day.

    Each row carries ``worth_before``: what the kudos before it (in canonical order) are worth.
    Rows crediting nothing with the cap already full before them are left out: whatever changes,
    they still credit nothing.

    After kudos ``arrived`` (their kudos_pk), only the credited rows and those kudos are read:
    the cap is shared in canonical order, so every kudos worth something before the last credited
    one is credited, and the rows past the cap can only lose room to an arrival, never gain it.
    Their worth before comes out the same from those rows alone, and the work stays proportional
    to the cap, not to a popular member's day (the credited rows have an index of their own).
    A retraction frees room for the rows past the cap: without ``arrived``, the whole day is read.
    """
    return await conn.fetch(
        _DAY_SHARES.format(rows="and (k.author_credited > 0 or k.kudos_pk = any($4::bigint[]))" if arrived else ""),
        [author_uid for author_uid, _ in days],
        [day for _, day in days],
        cap,
        *([list(arrived)] if arrived else []),
    )


_DAY_SHARES = """
select author_uid, day, kudos_pk, kudos_id, source, value, author_credited, worth_before from (
    select k.author_uid, k.day, k.kudos_pk, k.kudos_id, k.source, k.occurred_at, k.value, k.author_credited,
           coalesce(sum(k.value) over (partition by k.author_uid, k.day
                                       order by k.occurred_at, k.kudos_id collate "C"
                                       rows between unbounded preceding and 1 preceding), 0) as worth_before
    from (select distinct author_uid, day from unnest($1::bigint[], $2::date[]) as d (author_uid, day)) d
    join kudos k on k.author_uid = d.author_uid and k.day = d.day
    where k.author_uid = any($1::bigint[]) and k.day = any($2::date[])
      and k.status = 'standing' and k.kind in ('like', 'helpful') {rows}
) day
where author_credited > 0 or worth_before < $3
order by author_uid, day, occurred_at, kudos_id collate "C"
"""


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


class Entry(NamedTuple):
    """Why a member's reputation moved (or would have, but for the floor): one change of one kudos."""

    member_uid: int
    kudos_pk: int
    role: str
    source: str
    day: date
    reason: str
    change: int
    posted: int
    transfer_id: int | None
    cause_kudos_pk: int


async def record_changes(conn: Connection, changes: Sequence[tuple[int, Entry]]) -> None:
    """Record changes to what kudos credit, each ``(author_uid of its kudos, its entry)``, in one
    statement: the entries, in order, with the members they moved, and the kudos' credits with
    their authors."""
    await conn.execute(
        """
        with change as (
            select * from unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::text[], $5::text[], $6::date[],
                                 $7::text[], $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[])
                 with ordinality as c (author_uid, member_uid, kudos_pk, role, source, day, reason, change, posted,
                                       transfer_id, cause_kudos_pk, ord)
        ), entry as (
            insert into reputation_entries (member_uid, kudos_pk, role, source, day, reason, change, posted,
                                            transfer_id, cause_kudos_pk)
            select member_uid, kudos_pk, role, source, day, reason, change, posted, transfer_id, cause_kudos_pk
            from change order by ord
        )
        update kudos k
        set author_credited = k.author_credited + c.author, accepter_credited = k.accepter_credited + c.accepter
        from (
            select author_uid, kudos_pk,
                   coalesce(sum(change) filter (where role = 'author'), 0) as author,
                   coalesce(sum(change) filter (where role <> 'author'), 0) as accepter
            from change group by author_uid, kudos_pk
        ) c
        where k.author_uid = any($1::bigint[]) and k.kudos_pk = any($3::bigint[])
          and k.author_uid = c.author_uid and k.kudos_pk = c.kudos_pk
        """,
        *zip(*((author_uid, *entry) for author_uid, entry in changes), strict=True),
    )


async def select_floor_kept(conn: Connection, member_uids: Sequence[int]) -> dict[int, int]:
    """What the floor keeps of each member's reputation (members without a row keep nothing)."""
    rows = await conn.fetch(
        "select member_uid, floor_kept from reputation_members where member_uid = any($1::bigint[])",
        list(member_uids),
    )
    return {row["member_uid"]: row["floor_kept"] for row in rows}


async def set_floor_kept(conn: Connection, floor_kept: dict[int, int]) -> None:
    await conn.execute(
        """
        insert into reputation_members (member_uid, floor_kept)
        select * from unnest($1::bigint[], $2::bigint[])
        on conflict (member_uid) do update set floor_kept = excluded.floor_kept, updated_at = now()
        """,
        list(floor_kept),
        list(floor_kept.values()),
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
