-- Vesting and expiry take their due lots oldest first, a batch at a time, and skip lots whose
-- member another transaction holds (konvert.ledger.service.work_due_lots). They order by
-- (vests_at, lot_id) and (expires_at, lot_id), but the indexes held the time alone, so every
-- batch read and sorted all the lots due at the same moment: a nightly import, or any run of
-- purchases posted with one occurred_at, is one such group, and 60,000 lots due at one instant
-- cost a batch of 250 ~100 ms at the start. Each batch's cost grew with the backlog: quadratic
-- in all. With the order in the index a batch reads its own lots only.
--
-- On a large database each build holds writes to its table. To avoid that pause, build them
-- first without the lock, then migrate:
--   create index concurrently lots_vesting_order_idx on lots (vests_at, lot_id) where state = 'pending';
--   create index concurrently lots_expiry_order_idx on lots (expires_at, lot_id) where state <> 'expired';
-- A concurrent build that failed leaves an invalid index of that name: this migration drops it
-- and builds it again.
do $$
declare
    name text;
begin
    foreach name in array array['lots_vesting_order_idx', 'lots_expiry_order_idx'] loop
        if exists (select from pg_index i join pg_class c on c.oid = i.indexrelid
                   where c.relname = name and c.relnamespace = current_schema()::regnamespace
                     and not i.indisvalid) then
            execute format('drop index %I', name);
        end if;
    end loop;
end
$$;
create index if not exists lots_vesting_order_idx on lots (vests_at, lot_id) where state = 'pending';
drop index if exists lots_vesting_idx;
create index if not exists lots_expiry_order_idx on lots (expires_at, lot_id) where state <> 'expired';
drop index if exists lots_expiry_idx;
