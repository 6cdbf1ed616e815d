"""Events SQL: reading the outbox in order, the publishers' cursors, webhook endpoints and
messages, pruning. Plain async functions, connection first.

The outbox is read in (xid, event_id) order, and only events of transactions older than every
transaction still running (``xid < pg_snapshot_xmin(pg_current_snapshot())``): an event that
commits later always comes after every position a reader has passed, so no reader skips one.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import NamedTuple

import asyncpg

from konvert.db import Connection, Queryable
from konvert.events.rules import Position

# An event as it is sent: the member's id is read from their row (the pseudonym once erased).
_ENVELOPE = """
select e.event_id, e.xid::text as xid, e.type, e.occurred_at, m.member_id, e.sequence, e.data::text as data
from outbox_events e left join members m on m.member_uid = e.member_uid
"""
_VISIBLE = "(e.xid, e.event_id) > ($1::text::xid8, $2) and e.xid < pg_snapshot_xmin(pg_current_snapshot())"


def position_of(row: asyncpg.Record) -> Position:
    return Position(int(row["xid"]), row["event_id"])


async def select_events_after(
    conn: Queryable, after: Position, limit: int, types: Sequence[str] = ()
) -> list[asyncpg.Record]:
    """Up to ``limit`` events after ``after`` in the outbox's order (of ``types`` only, if any)."""
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""
        {_ENVELOPE}
        where {_VISIBLE} and (cardinality($4::text[]) = 0 or e.type = any($4::text[]))
        order by e.xid, e.event_id
        limit $3
        """,
        str(after.xid),
        after.event_id,
        limit,
        list(types),
    )
    return rows


async def select_events(conn: Queryable, event_ids: Sequence[int]) -> dict[int, asyncpg.Record]:
    rows = await conn.fetch(f"{_ENVELOPE} where e.event_id = any($1::bigint[])", list(event_ids))
    return {row["event_id"]: row for row in rows}


async def select_member_events(conn: Queryable, member_uid: int, limit: int) -> list[asyncpg.Record]:
    """The member's events in the outbox, in their order, each with its webhook messages' states
    (JSON: endpoint_id, status, attempts, last_attempt_at, finished_at)."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """
        select e.event_id, e.type, e.occurred_at, e.sequence, e.data::text as data,
               coalesce((
                   select jsonb_agg(jsonb_build_object(
                              'endpoint_id', m.endpoint_id, 'status', m.status, 'attempts', m.attempts,
                              'last_attempt_at', m.last_attempt_at, 'finished_at', m.finished_at)
                          order by m.endpoint_id)
                   from webhook_messages m where m.member_uid = e.member_uid and m.event_id = e.event_id
               ), '[]')::text as deliveries
        from outbox_events e
        where e.member_uid = $1
        order by e.sequence
        limit $2
        """,
        member_uid,
        limit,
    )
    return rows


async def select_newest_event_id(conn: Queryable) -> int:
    newest: int = await conn.fetchval("select coalesce(max(event_id), 0) from outbox_events")
    return newest


async def unpublished_up_to(conn: Queryable, event_id: int) -> bool:
    """Whether a publisher's cursor has yet to pass an event up to ``event_id``."""
    behind: bool = await conn.fetchval(
        """
        select exists (
            select 1 from outbox_events e join event_cursors c on (e.xid, e.event_id) > (c.xid, c.event_id)
            where e.event_id <= $1
        )
        """,
        event_id,
    )
    return behind


# --- the publishers' cursors ------------------------------------------------------------------


async def has_events_after_cursor(conn: Queryable, name: str) -> bool:
    """Whether the cursor has an event to read: a look without a lock (an idle publisher's poll
    then writes nothing, not even a transaction id)."""
    cursor = await conn.fetchrow("select xid::text as xid, event_id from event_cursors where name = $1", name)
    if cursor is None:
        return False
    # The cursor as parameters, not joined, and the index's order with a limit rather than exists
    # (which drops the order and may scan the whole table when nothing is there): the lookup then
    # walks outbox_events_order_idx from the cursor, however many events are kept.
    found = await conn.fetchval(LOOK_AFTER, cursor["xid"], cursor["event_id"])
    return found is not None


