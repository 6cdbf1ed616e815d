-- The points and reputation ledger: members, accounts, immutable transfers and lots.
--
-- Rows are member-scoped wherever a request writes (members, lots, transfers, purchases), so
-- writes for different members never touch the same row and the schema can be distributed by
-- member_uid. System accounts are never updated: their balances are sums over transfers.

create table members (
    member_uid             bigint generated always as identity primary key,
    -- The caller's opaque id. Erasure replaces it with a pseudonym.
    member_id              text not null check (length(member_id) between 1 and 128),
    -- Stored balances, changed only in the transaction that writes the transfers behind them.
    points_available       bigint not null default 0,
    points_pending         bigint not null default 0 check (points_pending >= 0),
    points_held            bigint not null default 0 check (points_held >= 0),
    -- Points clawed back by refunds beyond what the member had: repaid from the next points
    -- that become available. points_available = available lots - points_debt.
    points_debt            bigint not null default 0 check (points_debt >= 0),
    -- Points earned (into pending or available) net of refund clawbacks.
    points_lifetime_earned bigint not null default 0,
    reputation             bigint not null default 0,
    -- Incremented by every change above; orders balance-cache updates.
    version                bigint not null default 0,
    created_at             timestamptz not null default now(),
    erased_at              timestamptz,
    constraint members_member_id_key unique (member_id)
);

-- Member accounts: (member_uid, asset, name) with name one of available, pending, held for
-- points and reputation for reputation. System accounts have no member_uid.
create table accounts (
    account_id bigint generated always as identity primary key,
    member_uid bigint references members (member_uid),
    asset      text not null check (asset in ('points', 'reputation')),
    name       text not null check (length(name) between 1 and 100),
    created_at timestamptz not null default now(),
    constraint accounts_owner_key unique nulls not distinct (member_uid, asset, name)
);

-- Points from one earn (a purchase, an adjustment, ...): where a member's points came from,
-- when they vest and when they expire.
create table lots (
    lot_id     bigint generated always as identity primary key,
    member_uid bigint not null references members (member_uid),
    amount     bigint not null check (amount > 0),
    remaining  bigint not null,
    state      text not null check (state in ('pending', 'available', 'expired')),
    vests_at   timestamptz not null,
    expires_at timestamptz,
    created_at timestamptz not null default now(),
    constraint lots_remaining_check check (remaining between 0 and amount)
);
create index lots_member_open_idx on lots (member_uid, expires_at, lot_id) where remaining > 0;
create index lots_vesting_idx on lots (vests_at) where state = 'pending';

-- Immutable. A correction is a new transfer whose reverses_transfer_id points at the original.
create table transfers (
    transfer_id          bigint generated always as identity primary key,
    member_uid           bigint not null references members (member_uid),
    asset                text not null check (asset in ('points', 'reputation')),
    debit_account_id     bigint not null references accounts (account_id),
    credit_account_id    bigint not null references accounts (account_id),
    amount               bigint not null check (amount > 0),
    code                 text not null,
    -- The natural key of what caused the transfer, e.g. ('purchase', 'webshop/1001').
    cause_type           text not null,
    cause_ref            text not null,
    lot_id               bigint references lots (lot_id),
    reverses_transfer_id bigint references transfers (transfer_id),
    reason               text,
    created_at           timestamptz not null default now(),
    constraint transfers_distinct_accounts_check check (debit_account_id <> credit_account_id)
);
create index transfers_member_idx on transfers (member_uid, transfer_id desc);
create index transfers_cause_idx on transfers (cause_type, cause_ref);

-- Every change to a lot's remaining points after it was created, so that
-- lots.remaining = lots.amount - sum(lot_entries.amount) and each change names its transfer.
create table lot_entries (
    entry_id    bigint generated always as identity primary key,
    lot_id      bigint not null references lots (lot_id),
    member_uid  bigint not null,
    transfer_id bigint references transfers (transfer_id),
    -- Positive: points taken from the lot; negative: points returned to it.
    amount      bigint not null check (amount <> 0),
    kind        text not null,
    created_at  timestamptz not null default now()
);
create index lot_entries_lot_idx on lot_entries (lot_id);

create table purchases (
    purchase_pk  bigint generated always as identity primary key,
    partner      text not null,
    purchase_id  text not null,
    member_uid   bigint not null references members (member_uid),
    currency     text not null,
    occurred_at  timestamptz not null,
    total_amount bigint not null,
    points       bigint not null,
    -- Per line: quantity, unit price, points earned and what refunds took so far; shipping,
    -- tax and bonus likewise (konvert.earning.rules.PurchaseRefundState as JSON).
    refund_state jsonb not null,
    lot_id       bigint references lots (lot_id),
    transfer_id  bigint references transfers (transfer_id),
    -- Idempotency: the hash of the request and the response given for it.
    request_hash bytea not null,
    response     bytea not null,
    created_at   timestamptz not null default now(),
    constraint purchases_partner_purchase_id_key unique (partner, purchase_id)
);
create index purchases_member_idx on purchases (member_uid);

create table refunds (
    refund_pk    bigint generated always as identity primary key,
    purchase_pk  bigint not null references purchases (purchase_pk),
    refund_id    text not null,
    member_uid   bigint not null references members (member_uid),
    amount       bigint not null,
    points       bigint not null,
    -- Points that could not be clawed back because the balance may not go negative.
    shortfall    bigint not null default 0,
    detail       jsonb not null,
    request_hash bytea not null,
    response     bytea not null,
    created_at   timestamptz not null default now(),
    constraint refunds_purchase_refund_id_key unique (purchase_pk, refund_id)
);
