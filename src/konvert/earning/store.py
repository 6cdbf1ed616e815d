"""Purchase and refund SQL. Plain async functions, connection first; the use case commits.

A batch of purchases is written with one statement per step for the whole batch, its rows
passed as arrays (``unnest``): PostgreSQL plans and starts each statement once per batch, not
once per purchase, and the driver sends a few arrays instead of a message per row.
"""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

import asyncpg

from konvert.tiers import qualifying_points_sql


async def read_for_purchases(
    conn: asyncpg.Connection, keys: list[tuple[str, str, str]], tier_window_start: datetime | None
) -> list[asyncpg.Record]:
    """For each (member_id, partner, purchase_id), in order, as of one snapshot: the member's
    uid, version, refund debt and tier (nulls for an unknown member), whether the purchase id is taken, the
    member's points qualifying for tiers since ``tier_window_start`` (0 when None), and a fresh
    lot id and transfer id.

    Nothing is locked: INSERT_PURCHASES writes a member's purchases only if its version is still
    the one read here, so what was computed from this read still holds when it is written.
    """
    member_ids, partners, purchase_ids = (list(column) for column in zip(*keys, strict=True))
    return await conn.fetch(_READ_FOR_PURCHASES, member_ids, partners, purchase_ids, tier_window_start)


_READ_FOR_PURCHASES = f"""
    select m.member_uid, m.version, m.points_debt, m.tier, m.tier_below_since, m.tier_qualifying_points,
           exists (select 1 from purchases p where p.partner = r.partner and p.purchase_id = r.purchase_id) as taken,
           case when $4::timestamptz is null or m.member_uid is null then 0
                else {qualifying_points_sql("m.member_uid", "$4")} end as qualifying_points,
           nextval('lots_lot_id_seq') as lot_id, nextval('transfers_transfer_id_seq') as transfer_id
    from unnest($1::text[], $2::text[], $3::text[]) with ordinality as r (member_id, partner, purchase_id, ord)
    left join members m on m.member_id = r.member_id
    order by r.ord
"""


async def lock_members(conn: asyncpg.Connection, member_ids: list[str]) -> dict[str, int]:
    """Lock the members' rows (those that exist) for the rest of the transaction, in member_uid
    order (the order every writer that locks several members uses, INSERT_PURCHASES included);
    return their current versions by member id."""
    rows = await conn.fetch(
        "select member_id, version from members where member_id = any($1::text[]) order by member_uid for update",
        member_ids,
    )
    return {row["member_id"]: row["version"] for row in rows}


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
    lot_id: int
    transfer_id: int
    request_hash: bytes
    response: bytes
    bucket: str
    vests_at: datetime
    expires_at: datetime | None
    issued_account_id: int
    tier: str | None
    tier_below_since: datetime | None
    tier_qualifying_points: int


# The SQLSTATE konvert_abort() raises (sql/0007_statement_assertions.sql).
TAKEN_CONCURRENTLY = "KV001"


class PurchaseTakenConcurrently(Exception):
    """INSERT_PURCHASES found a purchase id it was told was free taken by a concurrent request
    (for another member); the statement was aborted and wrote nothing."""


async def insert_purchases(
    conn: asyncpg.Connection, rows: list[PurchaseRow], versions: dict[int, int]
) -> dict[int, asyncpg.Record]:
    """Record purchases with their lots, earn transfers and balance changes, in one statement,
    for the members whose version is still the one in ``versions`` (member_uid -> version).

    The rows must not repeat a (partner, purchase_id), and every purchase id must have been free
    when their members' versions were read. Returns, by the index of each row that was written,
    its member's new (version, points_debt) after all of this batch's rows. The rows of a member
    that changed since are absent: they wrote nothing. A member's tier becomes that of its last
    written row. Raises PurchaseTakenConcurrently (nothing written) if a purchase id of an
    unchanged member was taken meanwhile.
    """
    if not rows:
        return {}
    columns = [list(column) for column in zip(*rows, strict=True)]
    try:
        written = await conn.fetch(INSERT_PURCHASES, *columns, list(versions), list(versions.values()))
    except asyncpg.PostgresError as exc:
        if exc.sqlstate == TAKEN_CONCURRENTLY:  # asyncpg knows no class for it: UnknownPostgresError
            raise PurchaseTakenConcurrently(str(exc)) from exc
        raise
    return {record["ord"] - 1: record for record in written}


