"""Rewards and redemptions SQL. Connection first; the use case commits."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import NamedTuple

import asyncpg

from konvert.db import Connection, Queryable, one
from konvert.ledger import keys
from konvert.program import Reward

_REWARD_COLUMNS = "reward_id, name, description, cost_points, stock, available_from, available_until, active"
_REDEMPTION_COLUMNS = """
    r.redemption_pk, r.redemption_id, m.member_id, r.member_uid, r.reward_id, r.points, r.status,
    r.hold_expires_at, r.allocations::text, r.transfer_id, r.closing_transfer_id, r.created_at, r.updated_at
"""


async def seed_rewards(conn: Connection, rewards: tuple[Reward, ...]) -> None:
    """Insert the program file's rewards that the catalog does not have yet (operator edits win)."""
    await conn.executemany(
        f"""
        insert into rewards ({_REWARD_COLUMNS}) values ($1, $2, $3, $4, $5, $6, $7, $8)
        on conflict (reward_id) do nothing
        """,
        [
            (
                r.reward_id,
                r.name,
                r.description,
                r.cost_points,
                r.stock,
                r.available_from,
                r.available_until,
                r.active,
            )
            for r in rewards
        ],
    )


async def select_available_rewards(conn: Queryable, now: datetime, limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"""
        select {_REWARD_COLUMNS} from rewards
        where active and (available_from is null or available_from <= $1)
          and (available_until is null or available_until > $1) and (stock is null or stock > 0)
        order by cost_points, reward_id limit $2
        """,
        now,
        limit,
    )


async def upsert_reward(conn: Queryable, reward: Reward) -> asyncpg.Record:
    return one(
        await conn.fetchrow(
            f"""
        insert into rewards ({_REWARD_COLUMNS}) values ($1, $2, $3, $4, $5, $6, $7, $8)
        on conflict (reward_id) do update set
            name = excluded.name, description = excluded.description, cost_points = excluded.cost_points,
            stock = excluded.stock, available_from = excluded.available_from,
            available_until = excluded.available_until, active = excluded.active, updated_at = now()
        returning {_REWARD_COLUMNS}
        """,
            reward.reward_id,
            reward.name,
            reward.description,
            reward.cost_points,
            reward.stock,
            reward.available_from,
            reward.available_until,
            reward.active,
        )
    )


async def select_reward(conn: Connection, reward_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow(f"select {_REWARD_COLUMNS} from rewards where reward_id = $1", reward_id)


async def take_one_from_stock(conn: Connection, reward_id: str) -> bool:
    """Take one unit of a limited-stock reward; False when none is left. Only rewards with a
    stock are locked (briefly, by this update): an unlimited reward is no row shared by all."""
    taken = await conn.fetchval(
        "update rewards set stock = stock - 1, updated_at = now() where reward_id = $1 and stock > 0 returning stock",
        reward_id,
    )
    return taken is not None


async def change_stock(conn: Connection, reward_id: str, delta: int) -> None:
    await conn.execute(
        "update rewards set stock = stock + $2, updated_at = now() where reward_id = $1 and stock is not null",
        reward_id,
        delta,
    )


async def select_redemption_replays(
    conn: Connection, keys_of: Sequence[tuple[int, str]]
) -> dict[tuple[int, str], asyncpg.Record]:
    """The redemptions recorded under these (member_uid, redemption_id), in one statement. Another
    member's is not found here: recording this one then fails on its claim of the id
    (konvert.ledger.keys), a 409."""
    rows = await conn.fetch(
        """
        select r.member_uid, r.redemption_id, r.request_hash, r.response
        from unnest($1::bigint[], $2::text[]) as k (member_uid, redemption_id)
        join redemptions r on r.member_uid = k.member_uid and r.redemption_id = k.redemption_id
        where r.member_uid = any($1::bigint[])
        """,
        [uid for uid, _ in keys_of],
        [redemption_id for _, redemption_id in keys_of],
    )
    return {(row["member_uid"], row["redemption_id"]): row for row in rows}


class NewRedemption(NamedTuple):
    redemption_id: str
    member_uid: int
    reward_id: str | None
    points: int
    status: str
    hold_expires_at: datetime | None
    allocations: str
    transfer_id: int
    note: str | None
    request_hash: bytes
    response: bytes
    created_at: datetime


# Each with the claim of its id (konvert.ledger.keys), which makes the id unique across members; the
# claims in id order, so that two batches holding ids the other wants wait in one direction only.
_INSERT_REDEMPTIONS = f"""
    with r as (
        select * from unnest($1::text[], $2::bigint[], $3::text[], $4::bigint[], $5::text[], $6::timestamptz[],
                             $7::text[], $8::bigint[], $9::text[], $10::bytea[], $11::bytea[], $12::timestamptz[])
             as r ({", ".join(NewRedemption._fields)})
    ), claimed as (
        insert into natural_keys (key, kind, scope, member_uid)
        select redemption_id, $13, '', member_uid from r order by redemption_id
        returning key
    )
    insert into redemptions (redemption_id, member_uid, reward_id, points, status, hold_expires_at, allocations,
                             transfer_id, note, request_hash, response, created_at, updated_at)
    select r.redemption_id, r.member_uid, r.reward_id, r.points, r.status, r.hold_expires_at, r.allocations::jsonb,
           r.transfer_id, r.note, r.request_hash, r.response, r.created_at, r.created_at
    from r join claimed c on c.key = r.redemption_id
"""


async def insert_redemptions(conn: Connection, redemptions: Sequence[NewRedemption]) -> None:
    """Record a batch's redemptions in one statement."""
    columns = [list(column) for column in zip(*redemptions, strict=True)]
    await conn.execute(_INSERT_REDEMPTIONS, *columns, keys.REDEMPTION)


async def select_redemption(
    conn: Connection, member_uid: int, redemption_id: str, lock: bool = False
) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"""
        select {_REDEMPTION_COLUMNS} from redemptions r join members m using (member_uid)
        where r.member_uid = $1 and r.redemption_id = $2 {"for update of r" if lock else ""}
        """,
        member_uid,
        redemption_id,
    )