LOOK_AFTER = f"select e.event_id from outbox_events e where {_VISIBLE} order by e.xid, e.event_id limit 1"


async def lock_cursor(conn: Connection, name: str) -> Position | None:
    """The cursor, locked for this transaction; None while another publisher holds it."""
    row = await conn.fetchrow(
        "select xid::text as xid, event_id from event_cursors where name = $1 for update skip locked", name
    )
    return position_of(row) if row is not None else None


async def move_cursor(conn: Connection, name: str, to: Position) -> None:
    await conn.execute(
        "update event_cursors set xid = $2::text::xid8, event_id = $3, updated_at = now() where name = $1",
        name,
        str(to.xid),
        to.event_id,
    )


class FanOut(NamedTuple):
    events: int
    messages: int
    # Messages that wait for a member's earlier one (see make_next_due).
    waiting: list[int]


async def fan_out(conn: Connection, after: Position, limit: int, now: datetime) -> FanOut:
    """One webhook message per (enabled endpoint that wants it, event) for the next ``limit``
    events after ``after``; the 'webhooks' cursor moves past them. One statement.

    A message is due at once if it is its member's first pending one for the endpoint; a later
    one waits (due at 'infinity') until the one before it is finished (make_next_due), so that
    leasing never walks past messages it may not send yet."""
    row = await conn.fetchrow(_FAN_OUT, str(after.xid), after.event_id, limit, now)
    assert row is not None
    return FanOut(row["events"], row["messages"], list(row["waiting"]))


_FAN_OUT = f"""
with batch as (
    select e.event_id, e.xid, e.type, e.member_uid, e.sequence from outbox_events e
    where {_VISIBLE}
    order by e.xid, e.event_id
    limit $3
), fanned as (
    insert into webhook_messages (endpoint_id, event_id, member_uid, sequence, next_attempt_at)
    select w.endpoint_id, b.event_id, b.member_uid, b.sequence,
           case when b.member_uid = 0
                  or (row_number() over (partition by w.endpoint_id, b.member_uid order by b.sequence) = 1
                      and not exists (select 1 from webhook_messages p where p.endpoint_id = w.endpoint_id
                                      and p.member_uid = b.member_uid and p.status = 'pending'))
                then $4::timestamptz else 'infinity'::timestamptz end
    from batch b
    join webhook_endpoints w on w.enabled and (cardinality(w.event_types) = 0 or b.type = any(w.event_types))
    order by b.xid, b.event_id, w.endpoint_id
    on conflict (member_uid, endpoint_id, event_id) do nothing
    returning message_id, next_attempt_at
), last as (
    select xid, event_id from batch order by xid desc, event_id desc limit 1
), moved as (
    update event_cursors c set xid = l.xid, event_id = l.event_id, updated_at = now()
    from last l where c.name = 'webhooks'
    returning 1
)
select (select count(*) from batch) as events, (select count(*) from fanned) as messages,
       (select coalesce(array_agg(message_id), '{{}}') from fanned where next_attempt_at = 'infinity') as waiting,
       (select count(*) from moved) as moved
"""


# --- endpoints --------------------------------------------------------------------------------

_ENDPOINT_COLUMNS = """endpoint_id, url, description, event_types, enabled, secret, previous_secret,
    previous_secret_expires_at, failing_since, disabled_reason, created_at, updated_at"""


async def upsert_endpoint(
    conn: Connection,
    endpoint_id: str,
    *,
    url: str,
    description: str,
    event_types: Sequence[str],
    enabled: bool,
    secret: str,
    now: datetime,
) -> tuple[asyncpg.Record, bool]:
    """Create the endpoint (with ``secret``) or change it (keeping its secret); returns its row
    and whether it was created. Enabling it again forgets its failures."""
    row = await conn.fetchrow(
        f"""
        insert into webhook_endpoints (endpoint_id, url, description, event_types, enabled, secret,
                                       created_at, updated_at)
        values ($1, $2, $3, $4, $5, $6, $7, $7)
        on conflict (endpoint_id) do update
        set url = excluded.url, description = excluded.description, event_types = excluded.event_types,
            enabled = excluded.enabled, updated_at = excluded.updated_at,
            failing_since = case when excluded.enabled then null else webhook_endpoints.failing_since end,
            disabled_reason = case when excluded.enabled then null else webhook_endpoints.disabled_reason end
        returning {_ENDPOINT_COLUMNS}, (xmax = 0) as created
        """,
        endpoint_id,
        url,
        description,
        list(event_types),
        enabled,
        secret,
        now,
    )
    assert row is not None
    return row, row["created"]


