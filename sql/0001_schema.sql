-- konvert's schema: API keys, the points ledger, earning, redemption, reputation, preferences and
-- privacy, and the rule that ledger rows are never deleted.
--
-- Tables come after the tables they refer to. Rows are member-scoped wherever a request writes
-- (keyed by member_uid), so writes for different members never touch the same row and the schema
-- can be distributed by member_uid. A use case changes a member's rows under that member's row
-- lock: the member's row first, then its lots.
--
-- Writes that a client may retry store the hash of the request and the response given for it
-- (request_hash, response) under the caller's natural key, which is unique: a retry gets the
-- same response, a different request under the same key is refused, and concurrent duplicates
-- meet on the unique index.


-- API keys -----------------------------------------------------------------------------------

-- The keys clients authenticate with. The key itself is shown once at creation; only its SHA-256
-- is stored. Keys are 256-bit random secrets, so a fast hash is enough (no password stretching
-- needed). A request's key is found by that hash (api_keys_secret_hash_key). Revoking a key sets
-- revoked_at.
create table api_keys (
    key_id      bigint generated always as identity primary key,
    name        text not null check (length(name) between 1 and 100),
    -- The key's first characters, shown by `konvert keys list` so an operator can tell keys apart.
    prefix      text not null,
    secret_hash bytea not null,
    -- What the key may do (purchases:write, members:read, ...; admin may do everything).
    scopes      text[] not null check (cardinality(scopes) > 0),
    created_at  timestamptz not null default now(),
    revoked_at  timestamptz,
    constraint api_keys_secret_hash_key unique (secret_hash)
);


-- The ledger: members, accounts, lots, transfers, adjustments ---------------------------------
--
-- Every movement of points or reputation is a transfer between two accounts, and a member's
-- points sit in lots that say where they came from and when they vest and expire. The balances
-- stored on a member are changed only in the transaction that writes the transfers and lot
-- changes behind them; `konvert audit` checks that they agree. System accounts are never updated:
-- their balances are sums over transfers. Transfers, lots and purchases have no foreign keys:
-- see the last section.

-- One row per member: the stored balances, the tier and the balance version.
--
-- Every purchase, redemption and kudos updates its member's row. PostgreSQL rewrites a row in
-- place (a HOT update: no new index entries, no other page touched) only when the new version
-- fits on the same page and no column an index reads changed (in a key, an expression or a
-- predicate: member_uid, member_id, tier, tier_evaluated_at, erased_at). So the table leaves a
-- tenth of each page free (fillfactor 90), and purchases never set tier_evaluated_at
-- (konvert.ledger.batches.post_earns): only a purchase that changes its member's tier is not a
-- HOT update.
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
    -- The balance version: incremented by every change to what the member's balance shows
    -- (points, tier, reputation). Orders balance-cache updates: a cached balance is never
    -- replaced by one of an older version.
    version                bigint not null default 0,
    -- The member's current tier (null: none).
    tier                   text,
    -- The points that qualified the tier at its last evaluation: earned in the tier window, net
    -- of refunds.
    tier_qualifying_points bigint not null default 0,
    -- Since when the member is below their tier: the downgrade grace period runs from here.
    tier_below_since       timestamptz,
    -- When the daily tier job (or a refund) last evaluated the tier; null: never.
    tier_evaluated_at      timestamptz,
    created_at             timestamptz not null default now(),
    -- When the member was erased (their personal data removed, member_id a pseudonym).
    erased_at              timestamptz,
    constraint members_member_id_key unique (member_id)
) with (fillfactor = 90);
-- The daily tier job takes members with a tier not evaluated for a day, never-evaluated first, a
-- batch at a time in this index's order (konvert.tiers.service.reevaluate_due). Never evaluated is
-- -infinity here and in the job's query, so "never, or not since" is one range of the index and a
-- batch reads its own members only, however many are due.
create index members_tier_due_idx on members
    ((coalesce(tier_evaluated_at, '-infinity'::timestamptz))) where tier is not null;
-- Erased members: the leaderboards leave them out, and the audit checks that none of them has
-- personal data left.
create index members_erased_idx on members (erased_at) where erased_at is not null;

