-- The rest of the schema Citus can distribute by member: kudos, reputation entries, the outbox
-- and webhook messages (konvert.distribution; docs/SCALING.md, "Citus"). 0006 did the others.


-- Kudos live with their author --------------------------------------------------------------
--
-- A kudos is its author's row (distributed by author_uid). What was unique across authors is
-- made unique where one shard can check it:
-- * kudos_id: claimed in natural_keys (kind 'kudos', the member is the author), by the statement
--   that records the kudos, as 0006 does for purchase ids;
-- * one standing kudos per giver, post and kind, and the giver's daily count: kudos_given, one
--   row per kudos given, co-located with the giver (written by the same statement);
-- * one standing accepted answer per thread: kudos_threads, distributed by the thread, names
--   the thread's last standing acceptance; an acceptance locks its row first (it replaces the
--   advisory lock), so acceptances of a thread take turns.

alter table natural_keys drop constraint natural_keys_kind_check,
    add constraint natural_keys_kind_check check (kind in ('member', 'purchase', 'redemption', 'adjustment', 'kudos'));
insert into natural_keys (key, kind, scope, member_uid) select kudos_id, 'kudos', '', author_uid from kudos;

create table kudos_given (
    -- The giver.
    member_uid bigint not null references members (member_uid),
    author_uid bigint not null,
    kudos_pk   bigint not null,
    kudos_id   text not null,
    source     text not null,
    post_id    text not null,
    kind       text not null,
    day        date not null,
    -- The kudos stands (kudos.status), kept equal by the statements that change it.
    standing   boolean not null,
    primary key (member_uid, kudos_pk)
);
insert into kudos_given (member_uid, author_uid, kudos_pk, kudos_id, source, post_id, kind, day, standing)
select giver_uid, author_uid, kudos_pk, kudos_id, source, post_id, kind, day, status = 'standing' from kudos;
-- One standing kudos per giver, post and kind; also finds it.
create unique index kudos_given_standing_key on kudos_given (member_uid, source, post_id, kind) where standing;
-- Retraction by natural key: the standing one, else the latest.
create index kudos_given_post_idx on kudos_given (member_uid, source, post_id, kind, kudos_pk);
-- The giver's daily limit.
create index kudos_given_day_idx on kudos_given (member_uid, day);

create table kudos_threads (
    thread_id  text not null,
    source     text not null,
    -- The thread's last acceptance that stood (it stands still unless it was retracted); null
    -- before the first.
    author_uid bigint,
    giver_uid  bigint,
    kudos_pk   bigint,
    primary key (thread_id, source)
);
insert into kudos_threads (thread_id, source, author_uid, giver_uid, kudos_pk)
select thread_id, source, author_uid, giver_uid, kudos_pk from kudos
where kind = 'accepted_answer' and status = 'standing';

-- The giver's row is with kudos_given now; a superseding acceptance is usually another author's.
alter table kudos drop constraint kudos_giver_uid_fkey, drop constraint kudos_superseded_by_pk_fkey;
-- An accepter's entry lives with the accepter, its kudos with the author.
alter table reputation_entries drop constraint reputation_entries_kudos_pk_fkey,
    drop constraint reputation_entries_cause_kudos_pk_fkey;
alter table kudos drop constraint kudos_pkey, add constraint kudos_pkey primary key (author_uid, kudos_pk),
    drop constraint kudos_kudos_id_key, add constraint kudos_kudos_id_key unique (author_uid, kudos_id);
drop index kudos_standing_key, kudos_natural_idx, kudos_giver_day_idx, kudos_author_idx, kudos_thread_accepted_key;
-- kudos_threads keeps a thread to one standing acceptance; this holds on every author's shard too.
create unique index kudos_thread_accepted_key on kudos (author_uid, source, thread_id)
    where kind = 'accepted_answer' and status = 'standing';

-- The first credit a kudos made to a member in a role, read on the member's shard.
drop index reputation_entries_kudos_idx;
create index reputation_entries_kudos_idx on reputation_entries (member_uid, kudos_pk, role, entry_id);


-- Events about konvert itself belong to member_uid 0 ----------------------------------------
--
-- A distributed table has no row without its distribution column. Events about konvert itself
-- (an endpoint disabled) and their webhook messages take member_uid 0, which no member has
-- (member uids start at 1): they live on 0's shard, without a sequence. The reference to members
-- goes, as identity_links' did in 0006: events are written under the member's lock and members
-- are never deleted.

alter table outbox_events drop constraint outbox_events_member_uid_fkey, drop constraint outbox_events_check;
update outbox_events set member_uid = 0 where member_uid is null;
alter table outbox_events alter column member_uid set not null,
    add constraint outbox_events_check check ((member_uid = 0) = (sequence is null));
drop index outbox_events_member_idx;

alter table webhook_messages drop constraint webhook_messages_event_id_fkey,
    drop constraint webhook_messages_endpoint_id_event_id_key;
update webhook_messages set member_uid = 0 where member_uid is null;
alter table webhook_messages alter column member_uid set not null;

alter table outbox_events drop constraint outbox_events_pkey,
    add constraint outbox_events_pkey primary key (member_uid, event_id);
create index outbox_events_event_id_idx on outbox_events (event_id);
-- A member's events in their order (the export).
create index outbox_events_member_idx on outbox_events (member_uid, sequence);

-- One message per endpoint and event: an event is one member's, so the member in front changes
-- nothing. message_id stays an id, found by its index.
alter table webhook_messages drop constraint webhook_messages_pkey,
    add constraint webhook_messages_pkey primary key (member_uid, message_id),
    add constraint webhook_messages_endpoint_id_event_id_key unique (member_uid, endpoint_id, event_id),
    add constraint webhook_messages_event_id_fkey foreign key (member_uid, event_id)
        references outbox_events (member_uid, event_id) on delete cascade;
create index webhook_messages_message_id_idx on webhook_messages (message_id);
