-- Community reputation: kudos, what each kudos currently credits, the reputation entries that
-- explain every change (and link it to its ledger transfer), what the floor kept, and an
-- outbox of member events (rank changes) for integrations to publish.
--
-- Everything here is member-scoped (author_uid, giver_uid, member_uid) like the ledger, and
-- every change happens under the row locks of the members it touches.

create table kudos (
    kudos_pk           bigint generated always as identity primary key,
    -- The caller's idempotency key for this kudos, unique across sources.
    kudos_id           text not null check (length(kudos_id) between 1 and 128),
    source             text not null check (length(source) between 1 and 64),
    post_id            text not null check (length(post_id) between 1 and 128),
    thread_id          text not null check (length(thread_id) between 1 and 128),
    author_uid         bigint not null references members (member_uid),
    giver_uid          bigint not null references members (member_uid),
    kind               text not null check (kind in ('like', 'helpful', 'accepted_answer')),
    occurred_at        timestamptz not null,
    -- The UTC day of occurred_at: the day whose daily cap this kudos counts against.
    day                date not null,
    status             text not null default 'standing' check (status in ('standing', 'retracted', 'superseded')),
    -- Why a kudos awards nothing although it stands: giver_without_standing or self_accept.
    not_counted_reason text,
    -- What this kudos is worth to its author (before the daily cap) and to the accepter, fixed
    -- when it arrives so that later program changes never rewrite old days.
    value              bigint not null check (value >= 0),
    accepter_value     bigint not null default 0 check (accepter_value >= 0),
    -- What it credits now. Like/helpful: its share of the day's cap; 0 once not standing.
    author_credited    bigint not null default 0,
    accepter_credited  bigint not null default 0,
    -- Loyalty points an accepted answer credits (program bridge), and what a clawback could not
    -- take back because the points were spent and the balance may not go negative.
    bridge_points      bigint not null default 0 check (bridge_points >= 0),
    bridge_shortfall   bigint not null default 0 check (bridge_shortfall >= 0),
    bridge_lot_id      bigint references lots (lot_id),
    bridge_transfer_id bigint references transfers (transfer_id),
    superseded_by_pk   bigint references kudos (kudos_pk),
    -- Idempotency: the hash of the request and the responses given for it and its retraction.
    request_hash       bytea not null,
    response           bytea not null,
    retraction_response bytea,
    created_at         timestamptz not null default now(),
    retracted_at       timestamptz,
    constraint kudos_kudos_id_key unique (kudos_id),
    constraint kudos_day_check check (day = (occurred_at at time zone 'UTC')::date),
    constraint kudos_credit_check check (
        author_credited between 0 and value and accepter_credited between 0 and accepter_value
    )
);
-- One standing kudos per giver, post and kind; a retracted or superseded one may be given again.
create unique index kudos_standing_key on kudos (source, post_id, giver_uid, kind) where status = 'standing';
-- One standing accepted answer per thread.
create unique index kudos_thread_accepted_key on kudos (source, thread_id)
    where kind = 'accepted_answer' and status = 'standing';
create index kudos_natural_idx on kudos (source, post_id, giver_uid, kind, kudos_pk);
-- The daily cap: a member's standing likes and helpful marks of one day in canonical order.
create index kudos_author_day_idx on kudos (author_uid, day, occurred_at, kudos_id collate "C")
    include (value, author_credited) where status = 'standing' and kind in ('like', 'helpful');
create index kudos_author_idx on kudos (author_uid) where status = 'standing';
create index kudos_giver_day_idx on kudos (giver_uid, day);

-- Every change to what a kudos credits a member, and what the ledger moved for it. ``change``
-- is the change to the kudos' credit; ``posted`` is the change to the member's reputation: the
-- two differ only where the floor kept reputation a debit would have taken, or a credit first
-- made up for what the floor had kept.
create table reputation_entries (
    entry_id       bigint generated always as identity primary key,
    member_uid     bigint not null references members (member_uid),
    kudos_pk       bigint not null references kudos (kudos_pk),
    role           text not null check (role in ('author', 'accepter')),
    -- The kudos' source and UTC day: where leaderboards attribute the change.
    source         text not null,
    day            date not null,
    reason         text not null check (reason in ('award', 'retraction', 'superseded', 'cap_freed', 'cap_taken')),
    change         bigint not null check (change <> 0),
    posted         bigint not null,
    transfer_id    bigint references transfers (transfer_id),
    -- The kudos whose arrival or retraction caused this change (itself, or another one of the
    -- same day whose arrival or retraction moved the daily cap).
    cause_kudos_pk bigint not null references kudos (kudos_pk),
    created_at     timestamptz not null default now(),
    constraint reputation_entries_transfer_check check ((posted = 0) = (transfer_id is null))
);
create index reputation_entries_member_idx on reputation_entries (member_uid, entry_id);
create index reputation_entries_kudos_idx on reputation_entries (kudos_pk, role, entry_id);
create index reputation_entries_day_idx on reputation_entries (day);

-- Reputation the floor kept: debits not made because they would have taken the member below
-- the program's floor. A later credit first makes up for it, so nothing is credited twice.
create table reputation_members (
    member_uid bigint primary key references members (member_uid),
    floor_kept bigint not null default 0 check (floor_kept >= 0),
    updated_at timestamptz not null default now()
);

-- Outbox of member events (rank_changed, ...) for integrations to publish; published_at is set
-- by whatever publishes them.
create table events (
    event_id     bigint generated always as identity primary key,
    member_uid   bigint not null references members (member_uid),
    type         text not null check (length(type) between 1 and 64),
    payload      jsonb not null,
    created_at   timestamptz not null default now(),
    published_at timestamptz
);
create index events_unpublished_idx on events (event_id) where published_at is null;
create index events_member_idx on events (member_uid, event_id);
