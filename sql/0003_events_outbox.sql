-- Events out: the transactional outbox every change is announced in, and its delivery to the
-- Redis Stream and to signed webhook endpoints (konvert.ledger.events, konvert.events).
--
-- The outbox replaces the events table of 0001, which only rank changes were written to and
-- nothing read: its rows were never published, and announcing them now (as old, differently
-- shaped events) would surprise every receiver, so they go with it.

drop table events;

-- Each member's last event sequence number: events are numbered per member, 1, 2, 3, ..., and a
-- number is never given twice, also after the events themselves were pruned. Written under the
-- member's row lock, like everything of a member.
create table event_sequences (
    member_uid    bigint primary key references members (member_uid),
    last_sequence bigint not null check (last_sequence > 0)
);

-- The outbox. xid is the writing transaction's id: a reader takes only events of transactions
-- older than every transaction still running (pg_snapshot_xmin), in (xid, event_id) order, so no
-- event can ever commit behind a reader's cursor. member_uid is null for events about konvert
-- itself (an endpoint disabled). data never holds personal data; the member's id is read from
-- members when the event is sent.
create table outbox_events (
    event_id    bigint generated always as identity primary key,
    xid         xid8 not null default pg_current_xact_id(),
    member_uid  bigint references members (member_uid),
    sequence    bigint check ((member_uid is null) = (sequence is null)),
    type        text not null check (length(type) between 1 and 64),
    data        jsonb not null,
    occurred_at timestamptz not null,
    created_at  timestamptz not null default now()
);
-- The publishers' and the feed's order.
create index outbox_events_order_idx on outbox_events (xid, event_id);
-- A member's events (the export).
create index outbox_events_member_idx on outbox_events (member_uid, sequence) where member_uid is not null;

-- How far each publisher has read the outbox: 'stream' (the Redis Stream) and 'webhooks' (fan-out
-- into webhook_messages). One process at a time moves a cursor (its row is locked for the batch,
-- others skip it), and each moves on its own, so a Redis outage never holds back the webhooks.
create table event_cursors (
    name       text primary key,
    xid        xid8 not null,
    event_id   bigint not null,
    updated_at timestamptz not null default now()
);
insert into event_cursors (name, xid, event_id) values ('stream', '0', 0), ('webhooks', '0', 0);

-- Webhook endpoints (PUT /v1/webhook-endpoints/{endpoint_id}). The secrets are kept as they are:
-- konvert signs with them. After a rotation the previous secret signs too until its grace ends.
create table webhook_endpoints (
    endpoint_id                text primary key check (length(endpoint_id) between 1 and 100),
    url                        text not null,
    description                text not null default '',
    -- Empty: every event type.
    event_types                text[] not null default '{}',
    enabled                    boolean not null default true,
    secret                     text not null,
    previous_secret            text,
    previous_secret_expires_at timestamptz,
    -- Since when every attempt failed (null after a success); long enough, and it is disabled.
    failing_since              timestamptz,
    disabled_reason            text,
    created_at                 timestamptz not null default now(),
    updated_at                 timestamptz not null default now()
);

-- One event for one endpoint: pending until a 2xx (delivered) or its last attempt (failed, the
-- dead letter, re-sendable). An attempt leases the message by moving next_attempt_at past the
-- attempt's timeout, so a process that dies mid-attempt leaves it to be retried, never lost.
create table webhook_messages (
    message_id      bigint generated always as identity primary key,
    endpoint_id     text not null references webhook_endpoints (endpoint_id) on delete cascade,
    event_id        bigint not null references outbox_events (event_id) on delete cascade,
    member_uid      bigint,
    sequence        bigint,
    status          text not null default 'pending' check (status in ('pending', 'delivered', 'failed')),
    attempts        integer not null default 0,
    next_attempt_at timestamptz not null,
    first_attempt_at timestamptz,
    last_attempt_at timestamptz,
    last_status     integer,
    last_error      text,
    finished_at     timestamptz,
    created_at      timestamptz not null default now(),
    unique (endpoint_id, event_id)
);
-- An endpoint's messages due, soonest first.
create index webhook_messages_due_idx on webhook_messages (endpoint_id, next_attempt_at) where status = 'pending';
-- A member's earlier messages to the same endpoint go first (per-member order).
create index webhook_messages_member_order_idx on webhook_messages (endpoint_id, member_uid, sequence)
    where status = 'pending';
-- An endpoint's messages by status (the admin listing), and the events still referenced (pruning).
create index webhook_messages_endpoint_idx on webhook_messages (endpoint_id, status, message_id);
create index webhook_messages_event_idx on webhook_messages (event_id);

-- Lots already announced as expiring soon (points.expiring_soon, once per lot).
create table lot_expiry_notices (
    lot_id      bigint primary key,
    member_uid  bigint not null,
    expires_at  timestamptz not null,
    noticed_at  timestamptz not null default now()
);
create index lot_expiry_notices_expires_idx on lot_expiry_notices (expires_at);