-- Accounts that transfers move between. A member has four, created with the member:
-- (points, available), (points, pending), (points, held) and (reputation, reputation). System
-- accounts have no member_uid: issued:<partner> (a partner's purchases), redeemed, expired,
-- adjustments, preferences, kudos:<source>, bridge:accepted_answer.
create table accounts (
    account_id bigint generated always as identity primary key,
    member_uid bigint references members (member_uid),
    asset      text not null check (asset in ('points', 'reputation')),
    name       text not null check (length(name) between 1 and 100),
    created_at timestamptz not null default now(),
    -- How an account is found. Nulls not distinct: each system account exists once.
    constraint accounts_owner_key unique nulls not distinct (member_uid, asset, name)
);

-- Points from one earn (a purchase, an adjustment, a shared preference, an accepted answer's
-- bonus): where a member's points came from, when they vest and when they expire.
create table lots (
    lot_id     bigint generated always as identity primary key,
    member_uid bigint not null,
    amount     bigint not null check (amount > 0),
    -- amount less what lot_entries took from the lot.
    remaining  bigint not null,
    -- pending until vests_at (the return window closes), then available; expired at expires_at.
    state      text not null check (state in ('pending', 'available', 'expired')),
    vests_at   timestamptz not null,
    -- null: never expires.
    expires_at timestamptz,
    created_at timestamptz not null default now(),
    constraint lots_remaining_check check (remaining between 0 and amount)
);
-- A member's lots with points left, soonest expiring first (never expiring last): what
-- redemptions, clawbacks and debt repayment take points from, in that order
-- (konvert.ledger.store.lock_available_lots), and the balance's "expiring soon" sums.
create index lots_member_open_idx on lots (member_uid, expires_at, lot_id) where remaining > 0;
-- Vesting and expiry take their due lots oldest first, a batch at a time, skipping lots whose
-- member another transaction holds (konvert.ledger.jobs.work_due_lots), in the order
-- (vests_at, lot_id) and (expires_at, lot_id). With the whole order in the index a batch reads
-- its own lots only, however many fall due at the same instant (a nightly import, or any run of
-- purchases posted with one occurred_at).
create index lots_vesting_order_idx on lots (vests_at, lot_id) where state = 'pending';
create index lots_expiry_order_idx on lots (expires_at, lot_id) where state <> 'expired';

-- Immutable. A correction is a new transfer whose reverses_transfer_id points at the original.
create table transfers (
    transfer_id          bigint generated always as identity primary key,
    -- The member whose account is on one side (the other side may be a system account).
    member_uid           bigint not null,
    asset                text not null check (asset in ('points', 'reputation')),
    debit_account_id     bigint not null,
    credit_account_id    bigint not null,
    amount               bigint not null check (amount > 0),
    -- What the transfer does: earn, vest, hold, redeem, capture, release, refund, kudos, ...
    code                 text not null,
    -- The natural key of what caused the transfer, e.g. ('purchase', 'webshop/1001').
    cause_type           text not null,
    cause_ref            text not null,
    -- The lot the points went into or came from, where there is one.
    lot_id               bigint,
    reverses_transfer_id bigint,
    -- Shown in the member's activity. Erasure removes any client's free text from it.
    reason               text,
    created_at           timestamptz not null default now(),
    constraint transfers_distinct_accounts_check check (debit_account_id <> credit_account_id)
);
-- A member's activity, newest first, a page at a time (konvert.ledger.reads.select_activity).
create index transfers_member_idx on transfers (member_uid, transfer_id desc);
-- The transfers of a cause: `konvert audit` matches each purchase, kudos and preference award
-- to its transfers by it.
create index transfers_cause_idx on transfers (cause_type, cause_ref);

-- Every change to a lot's remaining points after it was created, so that
-- lots.remaining = lots.amount - sum(lot_entries.amount) and each change names its transfer.
create table lot_entries (
    entry_id    bigint generated always as identity primary key,
    lot_id      bigint not null references lots (lot_id),
    member_uid  bigint not null,
    -- null where no points move: repaying a refund debt (the balance already counts the debt).
    transfer_id bigint references transfers (transfer_id),
    -- Positive: points taken from the lot; negative: points returned to it.
    amount      bigint not null check (amount <> 0),
    -- What took or returned the points: its transfer's code (redeem, release, refund, expire, ...),
    -- or debt.
    kind        text not null,
    created_at  timestamptz not null default now()
);
-- A lot's entries: how much of a purchase's lot expired, which a refund does not take again
-- (konvert.ledger.store.select_expired_from_lot), and the audit's "lots equal their entries".
create index lot_entries_lot_idx on lot_entries (lot_id);

-- Points an operator gives (a new lot) or takes (from the member's lots) by hand, with a reason.
-- adjustment_id is the caller's idempotency key.
create table adjustments (
    adjustment_pk bigint generated always as identity primary key,
    adjustment_id text not null,
    member_uid    bigint not null references members (member_uid),
    points        bigint not null check (points <> 0),
    -- One of the program's reason codes (goodwill, correction, ...).
    reason_code   text not null,
    -- The operator's free text. Erasure blanks it.
    note          text not null default '',
    -- The API key that made the adjustment, and its name at the time.
    key_id        bigint not null,
    key_name      text not null,
    transfer_id   bigint not null references transfers (transfer_id),
    request_hash  bytea not null,
    response      bytea not null,
    created_at    timestamptz not null default now(),
    constraint adjustments_adjustment_id_key unique (adjustment_id)
);
-- A member's adjustments: the export and erasure.
create index adjustments_member_idx on adjustments (member_uid, adjustment_pk);


-- Earning: purchases and refunds -------------------------------------------------------------

-- A partner's purchase and the points it earned. (partner, purchase_id) is the idempotency key.
-- A batch of purchases writes its lots and earn transfers in one statement
-- (konvert.ledger.batches.post_earns) and its purchases in another (konvert.earning.store).
create table purchases (
    purchase_pk  bigint generated always as identity primary key,
    partner      text not null,
    purchase_id  text not null,
    member_uid   bigint not null,
    currency     text not null,
    occurred_at  timestamptz not null,
    -- In minor currency units (cents for EUR).
    total_amount bigint not null,
    points       bigint not null,
    -- Per line: quantity, unit price, points earned and what refunds took so far; shipping,
    -- tax and bonus likewise (konvert.earning.rules.PurchaseRefundState as JSON).
    refund_state jsonb not null,
    -- The purchase's lot and earn transfer; null when it earned no points.
    lot_id       bigint,
    transfer_id  bigint,
    request_hash bytea not null,
    response     bytea not null,
    created_at   timestamptz not null default now(),
    constraint purchases_partner_purchase_id_key unique (partner, purchase_id)
);
-- Every purchase sums its member's purchases in the tier window
-- (konvert.tiers.store.qualifying_points_sql). With the points in the index that sum is an index-only
-- scan: it reads no table row per purchase, so its cost does not grow with the member's history.
-- Also a member's purchases for the export and erasure.
create index purchases_member_created_points_idx on purchases (member_uid, created_at) include (points);

-- A refund of (part of) a purchase and the points it clawed back. (purchase_pk, refund_id) is the
-- idempotency key, and refunds_purchase_refund_id_key also finds a purchase's refunds.
create table refunds (
    refund_pk       bigint generated always as identity primary key,
    purchase_pk     bigint not null references purchases (purchase_pk),
    refund_id       text not null,
    member_uid      bigint not null references members (member_uid),
    -- In minor currency units.
    amount          bigint not null,
    points          bigint not null,
    -- Points that could not be clawed back because the balance may not go negative.
    shortfall       bigint not null default 0,
    -- Points not clawed back because the purchase's lot had expired them already (the member lost
    -- them once; a refund must not take them a second time).
    already_expired bigint not null default 0 check (already_expired >= 0),
    -- What the refund did, per line (konvert.earning.rules.RefundPlan as JSON).
    detail          jsonb not null,
    request_hash    bytea not null,
    response        bytea not null,
    created_at      timestamptz not null default now(),
    constraint refunds_purchase_refund_id_key unique (purchase_pk, refund_id)
);
-- The tier sum subtracts what the member's refunds in the window clawed back: found by member (a
-- member has few refunds) instead of probed once per purchase. Also erasure.
create index refunds_member_idx on refunds (member_uid);


