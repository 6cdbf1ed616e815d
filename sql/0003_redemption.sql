-- Rewards, redemptions (immediate or held), adjustments, expiry and tiers.

create table rewards (
    reward_id       text primary key check (length(reward_id) between 1 and 64),
    name            text not null,
    description     text not null default '',
    cost_points     bigint not null check (cost_points > 0),
    -- null: unlimited. Decremented when a redemption takes one (held or captured).
    stock           bigint check (stock >= 0),
    available_from  timestamptz,
    available_until timestamptz,
    active          boolean not null default true,
    created_at      timestamptz not null default now(),
    updated_at      timestamptz not null default now()
);

create table redemptions (
    redemption_pk     bigint generated always as identity primary key,
    redemption_id     text not null,
    member_uid        bigint not null references members (member_uid),
    reward_id         text references rewards (reward_id),
    points            bigint not null check (points > 0),
    status            text not null check (status in ('held', 'captured', 'released', 'expired', 'cancelled')),
    hold_expires_at   timestamptz,
    -- The lots the points came from, [[lot_id, points], ...], so that a release or a
    -- cancellation returns exactly those lots.
    allocations       jsonb not null,
    transfer_id       bigint not null references transfers (transfer_id),
    -- The transfer that ended the hold or undid the redemption (capture, release, cancel).
    closing_transfer_id bigint references transfers (transfer_id),
    note              text,
    request_hash      bytea not null,
    response          bytea not null,
    created_at        timestamptz not null default now(),
    updated_at        timestamptz not null default now(),
    constraint redemptions_redemption_id_key unique (redemption_id)
);
create index redemptions_member_idx on redemptions (member_uid, redemption_pk desc);
create index redemptions_hold_expiry_idx on redemptions (hold_expires_at) where status = 'held';

create table adjustments (
    adjustment_pk bigint generated always as identity primary key,
    adjustment_id text not null,
    member_uid    bigint not null references members (member_uid),
    points        bigint not null check (points <> 0),
    reason_code   text not null,
    note          text not null default '',
    -- The API key that made the adjustment.
    key_id        bigint not null,
    key_name      text not null,
    transfer_id   bigint not null references transfers (transfer_id),
    request_hash  bytea not null,
    response      bytea not null,
    created_at    timestamptz not null default now(),
    constraint adjustments_adjustment_id_key unique (adjustment_id)
);

create index lots_expiry_idx on lots (expires_at) where state <> 'expired';

-- Tiers: the member's current tier, what qualified it, and since when it is below its tier
-- (the downgrade grace period).
alter table members
    add column tier                   text,
    add column tier_qualifying_points bigint not null default 0,
    add column tier_below_since       timestamptz,
    add column tier_evaluated_at      timestamptz;
create index members_tier_evaluation_idx on members (tier_evaluated_at) where tier is not null;
create index purchases_member_created_idx on purchases (member_uid, created_at);