async def select_endpoint(conn: Queryable, endpoint_id: str) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        f"select {_ENDPOINT_COLUMNS} from webhook_endpoints where endpoint_id = $1", endpoint_id
    )
    return row


async def select_endpoints(conn: Queryable, limit: int, *, for_update: bool = False) -> list[asyncpg.Record]:
    lock = "for update" if for_update else ""
    rows: list[asyncpg.Record] = await conn.fetch(
        f"select {_ENDPOINT_COLUMNS} from webhook_endpoints order by endpoint_id limit $1 {lock}", limit
    )
    return rows


async def update_secrets(conn: Connection, endpoint_id: str, secret: str, previous_secret: str | None) -> None:
    """Store the endpoint's secrets as given (resealed)."""
    await conn.execute(
        "update webhook_endpoints set secret = $2, previous_secret = $3 where endpoint_id = $1",
        endpoint_id,
        secret,
        previous_secret,
    )


async def delete_endpoint(conn: Queryable, endpoint_id: str) -> bool:
    """Delete the endpoint and its messages; False if there was none."""
    deleted = await conn.fetchval("delete from webhook_endpoints where endpoint_id = $1 returning 1", endpoint_id)
    return deleted is not None


async def rotate_secret(
    conn: Queryable, endpoint_id: str, secret: str, grace_until: datetime, now: datetime
) -> asyncpg.Record | None:
    """The new secret signs from now on; the current one also signs until ``grace_until``."""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""
        update webhook_endpoints
        set previous_secret = secret, previous_secret_expires_at = $3, secret = $2, updated_at = $4
        where endpoint_id = $1
        returning {_ENDPOINT_COLUMNS}
        """,
        endpoint_id,
        secret,
        grace_until,
        now,
    )
    return row


async def select_due_endpoints(conn: Queryable, now: datetime, passed_over: Sequence[str]) -> list[asyncpg.Record]:
    """Enabled endpoints with messages due, but for ``passed_over`` (busy in this process)."""
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""
        select {_ENDPOINT_COLUMNS} from webhook_endpoints w
        where w.enabled and w.endpoint_id <> all($2::text[]) and exists (
            select 1 from webhook_messages m
            where m.endpoint_id = w.endpoint_id and m.status = 'pending' and m.next_attempt_at <= $1
        )
        """,
        now,
        list(passed_over),
    )
    return rows


async def mark_endpoints(conn: Queryable, succeeded: Sequence[str], failed: Sequence[str], now: datetime) -> None:
    """After attempts: an endpoint that took one is healthy; one that took none fails since now,
    unless it already did."""
    await conn.execute(
        """
        update webhook_endpoints
        set failing_since = case when endpoint_id = any($1::text[]) then null else coalesce(failing_since, $3) end
        where (endpoint_id = any($1::text[]) and failing_since is not null)
           or (endpoint_id = any($2::text[]) and failing_since is null)
        """,
        list(succeeded),
        list(failed),
        now,
    )


