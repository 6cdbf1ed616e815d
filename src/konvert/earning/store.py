"""Purchase and refund SQL. Plain async functions, connection first; the use case commits."""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

import asyncpg

from konvert.tiers import qualifying_points_sql


async def lock_members_with_new_ids(conn: asyncpg.Connection, member_ids: list[str]) -> list[asyncpg.Record]:
    """For each member id (in order, one row each; member_uid null for an unknown member): lock
    the member's row and return its uid and tier, with a fresh lot id and transfer id. All in one
    pipelined round trip; callers pass the ids sorted, so concurrent batches lock in one order.

    Taking the ids up front lets each response (which names them) be built before the insert,
    so the purchase row can store it in the same statement.
    """
    return await conn.fetchmany(_LOCK_MEMBER_WITH_NEW_IDS, [(member_id,) for member_id in member_ids])


_LOCK_MEMBER_WITH_NEW_IDS = """
    select m.member_uid, m.tier, m.tier_below_since, m.tier_qualifying_points,
           nextval('lots_lot_id_seq') as lot_id, nextval('transfers_transfer_id_seq') as transfer_id
    from (select $1::text as member_id) r
    left join lateral (select * from members where member_id = r.member_id for update) m on true
"""


async def select_taken_and_qualifying(
    conn: asyncpg.Connection, keys: list[tuple[int, str, str]], tier_window_start: datetime | None
) -> list[asyncpg.Record]:
    """For each (member_uid, partner, purchase_id): whether the purchase id is taken already, and
    the member's points qualifying for tiers since ``tier_window_start`` (0 when None).

    Asked after the members are locked, so it sees every purchase committed by batches that
    held those locks before.
    """
    return await conn.fetchmany(
        _SELECT_TAKEN_AND_QUALIFYING, [(uid, partner, purchase_id, tier_window_start) for uid, partner, purchase_id in keys]
    )


_SELECT_TAKEN_AND_QUALIFYING = f"""
    select exists (select 1 from purchases where partner = $2 and purchase_id = $3) as taken,
           case when $4::timestamptz is null then 0 else {qualifying_points_sql("$1::bigint", "$4")} end
               as qualifying_points
"""


class PurchaseRow(NamedTuple):
    """The arguments of one purchase for INSERT_PURCHASE, in its parameter order."""

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
    tier_evaluated_at: datetime | None


async def insert_purchases(conn: asyncpg.Connection, rows: list[PurchaseRow]) -> list[asyncpg.Record]:
    """Record purchases with their lots, earn transfers and balance changes: one statement each,
    all pipelined in one round trip, in order.

    Each gives one row: the member's new (version, points_debt), or nulls if the purchase id was
    taken (by an earlier row, this batch or another request): then that one wrote nothing.
    """
    return await conn.fetchmany(INSERT_PURCHASE, rows)


# A purchase with its lot, earn transfer and balance change, in one statement. Parameters are
# PurchaseRow's fields in order. It always returns one row: the member's new version and debt, or
# nulls when the purchase id was taken (then nothing was written).
INSERT_PURCHASE = """
    with purchase as (
        insert into purchases (partner, purchase_id, member_uid, currency, occurred_at, total_amount, points,
                               refund_state, lot_id, transfer_id, request_hash, response)
        values ($1, $2, $3::bigint, $4, $5, $6::bigint, $7::bigint, $8::text::jsonb,
                case when $7::bigint > 0 then $9::bigint end, case when $7::bigint > 0 then $10::bigint end,
                $11, $12)
        on conflict (partner, purchase_id) do nothing
        returning purchase_pk
    ), lot as (
        insert into lots (lot_id, member_uid, amount, remaining, state, vests_at, expires_at)
        overriding system value
        select $9, $3, $7, $7, $13::text, $14, $15 from purchase where $7 > 0
    ), transfer as (
        insert into transfers (transfer_id, member_uid, asset, debit_account_id, credit_account_id, amount,
                               code, cause_type, cause_ref, lot_id, reason)
        overriding system value
        select $10, $3, 'points', $16,
               (select account_id from accounts where member_uid = $3 and asset = 'points' and name = $13::text),
               $7, 'earn', 'purchase', $1 || '/' || $2, $9, 'points for purchase'
        from purchase where $7 > 0
    ), updated as (
        update members
        set points_pending = points_pending + case when $13::text = 'pending' then $7 else 0 end,
            points_available = points_available + case when $13::text = 'available' then $7 else 0 end,
            points_lifetime_earned = points_lifetime_earned + $7,
            tier = $17, tier_below_since = $18, tier_qualifying_points = $19,
            tier_evaluated_at = coalesce($20, tier_evaluated_at),
            version = version + 1
        where member_uid = $3 and exists (select 1 from purchase)
        returning version, points_debt
    )
    select (select version from updated) as version, (select points_debt from updated) as points_debt
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
