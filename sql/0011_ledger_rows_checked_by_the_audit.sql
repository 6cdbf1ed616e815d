-- A purchase writes its purchase, lot and earn transfer in one statement
-- (konvert.earning.store.INSERT_PURCHASES). PostgreSQL checked each foreign key of those rows
-- with a query per row that also locked the row referred to (FOR KEY SHARE): eight checks per
-- purchase, a quarter of PostgreSQL's CPU per purchase, each lock a WAL record; the lock on the
-- member's account dirtied a page of accounts that nothing else writes (a full-page image after
-- every checkpoint); and every concurrent transaction locked the same row, the partner's
-- "issued" account, which PostgreSQL records as a MultiXact whenever two overlap: the hot row
-- the ledger is built to avoid.
--
-- What those keys guarded is kept another way:
-- * nothing a ledger row can refer to is ever deleted: members, accounts, lots, transfers and
--   purchases refuse DELETE and TRUNCATE (an erasure rewrites a member, it never deletes one);
-- * `konvert audit` checks that every reference of a transfer, lot or purchase resolves
--   (konvert.ledger.audit, "6 every reference resolves").
-- Every other table keeps its foreign keys.
--
-- Dropping a foreign key locks its table and the one it refers to exclusively, and these are
-- the tables every request uses: the migration gives up after 5 s of waiting for a lock rather
-- than queue every request behind a long reader (such as `konvert audit`); start the service
-- again to retry.
set local lock_timeout = '5s';
alter table purchases
    drop constraint purchases_member_uid_fkey,
    drop constraint purchases_lot_id_fkey,
    drop constraint purchases_transfer_id_fkey;
alter table lots
    drop constraint lots_member_uid_fkey;
alter table transfers
    drop constraint transfers_member_uid_fkey,
    drop constraint transfers_debit_account_id_fkey,
    drop constraint transfers_credit_account_id_fkey,
    drop constraint transfers_lot_id_fkey,
    drop constraint transfers_reverses_transfer_id_fkey;

create function konvert_never_deleted() returns trigger language plpgsql as $$
begin
    raise exception '% rows are never deleted (% refused)', tg_table_name, tg_op
        using errcode = 'insufficient_privilege', constraint = 'ledger_rows_never_deleted';
end;
$$;

do $$
declare
    name text;
begin
    foreach name in array array['members', 'accounts', 'lots', 'transfers', 'purchases'] loop
        execute format('create trigger %I before delete or truncate on %I '
                       'for each statement execute function konvert_never_deleted()', name || '_never_deleted', name);
    end loop;
end
$$;