# Parameters are PurchaseRow's fields in order, each as an array, then the members' uids and the
# versions they must still have. One row per purchase written: its position in the arrays
# (1-based) and its member's new version and debt. Self-committing on its own: it locks the
# members first (in member_uid order) and compares their versions under the lock.
INSERT_PURCHASES = """
    with input as (
        select *
        from unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::timestamptz[], $6::bigint[], $7::bigint[],
                    $8::text[], $9::bigint[], $10::bigint[], $11::bytea[], $12::bytea[], $13::text[],
                    $14::timestamptz[], $15::timestamptz[], $16::bigint[], $17::text[], $18::timestamptz[],
                    $19::bigint[])
             with ordinality as r (partner, purchase_id, member_uid, currency, occurred_at, total_amount, points,
                                   refund_state, lot_id, transfer_id, request_hash, response, bucket, vests_at,
                                   expires_at, issued_account_id, tier, tier_below_since, tier_qualifying_points, ord)
    ), locked as materialized (
        -- Under the lock, a row updated meanwhile is seen at its latest committed version.
        select member_uid, version from members where member_uid = any($20::bigint[]) order by member_uid for update
    ), unchanged as materialized (
        select l.member_uid
        from locked l join unnest($20::bigint[], $21::bigint[]) as e (member_uid, version)
             on e.member_uid = l.member_uid and e.version = l.version
    ), purchase as (
        insert into purchases (partner, purchase_id, member_uid, currency, occurred_at, total_amount, points,
                               refund_state, lot_id, transfer_id, request_hash, response)
        select partner, purchase_id, member_uid, currency, occurred_at, total_amount, points, refund_state::jsonb,
               case when points > 0 then lot_id end, case when points > 0 then transfer_id end, request_hash, response
        from input
        where member_uid in (select member_uid from unchanged)
        -- In purchase id order, not member order: two batches that both post ids the other
        -- holds (for other members) then wait for each other in one direction, never in a circle.
        -- (A member's purchases get their purchase_pk in purchase id order, by the database's
        -- collation; the batch's own order, and the tier carried through it, is ord.)
        order by partner, purchase_id
        on conflict (partner, purchase_id) do nothing
        returning partner, purchase_id
    ), written as (
        select input.* from input join purchase using (partner, purchase_id)
    ), lot as (
        insert into lots (lot_id, member_uid, amount, remaining, state, vests_at, expires_at)
        overriding system value
        select lot_id, member_uid, points, points, bucket, vests_at, expires_at from written where points > 0
    ), transfer as (
        insert into transfers (transfer_id, member_uid, asset, debit_account_id, credit_account_id, amount,
                               code, cause_type, cause_ref, lot_id, reason)
        overriding system value
        select w.transfer_id, w.member_uid, 'points', w.issued_account_id, a.account_id, w.points,
               'earn', 'purchase', w.partner || '/' || w.purchase_id, w.lot_id, 'points for purchase'
        from written w
        -- Left: a member without the account would leave credit_account_id null, which the
        -- table refuses, so the statement fails whole instead of writing a purchase without its
        -- transfer (no foreign key would notice: sql/0011).
        left join accounts a on a.member_uid = w.member_uid and a.asset = 'points' and a.name = w.bucket
        where w.points > 0
    ), change as (
        select distinct on (member_uid) member_uid,
               sum(points) filter (where bucket = 'pending') over m as pending,
               sum(points) filter (where bucket = 'available') over m as available,
               sum(points) over m as earned,
               count(*) over m as purchases,
               tier, tier_below_since, tier_qualifying_points
        from written
        window m as (partition by member_uid)
        order by member_uid, ord desc
    ), updated as (
        update members m
        set points_pending = m.points_pending + coalesce(c.pending, 0),
            points_available = m.points_available + coalesce(c.available, 0),
            points_lifetime_earned = m.points_lifetime_earned + c.earned,
            -- Not tier_evaluated_at, which the daily tier job keeps: it is indexed, and an update
            -- that changes no indexed column rewrites the row in place (HOT: no index entries).
            tier = c.tier, tier_below_since = c.tier_below_since, tier_qualifying_points = c.tier_qualifying_points,
            version = m.version + c.purchases
        from change c
        where m.member_uid = c.member_uid
        returning m.member_uid, m.version, m.points_debt
    )
    select w.ord, u.version, u.points_debt
    from written w join updated u using (member_uid)
    union all
    select i.ord, konvert_abort(format('purchase %s/%s was taken concurrently', i.partner, i.purchase_id)), null
    from input i
    where i.member_uid in (select member_uid from unchanged)
      and not exists (select from written w where w.ord = i.ord)
"""


