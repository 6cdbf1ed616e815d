"""Integrations SQL: integrations, identity links and the deliveries inbox. Connection first."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import NamedTuple

import asyncpg

from konvert.db import Connection

_INTEGRATION = "integration_id, name, kind, partner, options, secrets, created_at, updated_at"
_DELIVERY = (
    "delivery_pk, delivery_key, topic, status, received_at, updated_at, attempts, external_id, action, results, "
    "error_code, error, member_uid"
)


async def upsert_integration(
    conn: Connection, name: str, kind: str, partner: str | None, options: bytes, secrets: list[str]
) -> tuple[asyncpg.Record, bool]:
    """Create or replace an integration; returns its row and whether it is new. Its kind is fixed."""
    row = await conn.fetchrow(
        f"""
        insert into integrations (name, kind, partner, options, secrets) values ($1, $2, $3, $4::jsonb, $5)
        on conflict (name) do update
            set partner = excluded.partner, options = excluded.options, secrets = excluded.secrets,
                updated_at = now()
            where integrations.kind = excluded.kind
        returning {_INTEGRATION}, (xmax = 0) as created
        """,
        name,
        kind,
        partner,
        options.decode(),
        secrets,
    )
    assert row is None or isinstance(row, asyncpg.Record)
    return (row, bool(row["created"])) if row is not None else (None, False)  # type: ignore[return-value]


async def select_integration(conn: Connection | asyncpg.Pool, name: str) -> asyncpg.Record | None:
    return await conn.fetchrow(f"select {_INTEGRATION} from integrations where name = $1", name)


async def select_integrations(conn: Connection) -> list[asyncpg.Record]:
    return await conn.fetch(f"select {_INTEGRATION} from integrations order by name")


async def update_secrets(conn: Connection, integration_id: int, secrets: list[str]) -> None:
    await conn.execute("update integrations set secrets = $2 where integration_id = $1", integration_id, secrets)


async def delete_integration(conn: Connection, name: str) -> bool:
    """The integration, its deliveries and (by cascade) its identity links."""
    async with conn.transaction():
        integration_id = await conn.fetchval("delete from integrations where name = $1 returning integration_id", name)
        if integration_id is not None:
            await conn.execute("delete from deliveries where integration_id = $1", integration_id)
    return integration_id is not None


# --- identity links ---------------------------------------------------------------------------


async def select_linked_members(conn: Connection, integration_id: int, external_ids: Sequence[str]) -> dict[str, str]:
    """The live member ids linked to these external ids, by external id."""
    rows = await conn.fetch(
        """
        select l.external_id, m.member_id from identity_links l join members m using (member_uid)
        where l.integration_id = $1 and l.external_id = any($2::text[])
        """,
        integration_id,
        list(external_ids),
    )
    return {row["external_id"]: row["member_id"] for row in rows}


async def insert_link(conn: Connection, integration_id: int, external_id: str, member_uid: int) -> asyncpg.Record:
    """Link an external id to a member; the existing link if there is one (for any member)."""
    row = await conn.fetchrow(
        """
        with new as (
            insert into identity_links (integration_id, external_id, member_uid) values ($1, $2, $3)
            on conflict (integration_id, external_id) do nothing
            returning member_uid, linked_at
        )
        select member_uid, linked_at, true as created from new
        union all
        select member_uid, linked_at, false from identity_links where integration_id = $1 and external_id = $2
        limit 1
        """,
        integration_id,
        external_id,
        member_uid,
    )
    assert row is not None
    return row


async def select_member_links(conn: Connection, member_uid: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        """
        select i.name as integration, l.external_id, l.linked_at
        from identity_links l join integrations i using (integration_id)
        where l.member_uid = $1 order by i.name, l.external_id
        """,
        member_uid,
    )


async def delete_link(conn: Connection, integration_id: int, external_id: str, member_uid: int) -> bool:
    status = await conn.execute(
        "delete from identity_links where integration_id = $1 and external_id = $2 and member_uid = $3",
        integration_id,
        external_id,
        member_uid,
    )
    return status == "DELETE 1"


# --- the inbox --------------------------------------------------------------------------------


async def select_delivery(conn: Connection | asyncpg.Pool, integration_id: int, key: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"select {_DELIVERY} from deliveries where integration_id = $1 and delivery_key = $2", integration_id, key
    )


# A delivery as it arrives: its integration, its key, and the customer whose link names its member.
Arrival = tuple[int, str, str | None]


async def select_arrivals(
    conn: Connection | asyncpg.Pool, arrivals: Sequence[Arrival]
) -> dict[Arrival, tuple[asyncpg.Record | None, str | None]]:
    """Per arrival: the delivery recorded under its key (None: a new one), and the live member
    linked to its customer (None: no link, or no customer asked for). Many arrivals, two
    statements at most: the deliveries and links by their keys, then the linked members' ids by
    uid (only when there are links). Each reads one table by its distribution column's values
    (konvert.distribution), so that Citus sends it to those values' shards alone."""
    rows = await conn.fetch(
        f"""
        with d as (
            select integration_id, {_DELIVERY} from deliveries
            where integration_id = any($1::bigint[]) and delivery_key = any($2::text[])
        ), l as (
            select integration_id, external_id, member_uid from identity_links
            where integration_id = any($1::bigint[]) and external_id = any($3::text[])
        )
        select a.i, d.delivery_pk is not null as recorded, d.*, l.member_uid as linked_uid
        from unnest($1::bigint[], $2::text[], $3::text[])
            with ordinality as a (integration_id, delivery_key, external_id, i)
        left join d on d.integration_id = a.integration_id and d.delivery_key = a.delivery_key
        left join l on l.integration_id = a.integration_id and l.external_id = a.external_id
        """,
        [arrival[0] for arrival in arrivals],
        [arrival[1] for arrival in arrivals],
        [arrival[2] for arrival in arrivals],
    )
    linked = {row["linked_uid"] for row in rows if row["linked_uid"] is not None}
    members: dict[int, str] = {}
    if linked:
        members = {
            row["member_uid"]: row["member_id"]
            for row in await conn.fetch(
                "select member_uid, member_id from members where member_uid = any($1::bigint[])", list(linked)
            )
        }
    return {arrivals[row["i"] - 1]: (row if row["recorded"] else None, members.get(row["linked_uid"])) for row in rows}