-- Redemption: rewards and redemptions --------------------------------------------------------

-- The reward catalog, kept by admins through the API (PUT /v1/rewards/{reward_id}: an upsert).
create table rewards (
    reward_id       text primary key check (length(reward_id) between 1 and 64),
    name            text not null,
    description     text not null default '',
    cost_points     bigint not null check (cost_points > 0),
    -- null: unlimited. Decremented when a redemption takes one (held or captured); a change that
    -- would take it below zero fails on rewards_stock_check, which the API reports as out of stock.
    stock           bigint check (stock >= 0),
    -- Offered while active, from available_from until available_until (null: no bound).
    available_from  timestamptz,
    available_until timestamptz,
    active          boolean not null default true,
    created_at      timestamptz not null default now(),
    updated_at      timestamptz not null default now()
);

-- Points a member spends on a reward (or as a payment, without one): captured at once, or held
-- until captured, released or expired. redemption_id is the idempotency key.
create table redemptions (
    redemption_pk       bigint generated always as identity primary key,
    redemption_id       text not null,
    member_uid          bigint not null references members (member_uid),
    -- null: a points payment.
    reward_id           text references rewards (reward_id),
    points              bigint not null check (points > 0),
    status              text not null check (status in ('held', 'captured', 'released', 'expired', 'cancelled')),
    -- When the hold expires unless it is captured or released first.
    hold_expires_at     timestamptz,
    -- The lots the points came from, [[lot_id, points], ...], so that a release or a
    -- cancellation returns exactly those lots.
    allocations         jsonb not null,
    -- The transfer that took the points (into held, or redeemed at once).
    transfer_id         bigint not null references transfers (transfer_id),
    -- The transfer that ended the hold or undid the redemption (capture, release, cancel).
    closing_transfer_id bigint references transfers (transfer_id),
    -- The client's free text. Erasure removes it.
    note                text,
    request_hash        bytea not null,
    response            bytea not null,
    created_at          timestamptz not null default now(),
    updated_at          timestamptz not null default now(),
    constraint redemptions_redemption_id_key unique (redemption_id)
);
-- A member's redemptions, newest first, a page at a time (konvert.redemption.store); also the
-- export and erasure.
create index redemptions_member_idx on redemptions (member_uid, redemption_pk desc);
-- The hold-expiry job: holds past hold_expires_at, soonest first.
create index redemptions_hold_expiry_idx on redemptions (hold_expires_at) where status = 'held';


