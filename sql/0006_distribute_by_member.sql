-- A schema that Citus can distribute by member (konvert.distribution lists how each table goes;
-- docs/SCALING.md, "Citus").
--
-- On Citus a primary key or unique constraint of a distributed table must hold its distribution
-- column, and a foreign key between distributed tables must join on it: each shard checks its
-- own rows only. So every member table's key now starts with member_uid, and every reference to
-- a member's lot, transfer or purchase names the member too. The ids themselves stay unique
-- (each comes from its own sequence); member_uid in front also keeps a member's rows together in
-- every key's index.
--
-- Natural keys that are not per member move to natural_keys, a table distributed by the key:
-- (member_id, 'member', ''), (purchase_id, 'purchase', partner), (redemption_id, 'redemption', ''), (adjustment_id,
-- 'adjustment', ''). Claiming a key there is what makes it unique (concurrent duplicates meet on
-- its primary key), and it says which member the key belongs to, so a request that names only
-- the key (a refund, a capture) finds the member with one lookup on one shard.


-- Keys that are not per member ---------------------------------------------------------------

create table natural_keys (
    key        text not null,
    kind       text not null check (kind in ('member', 'purchase', 'redemption', 'adjustment')),
    -- The partner of a purchase id; '' for kinds unique on their own.
    scope      text not null default '',
    member_uid bigint not null,
    primary key (key, kind, scope)
);
insert into natural_keys (key, kind, scope, member_uid)
select member_id, 'member', '', member_uid from members
union all select purchase_id, 'purchase', partner, member_uid from purchases
union all select redemption_id, 'redemption', '', member_uid from redemptions
union all select adjustment_id, 'adjustment', '', member_uid from adjustments;


-- System accounts ---------------------------------------------------------------------------
--
-- The program's accounts (issued:<partner>, redeemed, expired, ...) have no member, and a
-- distributed table has no row without its distribution column: they move to a table of their
-- own, a reference table on Citus. Their ids stay as they were (one sequence for both tables), so
-- transfers keep naming them.

create table system_accounts (
    account_id bigint primary key default nextval('accounts_account_id_seq'),
    asset      text not null check (asset in ('points', 'reputation')),
    name       text not null check (length(name) between 1 and 100),
    created_at timestamptz not null default now(),
    constraint system_accounts_name_key unique (asset, name)
);
insert into system_accounts (account_id, asset, name, created_at)
select account_id, asset, name, created_at from accounts where member_uid is null;
alter table accounts disable trigger accounts_never_deleted;
delete from accounts where member_uid is null;
alter table accounts enable trigger accounts_never_deleted;
alter table accounts alter column member_uid set not null,
    drop constraint accounts_pkey, add constraint accounts_pkey primary key (member_uid, account_id),
    drop constraint accounts_owner_key, add constraint accounts_owner_key unique (member_uid, asset, name);
-- `konvert audit` finds the account a transfer names by its id alone.
create index accounts_account_id_idx on accounts (account_id);
create trigger system_accounts_never_deleted before delete or truncate on system_accounts
    for each statement execute function konvert_never_deleted();
-- Both kinds, for `konvert audit`, which checks transfers against whatever account they name.
create view every_account as
select account_id, member_uid, asset, name from accounts
union all
select account_id, null, asset, name from system_accounts;


-- A member id is unique in natural_keys.
alter table members drop constraint members_member_id_key;


-- Foreign keys to lots, transfers and purchases name the member ------------------------------

alter table lot_entries drop constraint lot_entries_lot_id_fkey, drop constraint lot_entries_transfer_id_fkey;
alter table adjustments drop constraint adjustments_transfer_id_fkey;
alter table refunds drop constraint refunds_purchase_pk_fkey;
alter table redemptions drop constraint redemptions_transfer_id_fkey,
    drop constraint redemptions_closing_transfer_id_fkey;
alter table kudos drop constraint kudos_bridge_lot_id_fkey, drop constraint kudos_bridge_transfer_id_fkey;
alter table reputation_entries drop constraint reputation_entries_transfer_id_fkey;
alter table preference_awards drop constraint preference_awards_lot_id_fkey,
    drop constraint preference_awards_latest_lot_id_fkey, drop constraint preference_awards_transfer_id_fkey;


-- Primary keys start with the member ---------------------------------------------------------

alter table lots drop constraint lots_pkey, add constraint lots_pkey primary key (member_uid, lot_id);
-- The primary key orders a member's transfers by id: the activity page reads it backwards.
alter table transfers drop constraint transfers_pkey,
    add constraint transfers_pkey primary key (member_uid, transfer_id);