async def disable_failing_endpoints(conn: Connection, failing_before: datetime) -> list[asyncpg.Record]:
    """Disable the enabled endpoints failing since before ``failing_before``; returns them."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """
        update webhook_endpoints
        set enabled = false, disabled_reason = 'every attempt failed since ' || failing_since::text
        where enabled and failing_since <= $1
        returning endpoint_id, failing_since,
                  (select last_error from webhook_messages m where m.endpoint_id = webhook_endpoints.endpoint_id
                   and m.last_error is not null order by m.last_attempt_at desc nulls last limit 1) as last_error
        """,
        failing_before,
    )
    return rows


# --- messages ---------------------------------------------------------------------------------


async def claim_messages(
    conn: Queryable, endpoint_id: str, now: datetime, limit: int, lease_until: datetime, *, one_by_one: bool = False
) -> list[asyncpg.Record]:
    """Lease up to ``limit`` due messages of the endpoint for an attempt (until ``lease_until``):
    per member only the earliest pending one, so a member's events arrive in order. Messages other
    processes hold are passed over.

    ``one_by_one`` (KONVERT_LOCK_MEMBERS) finds the due messages without a lock, then leases each
    with a statement that names its member (all sent in one round trip), checking again that it
    is due: Citus locks rows only with a statement that goes to one shard."""
    if not one_by_one:
        rows: list[asyncpg.Record] = await conn.fetch(CLAIM, endpoint_id, now, limit, lease_until)
        return rows
    due = await conn.fetch(FIND_DUE_MESSAGES, endpoint_id, now, limit)
    if not due:
        return []
    leased: list[asyncpg.Record] = await conn.fetchmany(
        LEASE_MESSAGE, [(m["member_uid"], m["message_id"], endpoint_id, now, lease_until) for m in due]
    )
    return leased


# Only a member's first pending message is due (later ones wait at 'infinity', see fan_out), so
# the candidates are (nearly) all sendable. The member's earliest pending message is still checked
# per candidate by one probe of webhook_messages_member_order_idx: a re-sent dead letter is due
# beside its member's next message, and goes first. (A correlated subquery with a limit is always
# run that way, whatever the table's statistics say; events about konvert itself, member_uid 0's,
# have no order.) Candidates are read in webhook_messages_due_idx's order, so that the scan stops
# at the limit rather than probing every pending message before a sort, in the generic plan too.
FIND_DUE_MESSAGES = """
    select m.member_uid, m.message_id from webhook_messages m
    where m.endpoint_id = $1 and m.status = 'pending' and m.next_attempt_at <= $2
      and m.sequence is not distinct from (
          select p.sequence from webhook_messages p
          where p.endpoint_id = m.endpoint_id and p.member_uid = m.member_uid and p.status = 'pending'
          order by p.sequence
          limit 1
      )
    order by m.next_attempt_at
    limit $3
"""
CLAIM = f"""
with due as ({FIND_DUE_MESSAGES}    for update skip locked
)
update webhook_messages m
set next_attempt_at = $4, attempts = m.attempts + 1, first_attempt_at = coalesce(m.first_attempt_at, $2),
    last_attempt_at = $2
from due where m.message_id = due.message_id
returning m.message_id, m.endpoint_id, m.event_id, m.attempts, m.first_attempt_at
"""
# One message, named with its member ($1, $2), leased if it is still due ($3 the endpoint, $4 now,
# $5 the lease's end) and no other process holds it.
LEASE_MESSAGE = """
with due as (
    select m.message_id from webhook_messages m
    where m.member_uid = $1 and m.message_id = $2
      and m.endpoint_id = $3 and m.status = 'pending' and m.next_attempt_at <= $4
      and m.sequence is not distinct from (
          select p.sequence from webhook_messages p
          where p.endpoint_id = $3 and p.member_uid = $1 and p.status = 'pending'
          order by p.sequence
          limit 1
      )
    for update skip locked
)
update webhook_messages m
set next_attempt_at = $5, attempts = m.attempts + 1, first_attempt_at = coalesce(m.first_attempt_at, $4),
    last_attempt_at = $4
