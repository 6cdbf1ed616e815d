"""Purchase and refund SQL. Plain async functions, connection first; the use case commits.

A batch of purchases is read and written with one statement per step for the whole batch, its
rows passed as arrays (``unnest``): PostgreSQL plans and starts each statement once per batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import NamedTuple

import asyncpg

from konvert.db import Connection, Queryable, one
from konvert.ledger import keys
from konvert.tiers.store import qualifying_points_sql

Conn = Queryable


class Recorded(NamedTuple):
    """A purchase already recorded: what its idempotency check needs."""

    member_uid: int
    request_hash: bytes
    response: bytes


class Claims(NamedTuple):
    """Who the ids of a batch belong to (konvert.ledger.keys): member id -> member_uid, and
    (partner, purchase_id) -> the member_uid of the purchase recorded under it."""

    members: dict[str, int]
    purchases: dict[tuple[str, str], int]


async def select_claims(conn: Connection, member_ids: Sequence[str], keys: Sequence[tuple[str, str]]) -> Claims:
    """The members of a batch's member ids and of its (partner, purchase_id) keys already claimed,
    in one statement on the ids' shards, before the members are locked: a purchase id another
    member claims after this is found by the claim that records the batch (``insert_purchases``)."""
    rows = await conn.fetch(
        """
        select kind, scope, key, member_uid from natural_keys
        where key = any($1::text[]) and kind = 'member' and scope = ''
        union all
        select n.kind, n.scope, n.key, n.member_uid
        from unnest($2::text[], $3::text[]) as k (partner, purchase_id)
        join natural_keys n on n.key = k.purchase_id and n.kind = 'purchase' and n.scope = k.partner
        -- Named as values too, so that a distributed database reads only these keys' shards.
        where n.key = any($3::text[])
        """,
        list(member_ids),
        [partner for partner, _ in keys],
        [purchase_id for _, purchase_id in keys],
    )
    return Claims(
        {row["key"]: row["member_uid"] for row in rows if row["kind"] == "member"},
        {(row["scope"], row["key"]): row["member_uid"] for row in rows if row["kind"] == "purchase"},
    )


async def read_for_batch(
    conn: Connection,
    keys: Sequence[tuple[str, str, int]],
    member_uids: Sequence[int],
    tier_window_start: datetime | None,
) -> tuple[dict[tuple[str, str], Recorded], dict[int, int]]:
    """What a batch of postings needs to know, in one statement: the purchases among (partner,
    purchase_id, member_uid) keys that are recorded already for that member, and each member's
    points qualifying for tiers since ``tier_window_start`` (none when it is None). Read after the
    members are locked, so the sums include every purchase committed before."""
    rows = await conn.fetch(
        f"""
        select p.partner, p.purchase_id, p.member_uid, p.request_hash, p.response, null::bigint as points
        from unnest($1::text[], $2::text[], $5::bigint[]) as k (partner, purchase_id, member_uid)
        join purchases p on p.member_uid = k.member_uid and p.partner = k.partner and p.purchase_id = k.purchase_id
        -- Named as a set too, so that a distributed database reads only these members' shards.
        where p.member_uid = any($3::bigint[])
        union all
        select null, null, u.member_uid, null, null, {qualifying_points_sql("u.member_uid", "$4")}
        from unnest($3::bigint[]) as u (member_uid)
        where $4::timestamptz is not null
        """,
        [partner for partner, _, _ in keys],
        [purchase_id for _, purchase_id, _ in keys],
        list(member_uids),
        tier_window_start,
        [member_uid for _, _, member_uid in keys],
    )
    recorded = {
        (row["partner"], row["purchase_id"]): Recorded(
            row["member_uid"], bytes(row["request_hash"]), bytes(row["response"])
        )
        for row in rows
        if row["partner"] is not None
    }
    return recorded, {row["member_uid"]: row["points"] for row in rows if row["partner"] is None}


class PurchaseRow(NamedTuple):
    """One purchase to record: a column of INSERT_PURCHASES' arrays each."""

    partner: str
    purchase_id: str
    member_uid: int
    currency: str
    occurred_at: datetime
    total_amount: int
    points: int
    refund_state: str
    lot_id: int | None
    transfer_id: int | None
    request_hash: bytes
    response: bytes


async def insert_purchases(conn: Connection, rows: Sequence[PurchaseRow]) -> int:
    """Record purchases whose ids are free; return how many were recorded (a purchase id taken
    meanwhile by a concurrent request is skipped, and the caller must not commit)."""
    if not rows:
        return 0
    inserted: int = await conn.fetchval(INSERT_PURCHASES, *(list(column) for column in zip(*rows, strict=True)))
    return inserted