-- Reputation: kudos, reputation entries, the floor, events -----------------------------------
--
-- Community reputation: kudos, what each kudos currently credits, the reputation entries that
-- explain every change (and link it to its ledger transfer), what the floor kept, and an outbox
-- of member events (rank changes) for integrations to publish. Everything here is member-scoped
-- (author_uid, giver_uid, member_uid) like the ledger, and every change happens under the row
-- locks of the members it touches.

-- A like, helpful mark or accepted answer a member (the giver) gives another member's post (the
-- author's), and what it credits each of them.
create table kudos (
    kudos_pk            bigint generated always as identity primary key,
    -- The caller's idempotency key for this kudos, unique across sources.
    kudos_id            text not null check (length(kudos_id) between 1 and 128),
    source              text not null check (length(source) between 1 and 64),
    post_id             text not null check (length(post_id) between 1 and 128),
    thread_id           text not null check (length(thread_id) between 1 and 128),
    author_uid          bigint not null references members (member_uid),
    giver_uid           bigint not null references members (member_uid),
    kind                text not null check (kind in ('like', 'helpful', 'accepted_answer')),
    occurred_at         timestamptz not null,
    -- The UTC day of occurred_at: the day whose daily cap this kudos counts against.
    day                 date not null,
    status              text not null default 'standing' check (status in ('standing', 'retracted', 'superseded')),
    -- Why a kudos awards nothing although it stands: giver_without_standing or self_accept.
    not_counted_reason  text,
    -- What this kudos is worth to its author (before the daily cap) and to the accepter, fixed
    -- when it arrives so that later program changes never rewrite old days.
    value               bigint not null check (value >= 0),
    accepter_value      bigint not null default 0 check (accepter_value >= 0),
    -- What it credits now. Like/helpful: its share of the day's cap; 0 once not standing.
    author_credited     bigint not null default 0,
    accepter_credited   bigint not null default 0,
    -- Loyalty points an accepted answer credits (program bridge), and what a clawback could not
    -- take back because the points were spent and the balance may not go negative.
    bridge_points       bigint not null default 0 check (bridge_points >= 0),
    bridge_shortfall    bigint not null default 0 check (bridge_shortfall >= 0),
    bridge_lot_id       bigint references lots (lot_id),
    bridge_transfer_id  bigint references transfers (transfer_id),
    -- An acceptance that arrives after a later acceptance of its thread is superseded at once:
    -- this is that later one.
    superseded_by_pk    bigint references kudos (kudos_pk),
    -- Idempotency: the hash of the request and the responses given for it and its retraction.
    request_hash        bytea not null,
    response            bytea not null,
    retraction_response bytea,
    created_at          timestamptz not null default now(),
    retracted_at        timestamptz,
    constraint kudos_kudos_id_key unique (kudos_id),
    constraint kudos_day_check check (day = (occurred_at at time zone 'UTC')::date),
    constraint kudos_credit_check check (
        author_credited between 0 and value and accepter_credited between 0 and accepter_value
    )
);
-- One standing kudos per giver, post and kind; a retracted or superseded one may be given again.
-- Also finds the standing kudos a duplicate collides with.
create unique index kudos_standing_key on kudos (source, post_id, giver_uid, kind) where status = 'standing';
-- One standing accepted answer per thread; also finds the thread's accepted answer.
create unique index kudos_thread_accepted_key on kudos (source, thread_id)
    where kind = 'accepted_answer' and status = 'standing';
