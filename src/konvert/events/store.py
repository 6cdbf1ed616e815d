"""Events SQL: numbering the outbox, reading it in order, the publishers' cursors, webhook
endpoints and messages, pruning. Plain async functions, connection first.

The sequencer numbers committed events (``position``) 1, 2, 3, ... without a gap, each member's
in their sequence, in one transaction at a time. Readers take positions after their cursor up to
the first number missing (konvert.events.rules.contiguous): an event is numbered only once it
has committed, so none can land behind a cursor, on one server or across Citus' shards.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import NamedTuple

import asyncpg

from konvert.db import Connection, Queryable
from konvert.events import rules

# An event as it is sent: the member's id is read from their row (the pseudonym once erased);
# events about konvert itself (member_uid 0) name no member and no sequence.
_ENVELOPE = """
select e.event_id, e.position, e.type, e.occurred_at, m.member_id, e.sequence, e.data::text as data
from outbox_events e left join members m on m.member_uid = e.member_uid
"""
# How far both publishers have read: pruning deletes only events up to it, so the feed may pass
# a number missing up to it.
_PASSED = "(select min(c.position) from event_cursors c where c.name in ('stream', 'webhooks'))"


# A member's event or webhook message, named with its member as Citus routes it.
class EventKey(NamedTuple):
    member_uid: int
    event_id: int


class MessageKey(NamedTuple):
    member_uid: int
    message_id: int


class Sequenced(NamedTuple):
    numbered: int
    # The member whose events were numbered last: the next batch starts past them.
    last_member_uid: int


async def sequence_events(conn: Connection, head: int, limit: int, past_member_uid: int = 0) -> Sequenced:
    """Number up to ``limit`` committed events that have no position yet from ``head + 1`` on and
    move the 'sequencer' cursor past them (its row locked by the caller).

    Members are taken in member_uid order from past ``past_member_uid`` round to it again, so that
    under a backlog every member's turn comes. Each member's events are taken in their sequence,
    so a batch never holds one without those before it: a member's events are written under the
    member's lock, so none is visible before the earlier ones."""
    row = await conn.fetchrow(SEQUENCE, head, limit, past_member_uid)
    assert row is not None
    if row["numbered"] != row["taken"]:
        # An event of the batch was numbered meanwhile: on Citus, by a batch whose commit on
        # that event's shard came late, after the cursor had moved. Numbering around it would
        # leave a number missing for good; the caller rolls back and numbers afresh.
        raise NumberedMeanwhile(f"{row['taken'] - row['numbered']} of {row['taken']} events were numbered meanwhile")
    return Sequenced(row["numbered"], row["last_member_uid"])


class NumberedMeanwhile(Exception):
    """A batch's event already had a position when the batch came to number it."""


SEQUENCE = """
with taken as (
    (select 0 as pass, e.member_uid, e.sequence, e.event_id from outbox_events e
     where e.position is null and e.member_uid > $3
     order by e.member_uid, e.sequence, e.event_id
     limit $2)
    union all
    (select 1 as pass, e.member_uid, e.sequence, e.event_id from outbox_events e
     where e.position is null and e.member_uid <= $3
     order by e.member_uid, e.sequence, e.event_id
     limit $2)
), batch as (
    select member_uid, event_id, row_number() over (order by pass, member_uid, sequence, event_id) as n
    from taken
    order by n
    limit $2
), numbered as (
    update outbox_events e set position = $1 + b.n
    from batch b where e.member_uid = b.member_uid and e.event_id = b.event_id and e.position is null
    returning 1
), moved as (
    update event_cursors set position = $1 + (select count(*) from batch), updated_at = now()
    where name = 'sequencer'
    returning 1
)
select (select count(*) from batch) as taken, (select count(*) from numbered) as numbered,
       coalesce((select member_uid from batch order by n desc limit 1), $3) as last_member_uid
"""


async def select_events_after(conn: Queryable, after: int, limit: int) -> list[asyncpg.Record]:
    """Up to ``limit`` events after position ``after``, in order, up to the first one missing."""
    rows = await conn.fetch(READ_AFTER, after, limit)
    reached = rules.contiguous([row["position"] for row in rows], after)
    return [row for row in rows if row["position"] <= reached]


READ_AFTER = f"{_ENVELOPE} where e.position > $1 order by e.position limit $2"


# How many positions the feed reads ahead for a gap: more than a page, for pages of a few types.
_FEED_WINDOW = 1000


class FeedPage(NamedTuple):
    rows: list[asyncpg.Record]
    # Where the next page starts: past the last event given, or past every position read when
    # none of them was of the types asked for.
    reached: int