async def close_redemption(
    conn: Connection, member_uid: int, redemption_pk: int, status: str, closing_transfer_id: int | None, now: datetime
) -> asyncpg.Record:
    return one(
        await conn.fetchrow(
            """
        update redemptions set status = $3, closing_transfer_id = $4, updated_at = $5
        where member_uid = $1 and redemption_pk = $2
        returning updated_at
        """,
            member_uid,
            redemption_pk,
            status,
            closing_transfer_id,
            now,
        )
    )


async def select_member_redemptions(
    conn: Queryable, member_uid: int, before_pk: int | None, limit: int
) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"""
        select {_REDEMPTION_COLUMNS} from redemptions r join members m using (member_uid)
        where r.member_uid = $1 and ($2::bigint is null or r.redemption_pk < $2)
        order by r.redemption_pk desc limit $3
        """,
        member_uid,
        before_pk,
        limit,
    )


async def select_expired_holds(conn: Queryable, now: datetime, limit: int) -> list[str]:
    rows = await conn.fetch(
        """
        select redemption_id from redemptions where status = 'held' and hold_expires_at <= $1
        order by hold_expires_at limit $2
        """,
        now,
        limit,
    )
    return [r["redemption_id"] for r in rows]


# --- export and erasure --------------------------------------------------------------------


async def select_redemptions(conn: Queryable, member_uid: int, limit: int) -> list[asyncpg.Record]:
    """The member's redemptions, oldest first."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """
        select redemption_id, reward_id, points, status, note, created_at, updated_at from redemptions
        where member_uid = $1 order by redemption_pk limit $2
        """,
        member_uid,
        limit,
    )
    return rows


async def select_noted_transfers(conn: Connection, member_uid: int) -> list[asyncpg.Record]:
    """The member's redemptions that carry a client's note, with their transfer."""
    rows: list[asyncpg.Record] = await conn.fetch(
        "select transfer_id, reward_id from redemptions where member_uid = $1 and note is not null", member_uid
    )
    return rows


async def forget_requests(conn: Connection, member_uid: int, erased_hash: bytes, renamed: str) -> None:
    """Erasure: notes go; stored responses get the pseudonym (``renamed``: the JSON fields written
    over them) and old requests can no longer be replayed."""
    await conn.execute(
        """
        update redemptions
        set note = null, request_hash = $2,
            response = convert_to((convert_from(response, 'UTF8')::jsonb || $3::jsonb)::text, 'UTF8')
        where member_uid = $1
        """,
        member_uid,
        erased_hash,
        renamed,
    )