class NewDelivery(NamedTuple):
    integration_id: int
    key: str
    topic: str
    received_at: datetime
    status: str
    external_id: str | None
    # The member it was applied to, by id.
    member_id: str | None
    action: bytes | None
    results: bytes
    error_code: str | None
    error: str | None


async def insert_deliveries(conn: Connection, deliveries: Sequence[NewDelivery]) -> list[asyncpg.Record]:
    """Record deliveries in one statement, in key order (so that concurrent batches meet on the
    unique key in the same order); those whose key was recorded before (duplicates) are left out
    of what it returns."""
    columns = list(zip(*deliveries, strict=True))
    return await conn.fetch(
        f"""
        insert into deliveries (integration_id, delivery_key, topic, received_at, status, external_id, member_uid,
                                action, results, error_code, error, updated_at)
        select d.integration_id, d.delivery_key, d.topic, d.received_at, d.status, d.external_id, m.member_uid,
               d.action, d.results, d.error_code, d.error, d.received_at
        from unnest($1::bigint[], $2::text[], $3::text[], $4::timestamptz[], $5::text[], $6::text[], $7::text[],
                    $8::jsonb[], $9::jsonb[], $10::text[], $11::text[])
             as d(integration_id, delivery_key, topic, received_at, status, external_id, member_id, action, results,
                  error_code, error)
        left join natural_keys m on m.key = d.member_id and m.kind = 'member' and m.scope = ''
        order by d.integration_id, d.delivery_key
        on conflict (integration_id, delivery_key) do nothing
        returning integration_id, {_DELIVERY}
        """,
        *columns[:7],
        [None if action is None else action.decode() for action in columns[7]],
        [results.decode() for results in columns[8]],
        *columns[9:],
    )


