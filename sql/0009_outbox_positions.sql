-- The outbox read by position instead of by transaction id.
--
-- Until now the publishers read the outbox in (xid, event_id) order behind the oldest transaction
-- still running (pg_snapshot_xmin). That holds only where one server assigns the ids, takes the
-- horizon and commits every part of a transaction at once: not on Citus (docs/SCALING.md), and a
-- long-running transaction anywhere on the server held every event back.
--
-- Now a publishing step, the sequencer, numbers the committed events: position 1, 2, 3, ... with
-- no gap, each member's events in their sequence, under the 'sequencer' row's lock (one process at
-- a time). The stream, the fan-out and the feed read positions after their cursor and stop at the
-- first missing one: on one server there is none, on Citus it is a number whose shard has not
-- committed yet. Nothing can then land behind a cursor. The ids each server assigns play no part.

alter table outbox_events add column position bigint;

-- The events kept, in the order the publishers read them until now. Events of transactions still
-- running (invisible here) keep no position: the sequencer numbers them after they commit.
with numbered as (
    select member_uid, event_id, row_number() over (order by xid, event_id) as position from outbox_events
)
update outbox_events e set position = n.position
from numbered n where e.member_uid = n.member_uid and e.event_id = n.event_id;

-- What the sequencer numbers next, each member's in order; and what the readers walk.
create index outbox_events_unsequenced_idx on outbox_events (member_uid, sequence, event_id) where position is null;
create index outbox_events_position_idx on outbox_events (position) where position is not null;

-- Each cursor at the position of the last event it had passed (every event up to a cursor was
-- committed: the publishers read only those); the sequencer's at the last position given.
alter table event_cursors add column position bigint not null default 0;
update event_cursors c
set position = coalesce((select max(e.position) from outbox_events e where (e.xid, e.event_id) <= (c.xid, c.event_id)), 0);
insert into event_cursors (name, xid, event_id, position)
select 'sequencer', '0', 0, coalesce(max(position), 0) from outbox_events;

drop index outbox_events_order_idx;
-- Events are found by member and id (the primary key), by position, or not yet numbered. A
-- member's events in their order (the export) are the primary key's run of the member, sorted:
-- two indexes fewer to write for every event, and again when it is numbered.
drop index outbox_events_event_id_idx;
drop index outbox_events_member_idx;
alter table outbox_events drop column xid;
alter table event_cursors drop column xid, drop column event_id;