drop index transfers_member_idx;
alter table lot_entries drop constraint lot_entries_pkey,
    add constraint lot_entries_pkey primary key (member_uid, entry_id);
alter table adjustments drop constraint adjustments_pkey,
    add constraint adjustments_pkey primary key (member_uid, adjustment_pk),
    drop constraint adjustments_adjustment_id_key,
    add constraint adjustments_adjustment_id_key unique (member_uid, adjustment_id);
drop index adjustments_member_idx;
alter table purchases drop constraint purchases_pkey,
    add constraint purchases_pkey primary key (member_uid, purchase_pk),
    drop constraint purchases_partner_purchase_id_key,
    add constraint purchases_partner_purchase_id_key unique (member_uid, partner, purchase_id);
alter table refunds drop constraint refunds_pkey,
    add constraint refunds_pkey primary key (member_uid, refund_pk),
    drop constraint refunds_purchase_refund_id_key,
    add constraint refunds_purchase_refund_id_key unique (member_uid, purchase_pk, refund_id);
drop index refunds_member_idx;
alter table redemptions drop constraint redemptions_pkey,
    add constraint redemptions_pkey primary key (member_uid, redemption_pk),
    drop constraint redemptions_redemption_id_key,
    add constraint redemptions_redemption_id_key unique (member_uid, redemption_id);
drop index redemptions_member_idx;
alter table reputation_entries drop constraint reputation_entries_pkey,
    add constraint reputation_entries_pkey primary key (member_uid, entry_id);
drop index reputation_entries_member_idx;
alter table privacy_log drop constraint privacy_log_pkey,
    add constraint privacy_log_pkey primary key (member_uid, log_id);
drop index privacy_log_member_idx;
alter table lot_expiry_notices drop constraint lot_expiry_notices_pkey,
    add constraint lot_expiry_notices_pkey primary key (member_uid, lot_id);


-- The foreign keys again, with the member ----------------------------------------------------

alter table lot_entries
    add constraint lot_entries_lot_id_fkey foreign key (member_uid, lot_id) references lots (member_uid, lot_id),
    add constraint lot_entries_transfer_id_fkey foreign key (member_uid, transfer_id)
        references transfers (member_uid, transfer_id);
alter table adjustments add constraint adjustments_transfer_id_fkey foreign key (member_uid, transfer_id)
    references transfers (member_uid, transfer_id);
alter table refunds add constraint refunds_purchase_pk_fkey foreign key (member_uid, purchase_pk)
    references purchases (member_uid, purchase_pk);
alter table redemptions
    add constraint redemptions_transfer_id_fkey foreign key (member_uid, transfer_id)
        references transfers (member_uid, transfer_id),
    add constraint redemptions_closing_transfer_id_fkey foreign key (member_uid, closing_transfer_id)
        references transfers (member_uid, transfer_id);
-- An accepted answer's bridge points are its author's.
alter table kudos
    add constraint kudos_bridge_lot_id_fkey foreign key (author_uid, bridge_lot_id) references lots (member_uid, lot_id),
    add constraint kudos_bridge_transfer_id_fkey foreign key (author_uid, bridge_transfer_id)
        references transfers (member_uid, transfer_id);
alter table reputation_entries add constraint reputation_entries_transfer_id_fkey foreign key (member_uid, transfer_id)
    references transfers (member_uid, transfer_id);
alter table preference_awards
    add constraint preference_awards_lot_id_fkey foreign key (member_uid, lot_id) references lots (member_uid, lot_id),
    add constraint preference_awards_latest_lot_id_fkey foreign key (member_uid, latest_lot_id)
        references lots (member_uid, lot_id),
    add constraint preference_awards_transfer_id_fkey foreign key (member_uid, transfer_id)
        references transfers (member_uid, transfer_id);


-- Tables distributed by their own key --------------------------------------------------------

-- Identity links are found by the source's id, which is what they are distributed by; a member's
-- links (the export, erasure) are a query over every shard. members is on other shards, so the
-- reference to it goes (members are never deleted).
alter table identity_links drop constraint identity_links_member_uid_fkey;

-- Deliveries are distributed by their delivery key. delivery_pk stays an id, found by its index.
alter table deliveries drop constraint deliveries_pkey,
    add constraint deliveries_pkey primary key (delivery_key, delivery_pk);
create index deliveries_pk_idx on deliveries (delivery_pk);