from due where m.member_uid = $1 and m.message_id = due.message_id
returning m.message_id, m.endpoint_id, m.event_id, m.attempts, m.first_attempt_at
"""


class Outcome(NamedTuple):
    """What an attempt came to: pending again (with its next attempt), delivered or failed."""

    message_id: int
    status: str
    next_attempt_at: datetime | None
    last_status: int | None
    last_error: str | None
    at: datetime


async def record_outcomes(conn: Queryable, outcomes: Sequence[Outcome]) -> None:
    if not outcomes:
        return
    await conn.execute(
        """
        update webhook_messages m
        set status = o.status, next_attempt_at = coalesce(o.next_attempt_at, m.next_attempt_at),
            last_status = o.last_status, last_error = o.last_error,
            finished_at = case when o.status = 'pending' then null else o.at end
        from unnest($1::bigint[], $2::text[], $3::timestamptz[], $4::integer[], $5::text[], $6::timestamptz[])
             as o (message_id, status, next_attempt_at, last_status, last_error, at)
        where m.message_id = o.message_id
        """,
        [o.message_id for o in outcomes],
        [o.status for o in outcomes],
        [o.next_attempt_at for o in outcomes],
        [o.last_status for o in outcomes],
        [o.last_error for o in outcomes],
        [o.at for o in outcomes],
    )


async def make_next_due(conn: Queryable, message_ids: Sequence[int], now: datetime) -> int:
    """For the (endpoint, member) of each of ``message_ids``: if the member's first pending message
    waits, it is due now. Returns how many became due.

    Run after the commit of what finished a message (an outcome) or added a waiting one (a
    fan-out): of two such transactions at once neither sees the other's rows before it commits,
    but whichever commits last runs this after both did, and sees them. A process that dies
    between its commit and this leaves the sweep (make_stranded_due) to do it."""
    if not message_ids:
        return 0
    count: int = await conn.fetchval(_MAKE_NEXT_DUE, list(message_ids), now)
    return count


# Each member's first pending message by one probe of webhook_messages_member_order_idx (a
# correlated subquery with a limit is always run that way), then updated by primary key: the
# waiting messages were often just written, and at the statistics of a table not yet analysed a
# join may otherwise walk every waiting message once per member. Only a pending message waits
# (at 'infinity', tested so that no index but the primary key serves the update).
_MAKE_NEXT_DUE = """
with heads as materialized (
    select (
        select p.message_id from webhook_messages p
        where p.endpoint_id = f.endpoint_id and p.member_uid = f.member_uid and p.status = 'pending'
        order by p.sequence
        limit 1
    ) as message_id
    from (
        select distinct m.endpoint_id, m.member_uid from webhook_messages m
        where m.message_id = any($1::bigint[]) and m.member_uid <> 0
    ) f
), made as (
    update webhook_messages w set next_attempt_at = $2
    where w.message_id = any(array(select message_id from heads))
      and not isfinite(w.next_attempt_at)
    returning 1
)
select count(*) from made
"""


async def make_stranded_due(conn: Queryable, now: datetime) -> int:
    """Waiting messages that are their member's first pending one (their predecessor finished in
    a process that died before make_next_due) are due now. Walks every waiting message: for a
    sweep now and then, not for every round."""
    count: int = await conn.fetchval(
        """
        with stranded as materialized (
            select m.message_id from webhook_endpoints e
            join webhook_messages m on m.endpoint_id = e.endpoint_id and m.status = 'pending'
                                   and m.next_attempt_at = 'infinity'
            where m.message_id = (
                select p.message_id from webhook_messages p
                where p.endpoint_id = m.endpoint_id and p.member_uid = m.member_uid and p.status = 'pending'
                order by p.sequence
                limit 1
            )
        ), made as (
            update webhook_messages w set next_attempt_at = $1
            where w.message_id = any(array(select message_id from stranded))
              and not isfinite(w.next_attempt_at)
            returning 1
        )
        select count(*) from made
        """,
        now,
    )
    return count


# A message waiting for its member's earlier one (at 'infinity') has no time of its own yet.
_MESSAGE_COLUMNS = """m.message_id, m.endpoint_id, m.event_id, e.type, m.status, m.attempts,
    case when isfinite(m.next_attempt_at) then m.next_attempt_at end as next_attempt_at, m.first_attempt_at,
    m.last_attempt_at, m.last_status, m.last_error, m.finished_at, m.created_at"""


async def select_messages(
    conn: Queryable, endpoint_id: str, status: str | None, before: int | None, limit: int
) -> list[asyncpg.Record]:
    """The endpoint's messages (of ``status``, if given), newest first, before message ``before``."""
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""
        select {_MESSAGE_COLUMNS}
        from webhook_messages m join outbox_events e using (member_uid, event_id)
        where m.endpoint_id = $1 and ($2::text is null or m.status = $2) and ($3::bigint is null or m.message_id < $3)
        order by m.message_id desc
        limit $4
        """,
        endpoint_id,
        status,
        before,
        limit,
    )
    return rows


async def resend_message(conn: Queryable, endpoint_id: str, message_id: int, now: datetime) -> asyncpg.Record | None:
    """A dead-lettered message pending again, due now, with a full retry schedule ahead of it."""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""
        with resent as (
            update webhook_messages
            set status = 'pending', next_attempt_at = $3, first_attempt_at = null, finished_at = null
            where endpoint_id = $1 and message_id = $2 and status = 'failed'
            returning *
        )
        select {_MESSAGE_COLUMNS} from resent m join outbox_events e using (member_uid, event_id)
        """,
        endpoint_id,
        message_id,
        now,
    )
    return row