async def select_purchase_replay(
    conn: asyncpg.Connection, partner: str, purchase_id: str
) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "select request_hash, response from purchases where partner = $1 and purchase_id = $2",
        partner,
        purchase_id,
    )


async def select_partners_of_purchase(conn: asyncpg.Connection, purchase_id: str) -> list[str]:
    rows = await conn.fetch(
        "select partner from purchases where purchase_id = $1 order by partner limit 2", purchase_id
    )
    return [r["partner"] for r in rows]


async def select_purchase_member(conn: asyncpg.Connection, partner: str, purchase_id: str) -> int | None:
    """The member_uid of a purchase (which never changes), or None."""
    return await conn.fetchval(
        "select member_uid from purchases where partner = $1 and purchase_id = $2", partner, purchase_id
    )


async def lock_purchase(conn: asyncpg.Connection, partner: str, purchase_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        """
        select p.purchase_pk, p.partner, p.purchase_id, p.member_uid, m.member_id, p.currency, p.refund_state::text,
               p.lot_id, p.transfer_id, p.points
        from purchases p join members m using (member_uid)
        where p.partner = $1 and p.purchase_id = $2
        for update of p
        """,
        partner,
        purchase_id,
    )


async def select_refund_replay(
    conn: asyncpg.Connection, purchase_pk: int, refund_id: str
) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "select request_hash, response from refunds where purchase_pk = $1 and refund_id = $2",
        purchase_pk,
        refund_id,
    )


async def update_refund_state(conn: asyncpg.Connection, purchase_pk: int, refund_state: bytes) -> None:
    await conn.execute(
        "update purchases set refund_state = $2::text::jsonb where purchase_pk = $1",
        purchase_pk,
        refund_state.decode(),
    )


async def insert_refund(
    conn: asyncpg.Connection,
    *,
    purchase_pk: int,
    refund_id: str,
    member_uid: int,
    amount: int,
    points: int,
    shortfall: int,
    already_expired: int,
    detail: bytes,
    request_hash: bytes,
    response: bytes,
) -> None:
    await conn.execute(
        """
        insert into refunds (purchase_pk, refund_id, member_uid, amount, points, shortfall, detail,
                             request_hash, response, already_expired)
        values ($1, $2, $3, $4, $5, $6, $7::text::jsonb, $8, $9, $10)
        """,
        purchase_pk,
        refund_id,
        member_uid,
        amount,
        points,
        shortfall,
        detail.decode(),
        request_hash,
        response,
        already_expired,
    )


async def select_unrefunded_expiry(conn: asyncpg.Connection, purchase_pk: int, lot_id: int) -> int:
    """Points of the purchase's lot that expired and that no refund has counted yet."""
    return await conn.fetchval(
        """
        select coalesce((select sum(amount) from lot_entries where lot_id = $2 and kind = 'expire'), 0)
             - coalesce((select sum(already_expired) from refunds where purchase_pk = $1), 0)
        """,
        purchase_pk,
        lot_id,
    )