async def select_delivery_by_pk(conn: Connection, delivery_pk: int) -> asyncpg.Record | None:
    return await conn.fetchrow(f"select {_DELIVERY} from deliveries where delivery_pk = $1", delivery_pk)


async def update_delivery(
    conn: Connection,
    delivery_pk: int,
    status: str,
    now: datetime,
    *,
    member_id: str | None,
    results: bytes,
    error_code: str | None,
    error: str | None,
) -> asyncpg.Record | None:
    """A retried delivery's new state; None when it is no longer failed or parked (a concurrent
    retry applied it)."""
    return await conn.fetchrow(
        f"""
        update deliveries set status = $2, updated_at = $3, attempts = attempts + 1,
            member_uid = coalesce(
                (select member_uid from natural_keys where key = $4 and kind = 'member' and scope = ''), member_uid
            ),
            results = $5::jsonb, error_code = $6, error = $7,
            external_id = case when $2 = 'parked' then external_id end
        where delivery_pk = $1 and status in ('failed', 'parked')
        returning {_DELIVERY}
        """,
        delivery_pk,
        status,
        now,
        member_id,
        results.decode(),
        error_code,
        error,
    )


async def select_deliveries(
    conn: Connection, integration_id: int, status: str | None, before: int | None, limit: int
) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"""
        select {_DELIVERY} from deliveries
        where integration_id = $1 and ($2::text is null or status = $2) and ($3::bigint is null or delivery_pk < $3)
        order by delivery_pk desc limit $4
        """,
        integration_id,
        status,
        before,
        limit,
    )


async def select_to_retry(
    conn: Connection, integration_id: int, statuses: Sequence[str], external_id: str | None, after: int, limit: int
) -> list[int]:
    """Failed or parked deliveries with an action to apply, oldest first."""
    rows = await conn.fetch(
        """
        select delivery_pk from deliveries
        where integration_id = $1 and status = any($2::text[]) and action is not null
          and ($3::text is null or external_id = $3) and delivery_pk > $4
        order by delivery_pk limit $5
        """,
        integration_id,
        list(statuses),
        external_id,
        after,
        limit,
    )
    return [row["delivery_pk"] for row in rows]


async def select_failed_refunds_of(conn: Connection, integration_id: int, purchase_ids: Sequence[str]) -> list[int]:
    """Refunds that failed because their purchase was not recorded yet, of these purchases."""
    rows = await conn.fetch(
        """
        select delivery_pk from deliveries
        where integration_id = $1 and status = 'failed' and error_code = 'purchase_not_found'
          and action->>'purchase_id' = any($2::text[])
        order by delivery_pk
        """,
        integration_id,
        list(purchase_ids),
    )
    return [row["delivery_pk"] for row in rows]


async def delete_expired_parked(conn: Connection, older_than: datetime, limit: int) -> int:
    status = await conn.execute(
        """
        delete from deliveries where delivery_pk in (
            select delivery_pk from deliveries where status = 'parked' and received_at < $1 limit $2
        )
        """,
        older_than,
        limit,
    )
    return int(status.split()[-1])


async def select_member_deliveries(conn: Connection, member_uid: int, limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"""
        select i.name as integration, {", ".join("d." + c.strip() for c in _DELIVERY.split(","))}
        from deliveries d join integrations i using (integration_id)
        where d.member_uid = $1 order by d.delivery_pk limit $2
        """,
        member_uid,
        limit,
    )


async def forget_member(conn: Connection, member_uid: int) -> None:
    """Erasure: the member's links go; their deliveries keep what they did, without who it was."""
    external_ids = await conn.fetch(
        "delete from identity_links where member_uid = $1 returning integration_id, external_id", member_uid
    )
    await conn.execute(
        """
        delete from deliveries d using unnest($1::bigint[], $2::text[]) as gone(integration_id, external_id)
        where d.integration_id = gone.integration_id and d.external_id = gone.external_id and d.status = 'parked'
        """,
        [row["integration_id"] for row in external_ids],
        [row["external_id"] for row in external_ids],
    )
    await conn.execute(
        "update deliveries set member_uid = null, external_id = null, action = null, results = '{}' "
        "where member_uid = $1",
        member_uid,
    )