async def select_feed(
    conn: Queryable, after: int | rules.LegacyCursor, limit: int, types: Sequence[str] = ()
) -> FeedPage:
    """A page of the feed: up to ``limit`` events (of ``types`` only, if any) after ``after``.

    A number missing at or below both publishers' cursors is no gap: they read its event, which
    has since been pruned."""
    if isinstance(after, rules.LegacyCursor):
        # Positions were given in the order those cursors followed. A cursor whose event has
        # been pruned since starts again from the oldest kept event (at least once: its consumer
        # sees some again). No index has event ids alone: a scan, once per consumer, which then
        # holds a cursor of positions.
        after = await conn.fetchval("select position from outbox_events where event_id = $1", after.event_id) or 0
    ahead = await conn.fetchrow(
        f"""
        select array(select e.position from outbox_events e where e.position > $1 order by e.position limit $2)
                   as positions,
               {_PASSED} as settled
        """,
        after,
        max(limit, _FEED_WINDOW),
    )
    assert ahead is not None
    reached = rules.contiguous(ahead["positions"], after, ahead["settled"] or 0)
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""
        {_ENVELOPE}
        where e.position > $1 and e.position <= $2 and (cardinality($4::text[]) = 0 or e.type = any($4::text[]))
        order by e.position
        limit $3
        """,
        after,
        reached,
        limit,
        list(types),
    )
    return FeedPage(rows, rows[-1]["position"] if len(rows) == limit else reached)


SELECT_EVENTS = f"""{_ENVELOPE}
join unnest($1::bigint[], $2::bigint[]) as k (member_uid, event_id)
  on e.member_uid = k.member_uid and e.event_id = k.event_id
where e.member_uid = any($1::bigint[])
"""


async def select_events(conn: Queryable, keys: Sequence[EventKey]) -> dict[int, asyncpg.Record]:
    """The events of ``keys`` (member_uid and event_id each), by event_id."""
    rows = await conn.fetch(
        SELECT_EVENTS,
        [k.member_uid for k in keys],
        [k.event_id for k in keys],
    )
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


async def unpublished(conn: Queryable) -> bool:
    """Whether a committed event is not numbered yet, or a publisher has yet to pass one that is."""
    behind: bool = await conn.fetchval(
        f"""
        select exists ({LOOK_UNSEQUENCED})
            or (select position from event_cursors where name = 'sequencer') > {_PASSED}
        """
    )
    return behind


# --- the publishers' cursors ------------------------------------------------------------------


async def has_work(conn: Queryable, name: str) -> bool:
    """Whether the cursor has an event to take: a look without a lock (an idle publisher's poll
    then writes nothing, not even a transaction id)."""
    if name == "sequencer":
        return await conn.fetchval(LOOK_UNSEQUENCED) is not None
    cursor = await conn.fetchval("select position from event_cursors where name = $1", name)
    # The cursor as a parameter, not joined, and the index's order with a limit rather than
    # exists (which drops the order and may scan the whole table when nothing is there): the look
    # then walks outbox_events_position_idx from the cursor, however many events are kept.
    return cursor is not None and await conn.fetchval(LOOK_AFTER, cursor) is not None


LOOK_UNSEQUENCED = "select e.event_id from outbox_events e where e.position is null limit 1"
LOOK_AFTER = "select e.position from outbox_events e where e.position > $1 order by e.position limit 1"


async def lock_cursor(conn: Connection, name: str) -> int | None:
    """The cursor's position, locked for this transaction; None while another process holds it."""
    position: int | None = await conn.fetchval(
        "select position from event_cursors where name = $1 for update skip locked", name
    )
    return position


async def move_cursor(conn: Connection, name: str, to: int) -> None:
    await conn.execute("update event_cursors set position = $2, updated_at = now() where name = $1", name, to)


class FanOut(NamedTuple):
    events: int
    messages: int
    # Messages that wait for a member's earlier one (see make_next_due).
    waiting: list[MessageKey]


async def fan_out(conn: Connection, after: int, limit: int, now: datetime) -> FanOut:
    """One webhook message per (enabled endpoint that wants it, event) for the next ``limit``
    events after ``after``; the 'webhooks' cursor moves past them. One statement.

    A message is due at once if it is its member's first pending one for the endpoint; a later
    one waits (due at 'infinity') until the one before it is finished (make_next_due), so that
    leasing never walks past messages it may not send yet."""
    row = await conn.fetchrow(FAN_OUT, after, limit, now)
    assert row is not None
    waiting = [MessageKey(*key) for key in zip(row["waiting_members"], row["waiting"], strict=True)]
    return FanOut(row["events"], row["messages"], waiting)