# A purchase is recorded with the claim of its id (konvert.ledger.keys), which is what makes the id
# unique across members; a purchase id another member's purchase claimed meanwhile is skipped.
INSERT_PURCHASES = """
    with r as (
        select *
        from unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::timestamptz[], $6::bigint[], $7::bigint[],
                    $8::text[], $9::bigint[], $10::bigint[], $11::bytea[], $12::bytea[])
             as r (partner, purchase_id, member_uid, currency, occurred_at, total_amount, points, refund_state,
                   lot_id, transfer_id, request_hash, response)
    ), claimed as (
        insert into natural_keys (key, kind, scope, member_uid)
        select purchase_id, 'purchase', partner, member_uid from r
        -- In purchase id order: two batches that both post ids the other holds (for other members)
        -- then wait for each other in one direction, never in a circle.
        order by partner, purchase_id
        on conflict do nothing
        returning key, scope
    ), recorded as (
        insert into purchases (partner, purchase_id, member_uid, currency, occurred_at, total_amount, points,
                               refund_state, lot_id, transfer_id, request_hash, response)
        select r.partner, r.purchase_id, r.member_uid, r.currency, r.occurred_at, r.total_amount, r.points,
               r.refund_state::jsonb, r.lot_id, r.transfer_id, r.request_hash, r.response
        from r join claimed c on c.key = r.purchase_id and c.scope = r.partner
        returning 1
    )
    select count(*) from recorded
"""


async def select_partners_of_purchase(conn: Conn, purchase_id: str) -> list[str]:
    rows = await conn.fetch(
        "select scope from natural_keys where key = $1 and kind = 'purchase' order by scope limit 2", purchase_id
    )
    return [row["scope"] for row in rows]


async def select_purchase_member(conn: Conn, partner: str, purchase_id: str) -> int | None:
    """The member_uid of a purchase (which never changes), or None."""
    return await keys.select_key_member(conn, keys.PURCHASE, purchase_id, partner)


async def lock_purchase(conn: Connection, member_uid: int, partner: str, purchase_id: str) -> asyncpg.Record:
    row = one(
        await conn.fetchrow(
            """
        select p.purchase_pk, p.partner, p.purchase_id, p.member_uid, m.member_id, p.currency, p.refund_state::text,
               p.lot_id, p.transfer_id, p.points
        from purchases p join members m using (member_uid)
        where p.member_uid = $1 and p.partner = $2 and p.purchase_id = $3
        for update of p
        """,
            member_uid,
            partner,
            purchase_id,
        )
    )
    return row


async def select_refund_replay(
    conn: Connection, member_uid: int, purchase_pk: int, refund_id: str
) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        "select request_hash, response from refunds where member_uid = $1 and purchase_pk = $2 and refund_id = $3",
        member_uid,
        purchase_pk,
        refund_id,
    )
    return row


async def update_refund_state(conn: Connection, member_uid: int, purchase_pk: int, refund_state: bytes) -> None:
    await conn.execute(
        "update purchases set refund_state = $3::text::jsonb where member_uid = $1 and purchase_pk = $2",
        member_uid,
        purchase_pk,
        refund_state.decode(),
    )


class RefundRow(NamedTuple):
    purchase_pk: int
    refund_id: str
    member_uid: int
    amount: int
    points: int
    shortfall: int
    already_expired: int
    detail: bytes
    request_hash: bytes
    response: bytes


async def insert_refund(conn: Connection, refund: RefundRow) -> None:
    await conn.execute(
        """
        insert into refunds (purchase_pk, refund_id, member_uid, amount, points, shortfall, already_expired, detail,
                             request_hash, response)
        values ($1, $2, $3, $4, $5, $6, $7, $8::text::jsonb, $9, $10)
        """,
        *refund._replace(detail=refund.detail.decode()),  # type: ignore[arg-type]
    )


async def select_expiry_refunded(conn: Connection, member_uid: int, purchase_pk: int) -> int:
    """Points of the purchase's lot lost to expiry that its refunds counted already."""
    counted: int = await conn.fetchval(
        "select coalesce(sum(already_expired), 0) from refunds where member_uid = $1 and purchase_pk = $2",
        member_uid,
        purchase_pk,
    )
    return counted


# --- export and erasure --------------------------------------------------------------------


async def select_purchases(conn: Conn, member_uid: int, limit: int) -> list[asyncpg.Record]:
    """The member's purchases with their refunds, oldest first."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """
        select p.partner, p.purchase_id, p.currency, p.occurred_at, p.total_amount, p.points, p.created_at,
               coalesce((
                   select json_agg(json_build_object('refund_id', r.refund_id, 'amount', r.amount,
                                                     'points', r.points, 'shortfall', r.shortfall,
                                                     'created_at', r.created_at) order by r.refund_pk)
                   from refunds r where r.member_uid = p.member_uid and r.purchase_pk = p.purchase_pk
               ), '[]')::text as refunds
        from purchases p where p.member_uid = $1 order by p.purchase_pk limit $2
        """,
        member_uid,
        limit,
    )
    return rows


async def forget_requests(conn: Connection, member_uid: int, erased_hash: bytes, renamed: str) -> None:
    """Erasure: stored responses name the member; their digests are replaced so that an old request
    can never be replayed into the pseudonym (``renamed``: the JSON fields written over them)."""
    for table in ("purchases", "refunds"):
        await conn.execute(
            f"""
            update {table}
            set request_hash = $2,
                response = convert_to((convert_from(response, 'UTF8')::jsonb || $3::jsonb)::text, 'UTF8')
            where member_uid = $1
            """,
            member_uid,
            erased_hash,
            renamed,
        )