-- Retraction by natural key: the standing kudos of a giver, post and kind, else the latest one
-- that no longer stands (konvert.reputation.store.select_kudos_by_key).
create index kudos_natural_idx on kudos (source, post_id, giver_uid, kind, kudos_pk);
-- The daily cap: a member's standing likes and helpful marks of one day in canonical order
-- (occurred_at, then kudos_id in byte order), with what sharing the cap needs, read from the
-- index alone.
create index kudos_author_day_idx on kudos (author_uid, day, occurred_at, kudos_id collate "C")
    include (value, author_credited) where status = 'standing' and kind in ('like', 'helpful');
-- The kudos a member received: what their standing kudos credit them, by source and kind
-- (konvert.reputation.store.select_breakdown), the export and erasure.
create index kudos_author_idx on kudos (author_uid);
-- The giver's daily limit (kudos given on a UTC day, standing or not); also what a member's
-- accepted answers credit them as accepter, and the kudos a member gave, for export and erasure.
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
    -- The reputation transfer of posted (null when posted is 0).
    transfer_id    bigint references transfers (transfer_id),
    -- The kudos whose arrival or retraction caused this change (itself, or another one of the
    -- same day whose arrival or retraction moved the daily cap).
    cause_kudos_pk bigint not null references kudos (kudos_pk),
    created_at     timestamptz not null default now(),
    constraint reputation_entries_transfer_check check ((posted = 0) = (transfer_id is null))
);
-- A member's entries: the privacy export.
create index reputation_entries_member_idx on reputation_entries (member_uid, entry_id);
-- The first credit a kudos made to a member in a role: what its reversals point at
-- (konvert.reputation.store.select_first_award_transfer).
create index reputation_entries_kudos_idx on reputation_entries (kudos_pk, role, entry_id);

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
-- What a publisher still has to publish, in order.
create index events_unpublished_idx on events (event_id) where published_at is null;
-- A member's events: the export, and erasure (which renames the member in their payloads).
create index events_member_idx on events (member_uid, event_id);


-- Preferences and privacy --------------------------------------------------------------------
--
-- Preferences members share for points, their consents per purpose, and the privacy log.
-- Member-scoped like the ledger (keyed by member_uid). Every change happens under the member's
-- row lock. Nothing here records connection data (addresses, user agents, login times): only
-- what the API fields carry, and the name of the API key (the client) that made a change.