FAN_OUT = """
with ahead as (
    select e.event_id, e.position, e.type, e.member_uid, e.sequence,
           row_number() over (order by e.position) as n
    from outbox_events e
    where e.position > $1
    order by e.position
    limit $2
), batch as (  -- up to the first position missing (konvert.events.rules.contiguous)
    select * from ahead where position = $1 + n
), fanned as (
    insert into webhook_messages (endpoint_id, event_id, member_uid, sequence, next_attempt_at)
    select w.endpoint_id, b.event_id, b.member_uid, b.sequence,
           case when b.member_uid = 0
                  or (row_number() over (partition by w.endpoint_id, b.member_uid order by b.sequence) = 1
                      and not exists (select 1 from webhook_messages p where p.endpoint_id = w.endpoint_id
                                      and p.member_uid = b.member_uid and p.status = 'pending'))
                then $3::timestamptz else 'infinity'::timestamptz end
    from batch b
    join webhook_endpoints w on w.enabled and (cardinality(w.event_types) = 0 or b.type = any(w.event_types))
    order by b.position, w.endpoint_id
    on conflict (member_uid, endpoint_id, event_id) do nothing
    returning member_uid, message_id, next_attempt_at
), moved as (
    update event_cursors c set position = (select max(position) from batch), updated_at = now()
    where c.name = 'webhooks' and exists (select 1 from batch)
    returning 1
)
select (select count(*) from batch) as events, (select count(*) from fanned) as messages,
       (select coalesce(array_agg(member_uid order by message_id), '{}') from fanned
        where next_attempt_at = 'infinity') as waiting_members,
       (select coalesce(array_agg(message_id order by message_id), '{}') from fanned
        where next_attempt_at = 'infinity') as waiting,
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
returning m.member_uid, m.message_id, m.endpoint_id, m.event_id, m.attempts, m.first_attempt_at
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
returning m.member_uid, m.message_id, m.endpoint_id, m.event_id, m.attempts, m.first_attempt_at
"""


class Outcome(NamedTuple):
    """What an attempt came to: pending again (with its next attempt), delivered or failed."""

    member_uid: int
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
        RECORD_OUTCOMES,
        [o.member_uid for o in outcomes],
        [o.message_id for o in outcomes],
        [o.status for o in outcomes],
        [o.next_attempt_at for o in outcomes],
        [o.last_status for o in outcomes],
        [o.last_error for o in outcomes],
        [o.at for o in outcomes],
    )


RECORD_OUTCOMES = """
update webhook_messages m
set status = o.status, next_attempt_at = coalesce(o.next_attempt_at, m.next_attempt_at),
    last_status = o.last_status, last_error = o.last_error,
    finished_at = case when o.status = 'pending' then null else o.at end
from unnest($1::bigint[], $2::bigint[], $3::text[], $4::timestamptz[], $5::integer[], $6::text[],
            $7::timestamptz[])
     as o (member_uid, message_id, status, next_attempt_at, last_status, last_error, at)
-- The members as values too: Citus then sends the statement to their shards only.
where m.member_uid = any($1::bigint[]) and m.member_uid = o.member_uid and m.message_id = o.message_id
"""


async def make_next_due(conn: Queryable, messages: Sequence[MessageKey], now: datetime) -> int:
    """For the (endpoint, member) of each of ``messages``: if the member's first pending message
    waits, it is due now. Returns how many became due.

    Run after the commit of what finished a message (an outcome) or added a waiting one (a
    fan-out): of two such transactions at once neither sees the other's rows before it commits,
    but whichever commits last runs this after both did, and sees them. A process that dies
    between its commit and this leaves the sweep (make_stranded_due) to do it."""
    if not messages:
        return 0
    count: int = await conn.fetchval(
        MAKE_NEXT_DUE, [m.member_uid for m in messages], [m.message_id for m in messages], now
    )
    return count


# Each member's first pending message by one probe of webhook_messages_member_order_idx (a
# correlated subquery with a limit is always run that way), then updated by primary key: the
# waiting messages were often just written, and at the statistics of a table not yet analysed a
# join may otherwise walk every waiting message once per member. Only a pending message waits
# (at 'infinity', tested so that no index but the primary key serves the update).
MAKE_NEXT_DUE = """
with heads as materialized (
    select (
        select p.message_id from webhook_messages p
        where p.endpoint_id = f.endpoint_id and p.member_uid = f.member_uid and p.member_uid = any($1::bigint[])
          and p.status = 'pending'
        order by p.sequence
        limit 1
    ) as message_id
    from (
        select distinct m.endpoint_id, m.member_uid from webhook_messages m
        where m.member_uid = any($1::bigint[]) and m.message_id = any($2::bigint[]) and m.member_uid <> 0
    ) f
), made as (
    update webhook_messages w set next_attempt_at = $3
    where w.member_uid = any($1::bigint[]) and w.message_id = any(array(select message_id from heads))
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
_PRUNABLE = f"""
with doomed as (
    select e.member_uid, e.event_id from outbox_events e
    where e.position <= {_PASSED} and e.created_at < $1
      and not exists (select 1 from webhook_messages m
                      where m.member_uid = e.member_uid and m.event_id = e.event_id and m.status = 'pending')
    order by e.position
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
