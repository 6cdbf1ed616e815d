"""The ledger's SQL for one member at a time: members, accounts, lots, lot entries, transfers.

Together with konvert.ledger.batches this is the only code that writes these tables or moves a
member's balance ``version``; features ask the ledger core (konvert.ledger.book) to do it inside
their own transaction. Plain async functions, connection first; none of them commits.

A member's accounts are named in the statements that use them ((member_uid, asset, name) is
unique), so callers never handle member account ids. Every statement that changes a member's
balances bumps ``version`` and returns the member's row (MEMBER_COLUMNS).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple

import asyncpg

from konvert.db import Connection, Queryable, one
from konvert.ledger import keys
from konvert.ledger.rules import OpenLot

# Every member has these accounts, created with the member.
MEMBER_ACCOUNTS = (("points", "available"), ("points", "pending"), ("points", "held"), ("reputation", "reputation"))

# What the ledger reads of a member's row, and returns after changing it.
MEMBER_COLUMNS = """member_uid, member_id, points_available, points_pending, points_held, points_debt,
    points_lifetime_earned, reputation, version, erased_at, tier, tier_below_since, tier_qualifying_points"""


async def select_member_uid(conn: Queryable, member_id: str) -> int | None:
    """The uid of the member with this id (an erased member's: its pseudonym), or None."""
    return await keys.select_key_member(conn, keys.MEMBER, member_id)


async def select_member_uids(conn: Queryable, member_ids: Sequence[str]) -> dict[str, int]:
    """The uids of the members with these ids (those that exist), by id: the statement on the ids'
    shards that comes before the statements on the members' own."""
    rows = await conn.fetch(
        "select key, member_uid from natural_keys where key = any($1::text[]) and kind = 'member' and scope = ''",
        list(member_ids),
    )
    return {row["key"]: row["member_uid"] for row in rows}


async def insert_members(conn: Connection, member_ids: Sequence[str]) -> None:
    """Create the members that do not exist yet, each with its accounts, and claim their ids.

    In member id order, so that two transactions creating the same members never wait on each
    other's claims in a circle. A member created meanwhile by another transaction is left as it is.
    """
    await conn.execute(
        """
        with claimed as (
            insert into natural_keys (key, kind, scope, member_uid)
            select member_id, 'member', '', nextval('members_member_uid_seq')
            from unnest($1::text[]) as m (member_id) order by member_id
            on conflict do nothing
            returning key, member_uid
        ), member as (
            insert into members (member_uid, member_id)
            overriding system value
            select member_uid, key from claimed
            returning member_uid
        )
        insert into accounts (member_uid, asset, name)
        select member.member_uid, a.asset, a.name
        from member, unnest($2::text[], $3::text[]) as a (asset, name)
        """,
        sorted(set(member_ids)),
        [asset for asset, _ in MEMBER_ACCOUNTS],
        [name for _, name in MEMBER_ACCOUNTS],
    )


async def lock_members(
    conn: Connection, *, uids: Sequence[int] = (), ids: Sequence[str] = (), one_by_one: bool = False
) -> list[asyncpg.Record]:
    """Lock the members' rows (those that exist, named by uid or by id) until the transaction
    ends, in member_uid order: the order of every writer that locks several members, so that two
    of them never wait for each other in a circle. Ids are resolved first (``select_member_uids``);
    a member renamed by an erasure meanwhile is not the one its old id named, and is left out.

    ``one_by_one`` locks each member with a statement of its own (KONVERT_LOCK_MEMBERS), all of
    them sent in one round trip and run in order."""
    by_id = await select_member_uids(conn, ids) if ids else {}
    rows = await lock_by_member(conn, (LOCK_MEMBERS, LOCK_MEMBER), sorted({*uids, *by_id.values()}), one_by_one)
    named = {uid: member_id for member_id, uid in by_id.items()}
    wanted = set(uids)
    return [row for row in rows if row["member_uid"] in wanted or named.get(row["member_uid"]) == row["member_id"]]


async def lock_by_member(
    conn: Connection, statements: tuple[str, str], uids: Sequence[int], one_by_one: bool, *args: Any
) -> list[asyncpg.Record]:
    """The rows a locking statement returns for members ($1 their uids, then ``args``), by the
    first of ``statements``, which names them all; or with ``one_by_one`` (KONVERT_LOCK_MEMBERS)
    by the second, which names one member ($1 its uid): a statement per member, in the order
    given, all sent in one round trip (asyncpg's ``fetchmany``) and run one after the other. For
    locks that Citus must send to one shard each."""
    together, each = statements
    if not one_by_one:
        rows: list[asyncpg.Record] = await conn.fetch(together, uids, *args)
        return rows
    return await conn.fetchmany(each, [(uid, *args) for uid in uids]) if uids else []


LOCK_MEMBERS = (
    f"select {MEMBER_COLUMNS} from members where member_uid = any($1::bigint[]) order by member_uid for update"
)
# One member's: Citus runs a statement that locks rows only when it goes to one shard
# (docs/SCALING.md, "Locking several members").
LOCK_MEMBER = f"select {MEMBER_COLUMNS} from members where member_uid = $1 for update"


async def rename_member(conn: Connection, member_uid: int, pseudonym: str, now: datetime) -> asyncpg.Record:
    """An erasure: the member id becomes ``pseudonym`` (the old id is free again, the pseudonym
    claimed); the balances stay, under a new version. The member is locked by the caller."""
    row = one(
        await conn.fetchrow(
            f"""
        with old as (
            select member_id from members where member_uid = $1
        ), released as (
            delete from natural_keys k using old
            where k.key = old.member_id and k.kind = 'member' and k.scope = '' and k.member_uid = $1
        ), claimed as (
            insert into natural_keys (key, kind, scope, member_uid) values ($2, 'member', '', $1)
        )
        update members set member_id = $2, erased_at = $3, version = version + 1
        where member_uid = $1 returning {MEMBER_COLUMNS}
        """,
            member_uid,
            pseudonym,
            now,
        )
    )
    return row


# --- system accounts ---------------------------------------------------------------------------


async def select_system_account(conn: Connection, asset: str, name: str) -> int | None:
    account_id: int | None = await conn.fetchval(
        "select account_id from system_accounts where asset = $1 and name = $2", asset, name
    )
    return account_id


async def insert_system_account(conn: Connection, asset: str, name: str) -> int | None:
    """Create a system account; None when it exists already (or a concurrent transaction made it)."""
    account_id: int | None = await conn.fetchval(
        """
        insert into system_accounts (asset, name) values ($1, $2)
        on conflict (asset, name) do nothing
        returning account_id
        """,
        asset,
        name,
    )
    return account_id


# --- lots --------------------------------------------------------------------------------------


class LockedLot(NamedTuple):
    lot_id: int
    remaining: int
    state: str
    expires_at: datetime | None


async def lock_lot(conn: Connection, member_uid: int, lot_id: int) -> LockedLot | None:
    row = await conn.fetchrow(
        "select lot_id, remaining, state, expires_at from lots where member_uid = $1 and lot_id = $2 for update",
        member_uid,
        lot_id,
    )
    return LockedLot(*row) if row is not None else None


async def lock_available_lots(conn: Connection, member_uid: int, exclude_lot_id: int | None = None) -> list[OpenLot]:
    """A member's available lots with points left, soonest expiring first (never-expiring last)."""
    rows = await conn.fetch(
        """
        select lot_id, remaining from lots
        where member_uid = $1 and state = 'available' and remaining > 0 and lot_id is distinct from $2
        order by expires_at nulls last, lot_id
        for update
        """,
        member_uid,
        exclude_lot_id,
    )
    return [OpenLot(row["lot_id"], row["remaining"]) for row in rows]


async def lock_lot_states(conn: Connection, member_uid: int, lot_ids: Sequence[int]) -> dict[int, str]:
    rows = await conn.fetch(
        """
        select lot_id, state from lots where member_uid = $1 and lot_id = any($2::bigint[])
        order by lot_id for update
        """,
        member_uid,
        list(lot_ids),
    )
    return {row["lot_id"]: row["state"] for row in rows}


async def lock_due_lots(conn: Connection, member_uid: int, now: datetime) -> list[LockedLot]:
    """The member's lots whose expiry has come, soonest first."""
    rows = await conn.fetch(
        """
        select lot_id, remaining, state, expires_at from lots
        where member_uid = $1 and state <> 'expired' and expires_at <= $2
        order by expires_at, lot_id for update
        """,
        member_uid,
        now,
    )
    return [LockedLot(*row) for row in rows]


async def select_expired_from_lot(conn: Connection, member_uid: int, lot_id: int) -> int:
    """Points the member's lot lost to expiry."""
    expired: int = await conn.fetchval(
        "select coalesce(sum(amount), 0) from lot_entries where member_uid = $1 and lot_id = $2 and kind = 'expire'",
        member_uid,
        lot_id,
    )
    return expired


async def vest_lots(conn: Connection, member_uid: int, lot_ids: Sequence[int], now: datetime) -> list[OpenLot]:
    """Make the member's due pending lots among ``lot_ids`` available; return those that changed
    (what they hold moves by a transfer: ``post``)."""
    rows = await conn.fetch(
        """
        update lots set state = 'available'
        where lot_id = any($2::bigint[]) and member_uid = $1 and state = 'pending' and vests_at <= $3
        returning lot_id, remaining
        """,
        member_uid,
        list(lot_ids),
        now,
    )
    return [OpenLot(row["lot_id"], row["remaining"]) for row in rows]


async def mark_lots(conn: Connection, member_uid: int, lot_ids: Sequence[int], state: str) -> None:
    """Move the member's lots to ``state`` (available when they vest, expired when they expire);
    what they hold is moved by transfers and lot entries (``post``)."""
    await conn.execute(
        "update lots set state = $3 where member_uid = $1 and lot_id = any($2::bigint[])",
        member_uid,
        list(lot_ids),
        state,
    )


async def credit_lot(
    conn: Connection,
    member_uid: int,
    *,
    points: int,
    state: str,
    vests_at: datetime,
    expires_at: datetime | None,
    source_account_id: int,
    code: str,
    cause_type: str,
    cause_ref: str,
    reason: str,
    lifetime: bool,
) -> asyncpg.Record:
    """Points into a new lot of the member's (pending or available): the lot, the transfer from the
    source account to the member's account of that state, the balances. Returns lot_id,
    transfer_id and the member's row."""
    row = one(
        await conn.fetchrow(
            f"""
        with lot as (
            insert into lots (member_uid, amount, remaining, state, vests_at, expires_at)
            values ($1, $2, $2, $3, $4, $5)
            returning lot_id
        ), transfer as (
            insert into transfers (member_uid, asset, debit_account_id, credit_account_id, amount, code,
                                   cause_type, cause_ref, lot_id, reason)
            select $1, 'points', $6, a.account_id, $2, $7, $8, $9, lot.lot_id, $10
            from lot left join accounts a on a.member_uid = $1 and a.asset = 'points' and a.name = $3
            returning transfer_id, lot_id
        ), member as (
            update members
            set points_available = points_available + case when $3 = 'available' then $2 else 0 end,
                points_pending = points_pending + case when $3 = 'pending' then $2 else 0 end,
                points_lifetime_earned = points_lifetime_earned + case when $11 then $2 else 0 end,
                version = version + 1
            where member_uid = $1
            returning {MEMBER_COLUMNS}
        )
        select transfer.lot_id, transfer.transfer_id, member.* from transfer, member
        """,
            member_uid,
            points,
            state,
            vests_at,
            expires_at,
            source_account_id,
            code,
            cause_type,
            cause_ref,
            reason,
            lifetime,
        )
    )
    return row


# --- transfers ---------------------------------------------------------------------------------


class Leg(NamedTuple):
    """One transfer of a posting. Each side is a system account (by id) or one of the member's own
    accounts (by name: available, pending, held, reputation)."""

    asset: str
    amount: int
    code: str
    cause_type: str
    cause_ref: str
    reason: str
    debit_account_id: int | None = None
    debit_bucket: str | None = None
    credit_account_id: int | None = None
    credit_bucket: str | None = None
    lot_id: int | None = None
    reverses_transfer_id: int | None = None


class LotTake(NamedTuple):
    """Points taken from a lot (negative: given back), as a lot entry naming the transfer by its
    index in the posting's legs (None: no transfer, a refund debt repaid from the lot)."""

    lot_id: int
    points: int
    leg: int | None
    kind: str


class Deltas(NamedTuple):
    available: int = 0
    pending: int = 0
    held: int = 0
    debt: int = 0
    lifetime_earned: int = 0
    reputation: int = 0


async def post(
    conn: Connection, member_uid: int, legs: Sequence[Leg], takes: Sequence[LotTake], deltas: Deltas
) -> tuple[list[int], asyncpg.Record]:
    """One change to a member's books in one statement: its transfers, what they take from (or give
    back to) lots with an entry each, and the member's balances (version + 1). Returns the
    transfers' ids in the order of ``legs`` and the member's row.

    A member account that does not exist leaves a transfer's account null, which the table
    refuses: the statement then fails whole instead of writing half a change."""
    row = one(
        await conn.fetchrow(
            _POST,
            member_uid,
            [leg.asset for leg in legs],
            [leg.amount for leg in legs],
            [leg.code for leg in legs],
            [leg.cause_type for leg in legs],
            [leg.cause_ref for leg in legs],
            [leg.reason for leg in legs],
            [leg.debit_account_id for leg in legs],
            [leg.debit_bucket for leg in legs],
            [leg.credit_account_id for leg in legs],
            [leg.credit_bucket for leg in legs],
            [leg.lot_id for leg in legs],
            [leg.reverses_transfer_id for leg in legs],
            [take.lot_id for take in takes],
            [take.points for take in takes],
            [None if take.leg is None else take.leg + 1 for take in takes],
            [take.kind for take in takes],
            *deltas,
        )
    )
    return list(row["transfer_ids"] or []), row


_POST = f"""
with leg as materialized (
    select l.*, nextval('transfers_transfer_id_seq') as transfer_id
    from unnest($2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[], $8::bigint[],
                $9::text[], $10::bigint[], $11::text[], $12::bigint[], $13::bigint[])
         with ordinality as l (asset, amount, code, cause_type, cause_ref, reason, debit_account_id, debit_bucket,
                               credit_account_id, credit_bucket, lot_id, reverses_transfer_id, ord)
), transfer as (
    insert into transfers (transfer_id, member_uid, asset, debit_account_id, credit_account_id, amount, code,
                           cause_type, cause_ref, lot_id, reverses_transfer_id, reason)
    overriding system value
    select l.transfer_id, $1, l.asset, coalesce(l.debit_account_id, d.account_id),
           coalesce(l.credit_account_id, c.account_id), l.amount, l.code, l.cause_type, l.cause_ref, l.lot_id,
           l.reverses_transfer_id, l.reason
    from leg l
    left join accounts d on d.member_uid = $1 and d.asset = l.asset and d.name = l.debit_bucket
    left join accounts c on c.member_uid = $1 and c.asset = l.asset and c.name = l.credit_bucket
    order by l.ord
), take as (
    select * from unnest($14::bigint[], $15::bigint[], $16::bigint[], $17::text[]) as t (lot_id, points, leg, kind)
), taken as (
    update lots set remaining = lots.remaining - t.points
    from (select lot_id, sum(points) as points from take group by lot_id) t
    where lots.member_uid = $1 and lots.lot_id = t.lot_id
), entry as (
    insert into lot_entries (lot_id, member_uid, transfer_id, amount, kind)
    select t.lot_id, $1, l.transfer_id, t.points, t.kind from take t left join leg l on l.ord = t.leg
), member as (
    update members
    set points_available = points_available + $18, points_pending = points_pending + $19,
        points_held = points_held + $20, points_debt = points_debt + $21,
        points_lifetime_earned = points_lifetime_earned + $22, reputation = reputation + $23,
        version = version + 1
    where member_uid = $1
    returning {MEMBER_COLUMNS}
)
select (select array_agg(transfer_id order by ord) from leg) as transfer_ids, member.* from member
"""


async def replace_transfer_reasons(conn: Connection, member_uid: int, reasons: Sequence[tuple[int, str]]) -> None:
    """Write new reasons over some of the member's transfers: erasure takes out a client's free
    text that a reason carried. Nothing else of a transfer ever changes."""
    await conn.execute(
        """
        update transfers t set reason = r.reason
        from unnest($2::bigint[], $3::text[]) as r (transfer_id, reason)
        where t.transfer_id = r.transfer_id and t.member_uid = $1
        """,
        member_uid,
        [transfer_id for transfer_id, _ in reasons],
        [reason for _, reason in reasons],
    )


async def reset_transfer_reasons(conn: Connection, member_uid: int, cause_type: str, reason: str) -> None:
    """``replace_transfer_reasons`` for every transfer of the member with this cause type."""
    await conn.execute(
        """
        update transfers set reason = $3
        where member_uid = $1 and cause_type = $2 and reason is distinct from $3
        """,
        member_uid,
        cause_type,
        reason,
    )


# --- tiers ----------------------------------------------------------------------------------


class TierStanding(NamedTuple):
    """A member's tier as the tiers feature decided it: stored on the member, shown with the balance."""

    member_uid: int
    tier: str | None
    below_since: datetime | None
    qualifying_points: int
    changed: bool


async def store_tier_standings(
    conn: Connection, standings: Sequence[TierStanding], evaluated_at: datetime
) -> list[asyncpg.Record]:
    """Store tier standings of members this transaction holds locked, stamped as evaluated at
    ``evaluated_at``; the version moves where the standing changed. Returns member_uid,
    member_id and version of every member stored."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """
        update members m
        set tier = s.tier, tier_below_since = s.below_since, tier_qualifying_points = s.points,
            tier_evaluated_at = $6, version = m.version + s.changed::int
        from unnest($1::bigint[], $2::text[], $3::timestamptz[], $4::bigint[], $5::bool[])
             as s (member_uid, tier, below_since, points, changed)
        where m.member_uid = s.member_uid
        returning m.member_uid, m.member_id, m.version
        """,
        [s.member_uid for s in standings],
        [s.tier for s in standings],
        [s.below_since for s in standings],
        [s.qualifying_points for s in standings],
        [s.changed for s in standings],
        evaluated_at,
    )
    return rows


# --- adjustments -----------------------------------------------------------------------------


async def select_adjustment_replay(conn: Queryable, adjustment_id: str) -> asyncpg.Record | None:
    """The recorded adjustment under this id (its member found by the key first), or None."""
    member_uid = await keys.select_key_member(conn, keys.ADJUSTMENT, adjustment_id)
    if member_uid is None:
        return None
    row: asyncpg.Record | None = await conn.fetchrow(
        "select request_hash, response from adjustments where member_uid = $1 and adjustment_id = $2",
        member_uid,
        adjustment_id,
    )
    return row


async def insert_adjustment(
    conn: Connection,
    *,
    adjustment_id: str,
    member_uid: int,
    points: int,
    reason_code: str,
    note: str,
    key_id: int,
    key_name: str,
    transfer_id: int,
    request_hash: bytes,
    response: bytes,
) -> None:
    """Record an adjustment and claim its id (another member's adjustment under the id fails the
    statement on natural_keys_pkey)."""
    await conn.execute(
        f"""
        with {keys.CLAIM_CTE}
        insert into adjustments (adjustment_id, member_uid, points, reason_code, note, key_id, key_name, transfer_id,
                                 request_hash, response)
        select $1, member_uid, $5, $6, $7, $8, $9, $10, $11, $12 from claimed
        """,
        adjustment_id,
        keys.ADJUSTMENT,
        "",
        member_uid,
        points,
        reason_code,
        note,
        key_id,
        key_name,
        transfer_id,
        request_hash,
        response,
    )


async def forget_adjustments(conn: Connection, member_uid: int, erased_hash: bytes, renamed: str) -> None:
    """Erasure: notes go (from adjustments and from their transfers' reasons, which become the
    reason code); stored responses get ``renamed`` (JSON fields written over them) and old requests
    can no longer be replayed."""
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
        update adjustments
        set note = '', request_hash = $2,
            response = convert_to((convert_from(response, 'UTF8')::jsonb || $3::jsonb)::text, 'UTF8')
        where member_uid = $1
        """,
        member_uid,
        erased_hash,
        renamed,
    )
