"""The ledger's read SQL: balances (one member, many members, or every member page by page) and
a member's activity. Reads lock nothing."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from konvert.db import Queryable, one
from konvert.ledger.store import select_member_uid, select_member_uids

Conn = Queryable


# A balance lists when its pending points vest, grouped by date: the soonest this many dates.
VESTING_DATES_MAX = 10


def _balances_sql(members: str) -> str:
    """Stored balances, tier, the soonest-expiring points grouped by date (at most $2 dates, only
    those before $3 unless it is null) and the soonest-vesting pending points grouped by date, of
    the members that ``members`` selects (the query's tail, over ``members m``)."""
    return f"""
        select m.member_uid, m.member_id, m.points_available, m.points_pending, m.points_held, m.points_debt,
               m.points_lifetime_earned, m.reputation, m.version,
               m.tier, m.tier_qualifying_points, m.tier_below_since,
               coalesce((
                   select json_agg(json_build_object('points', e.points, 'expires_at', e.expires_at)
                                   order by e.expires_at)
                   from (
                       select expires_at, sum(remaining) as points from lots
                       where member_uid = m.member_uid and remaining > 0 and state <> 'expired'
                         and expires_at is not null and ($3::timestamptz is null or expires_at < $3)
                       group by expires_at order by expires_at limit $2
                   ) e
               ), '[]') as expiring,
               case when m.points_pending > 0 then coalesce((
                   select json_agg(json_build_object('points', v.points, 'vests_at', v.vests_at)
                                   order by v.vests_at)
                   from (
                       select vests_at, sum(remaining) as points from lots
                       where member_uid = m.member_uid and remaining > 0 and state = 'pending'
                       group by vests_at order by vests_at limit {VESTING_DATES_MAX}
                   ) v
               ), '[]') else '[]' end as vesting
        {members}
    """


_BALANCES_OF = _balances_sql("from members m where m.member_uid = any($1::bigint[])")
_BALANCES_AFTER = _balances_sql(
    "from members m where m.member_uid > $1 and m.erased_at is null order by m.member_uid limit $4"
)


async def select_balances(
    conn: Conn, member_ids: list[str], expiring_lots: int, expiring_before: datetime | None = None
) -> list[asyncpg.Record]:
    """The members' stored balances, tier, and soonest-expiring points grouped by date
    (``expiring_lots`` dates at most, or only those expiring before ``expiring_before``); those
    that exist, in no order. Two statements: the ids' uids (konvert.ledger.keys), then the
    members' rows by uid (a member erased in between is left out, like one that does not exist)."""
    uids = await select_member_uids(conn, member_ids)
    if not uids:
        return []
    rows = await conn.fetch(_BALANCES_OF, list(uids.values()), expiring_lots, expiring_before)
    return [row for row in rows if uids.get(row["member_id"]) == row["member_uid"]]


async def select_balances_by_uid(conn: Conn, member_uids: list[int], expiring_lots: int) -> list[asyncpg.Record]:
    """``select_balances`` of members by uid, in one statement (a write's own members, which it
    holds locked)."""
    rows: list[asyncpg.Record] = await conn.fetch(_BALANCES_OF, member_uids, expiring_lots, None)
    return rows


async def select_balance(
    conn: Conn, member_id: str, expiring_lots: int, expiring_before: datetime | None = None
) -> asyncpg.Record | None:
    rows = await select_balances(conn, [member_id], expiring_lots, expiring_before)
    return rows[0] if rows else None


async def select_balances_after(
    conn: Conn, after_member_uid: int, limit: int, expiring_lots: int
) -> list[asyncpg.Record]:
    """``select_balances`` for the next ``limit`` members (erased ones aside) in member_uid order
    after ``after_member_uid``: a page of every member's balance."""
    rows: list[asyncpg.Record] = await conn.fetch(_BALANCES_AFTER, after_member_uid, expiring_lots, None, limit)
    return rows


async def select_vesting(conn: Conn, member_id: str, limit: int) -> list[asyncpg.Record]:
    """A member's pending points grouped by the moment they vest, soonest first."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """
        select l.vests_at, sum(l.remaining)::bigint as points
        from lots l
        where l.member_uid = $1 and l.remaining > 0 and l.state = 'pending'
        group by l.vests_at order by l.vests_at limit $2
        """,
        await select_member_uid(conn, member_id),
        limit,
    )
    return rows


async def select_activity(
    conn: Conn, member_uid: int, before_transfer_id: int | None, limit: int
) -> list[asyncpg.Record]:
    """The member's transfers, newest first, with the accounts on both sides."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """
        select t.transfer_id, t.code, t.asset, t.amount, t.cause_type, t.cause_ref, t.lot_id,
               t.reverses_transfer_id, t.reason, t.created_at,
               d.account_id is not null as debit_is_member, coalesce(d.name, sd.name) as debit_name,
               c.account_id is not null as credit_is_member, coalesce(c.name, sc.name) as credit_name
        from transfers t
        left join accounts d on d.member_uid = t.member_uid and d.account_id = t.debit_account_id
        left join system_accounts sd on sd.account_id = t.debit_account_id
        left join accounts c on c.member_uid = t.member_uid and c.account_id = t.credit_account_id
        left join system_accounts sc on sc.account_id = t.credit_account_id
        where t.member_uid = $1 and ($2::bigint is null or t.transfer_id < $2)
        order by t.transfer_id desc
        limit $3
        """,
        member_uid,
        before_transfer_id,
        limit,
    )
    return rows


async def select_lots(conn: Conn, member_uid: int, limit: int) -> list[asyncpg.Record]:
    """The member's lots, oldest first (for the export)."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """
        select lot_id, amount, remaining, state, vests_at, expires_at, created_at from lots
        where member_uid = $1 order by lot_id limit $2
        """,
        member_uid,
        limit,
    )
    return rows


async def select_member_for_export(conn: Conn, member_uid: int) -> asyncpg.Record:
    row = one(
        await conn.fetchrow(
            """
        select member_id, created_at, tier, points_available, points_pending, points_held, points_debt,
               points_lifetime_earned, reputation
        from members where member_uid = $1
        """,
            member_uid,
        )
    )
    return row


async def select_live_member_uid(conn: Conn, member_id: str) -> int | None:
    """The member's uid, unless there is no such member or it is an erased member's pseudonym."""
    uid = await select_member_uid(conn, member_id)
    if uid is None:
        return None
    live: int | None = await conn.fetchval(
        "select member_uid from members where member_uid = $1 and erased_at is null", uid
    )
    return live


async def select_adjustments(conn: Conn, member_uid: int, limit: int) -> list[asyncpg.Record]:
    """The member's adjustments, oldest first (for the export)."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """
        select adjustment_id, points, reason_code, note, key_name as made_by, created_at from adjustments
        where member_uid = $1 order by adjustment_pk limit $2
        """,
        member_uid,
        limit,
    )
    return rows