async def select_message(conn: Queryable, endpoint_id: str, message_id: int) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""
        select {_MESSAGE_COLUMNS} from webhook_messages m join outbox_events e using (member_uid, event_id)
        where m.endpoint_id = $1 and m.message_id = $2
        """,
        endpoint_id,
        message_id,
    )
    return row


# --- pruning ----------------------------------------------------------------------------------


async def prune_events(conn: Queryable, written_before: datetime, limit: int, *, one_by_one: bool = False) -> int:
    """Delete up to ``limit`` events written before ``written_before`` that every publisher has
    passed and no endpoint still waits for (their finished messages go with them). A short
    statement of its own: it holds its row locks only while it runs.

    ``one_by_one`` (KONVERT_LOCK_MEMBERS) finds them without a lock, then deletes each with a
    statement that names its member (all sent in one round trip): Citus locks rows only with a
    statement that goes to one shard."""
    if not one_by_one:
        count: int = await conn.fetchval(PRUNE, written_before, limit)
        return count
    doomed = await conn.fetch(FIND_PRUNABLE, written_before, limit)
    if not doomed:
        return 0
    deleted = await conn.fetchmany(PRUNE_EVENT, [(e["member_uid"], e["event_id"]) for e in doomed])
    return len(deleted)


# The events every publisher has passed, older than $1, that no endpoint waits for; up to $2.
_PRUNABLE = """
with passed as (
    select s.xid as stream_xid, s.event_id as stream_event_id, w.xid as webhooks_xid, w.event_id as webhooks_event_id
    from event_cursors s, event_cursors w
    where s.name = 'stream' and w.name = 'webhooks'
), doomed as (
    select e.member_uid, e.event_id from outbox_events e, passed c
    where e.created_at < $1
      and (e.xid, e.event_id) <= (c.stream_xid, c.stream_event_id)
      and (e.xid, e.event_id) <= (c.webhooks_xid, c.webhooks_event_id)
      and not exists (select 1 from webhook_messages m
                      where m.member_uid = e.member_uid and m.event_id = e.event_id and m.status = 'pending')
    order by e.xid, e.event_id
    limit $2
"""
PRUNE = f"""{_PRUNABLE}    for update of e skip locked
), deleted as (
    delete from outbox_events e using doomed d
    where e.member_uid = d.member_uid and e.event_id = d.event_id returning 1
)
select count(*) from deleted
"""
FIND_PRUNABLE = f"""{_PRUNABLE})
select member_uid, event_id from doomed
"""
# One event, named with its member. Its age and the cursors having passed it do not change; a
# message that waits for it may have been added since it was found, so that is checked again.
PRUNE_EVENT = """
with doomed as (
    select e.member_uid, e.event_id from outbox_events e
    where e.member_uid = $1 and e.event_id = $2
      and not exists (select 1 from webhook_messages m
                      where m.member_uid = $1 and m.event_id = $2 and m.status = 'pending')
    for update of e skip locked
)
delete from outbox_events e using doomed d
where e.member_uid = $1 and e.event_id = d.event_id returning 1
"""


async def prune_lot_notices(conn: Queryable, expired_before: datetime, limit: int) -> int:
    """Forget that lots expired before ``expired_before`` were announced as expiring soon."""
    count: int = await conn.fetchval(
        """
        with doomed as (
            select member_uid, lot_id from lot_expiry_notices where expires_at < $1 order by expires_at limit $2
        ), deleted as (
            delete from lot_expiry_notices n using doomed d
            where n.member_uid = d.member_uid and n.lot_id = d.lot_id returning 1
        )
        select count(*) from deleted
        """,
        expired_before,
        limit,
    )
    return count