-- What a member shares now: one row per (member, catalog key). Deleting a preference deletes
-- its row; the value is never kept anywhere else except the privacy log (see below).
create table preferences (
    member_uid bigint not null references members (member_uid),
    key        text not null check (length(key) between 1 and 64),
    -- A JSON string, boolean or array of strings, as the catalog's type says.
    value      jsonb not null,
    -- The purposes the member agrees this preference may be used for (a subset of the
    -- catalog entry's purposes; possibly empty).
    consent    text[] not null,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    primary key (member_uid, key)
);

-- The first time a member shared each key, and the points it paid. A row is never deleted
-- (not by deleting the preference, not by erasure), so "the first share pays, once" holds
-- across delete and re-share; concurrent first shares queue on the member's lock.
create table preference_awards (
    member_uid         bigint not null references members (member_uid),
    key                text not null,
    -- The catalog's points when the member first shared the key: what the key is worth to them.
    points             bigint not null check (points >= 0),
    -- Sums of the earn and clawback transfers of this key. points_awarded - points_clawed_back
    -- is what the member holds from it, never more than points.
    points_awarded     bigint not null default 0 check (points_awarded >= 0),
    points_clawed_back bigint not null default 0 check (points_clawed_back >= 0),
    -- The first award's transfer and lot (null when the key paid no points), and the latest
    -- lot (a re-share after a clawback pays into a new lot).
    transfer_id        bigint references transfers (transfer_id),
    lot_id             bigint references lots (lot_id),
    latest_lot_id      bigint references lots (lot_id),
    awarded_at         timestamptz not null default now(),
    primary key (member_uid, key),
    constraint preference_awards_held_check
        check (points_awarded - points_clawed_back between 0 and points)
);

-- Member-level consent per purpose. A purpose without a row is not granted: shared
-- preferences are only readable for a purpose the member has granted here.
create table consents (
    member_uid bigint not null references members (member_uid),
    purpose    text not null check (length(purpose) between 1 and 64),
    granted    boolean not null,
    changed_at timestamptz not null default now(),
    -- The name of the API key (the client) through which the member made the change.
    changed_by text not null,
    primary key (member_uid, purpose)
);

-- Append-only record of every preference and consent change, export and erasure.
create table privacy_log (
    log_id     bigint generated always as identity primary key,
    member_uid bigint not null references members (member_uid),
    kind       text not null check (kind in ('preference_set', 'preference_deleted', 'consent_changed', 'exported', 'erased')),
    -- The preference key or the purpose the entry is about (null for exports and erasure).
    subject    text,
    -- Preference entries: {"value": ..., "consent": [...]} before and after (null where there was
    -- none). Consent entries: the granted flag before and after. Erasure nulls both.
    old_value  jsonb,
    new_value  jsonb,
    -- Points the change awarded (positive) or clawed back (negative).
    points     bigint not null default 0,
    -- The name of the API key (the client) that made the change.
    client     text not null,
    created_at timestamptz not null default now()
);
-- A member's log in order (konvert.preferences.store.select_log), and what erasure blanks.
create index privacy_log_member_idx on privacy_log (member_uid, log_id);

-- The log cannot be edited, through the API or otherwise, with one exception: the erasure
-- transaction (which runs `set local konvert.erasure = 'on'`) may blank a row's values. Rows
-- are never deleted, and nothing else in a row ever changes.
create function privacy_log_append_only() returns trigger language plpgsql as $$
begin
    if tg_op = 'UPDATE' and current_setting('konvert.erasure', true) = 'on'
       and new.old_value is null and new.new_value is null
       and (new.log_id, new.member_uid, new.kind, new.subject, new.points, new.client, new.created_at)
           is not distinct from
           (old.log_id, old.member_uid, old.kind, old.subject, old.points, old.client, old.created_at) then
        return new;
    end if;
    raise exception 'privacy_log is append-only (% refused)', tg_op
        using errcode = 'insufficient_privilege', constraint = 'privacy_log_append_only';
end;
$$;
create trigger privacy_log_append_only before update or delete on privacy_log
    for each row execute function privacy_log_append_only();
create trigger privacy_log_no_truncate before truncate on privacy_log
    for each statement execute function privacy_log_append_only();


-- Ledger rows are never deleted --------------------------------------------------------------
--
-- Members, accounts, lots, transfers and purchases refuse DELETE and TRUNCATE (an erasure
-- rewrites a member, it never deletes one), so nothing a ledger row can refer to ever goes away.
--
-- This is also why transfers, lots and purchases have no foreign keys. PostgreSQL checks each
-- foreign key with a query per row that locks the row referred to (FOR KEY SHARE). On the
-- purchase path, which writes every purchase's lot, earn transfer and purchase row, those checks
-- would cost a quarter of PostgreSQL's time, and every concurrent purchase would lock the
-- partner's issued account: the hot row the ledger is built to avoid. What the keys would guard
-- is kept by never deleting ledger rows and by `konvert audit`'s "every reference resolves"
-- check (konvert.ledger.audit). Every other table has its foreign keys.
create function konvert_never_deleted() returns trigger language plpgsql as $$
begin
    raise exception '% rows are never deleted (% refused)', tg_table_name, tg_op
        using errcode = 'insufficient_privilege', constraint = 'ledger_rows_never_deleted';
end;
$$;
create trigger members_never_deleted before delete or truncate on members
    for each statement execute function konvert_never_deleted();
create trigger accounts_never_deleted before delete or truncate on accounts
    for each statement execute function konvert_never_deleted();
create trigger lots_never_deleted before delete or truncate on lots
    for each statement execute function konvert_never_deleted();
create trigger transfers_never_deleted before delete or truncate on transfers
    for each statement execute function konvert_never_deleted();
create trigger purchases_never_deleted before delete or truncate on purchases
    for each statement execute function konvert_never_deleted();
