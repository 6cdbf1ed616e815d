-- Every purchase sums its member's purchases in the tier window (konvert.tiers.qualifying_points_sql).
-- That sum read each purchase's heap row and probed refunds once per purchase, so its cost grew
-- with the member's history: 0.57 ms for a member with 300 purchases in the window. With the
-- points in the index it is an index-only scan, and refunds are found by member instead: 0.13 ms
-- for the same member, 0.03 ms (from 0.045) for one with 3.
--
-- On a large database this builds an index over every purchase while holding writes to
-- purchases. To avoid that pause, build it first without the lock, then migrate:
--   create index concurrently purchases_member_created_points_idx
--       on purchases (member_uid, created_at) include (points);
--   create index concurrently refunds_member_idx on refunds (member_uid);
-- A concurrent build that failed leaves an invalid index of that name: this migration drops
-- it and builds it again, so the index it relies on is never one PostgreSQL does not use.
do $$
declare
    name text;
begin
    foreach name in array array['purchases_member_created_points_idx', 'refunds_member_idx'] loop
        if exists (select from pg_index i join pg_class c on c.oid = i.indexrelid
                   where c.relname = name and c.relnamespace = current_schema()::regnamespace
                     and not i.indisvalid) then
            execute format('drop index %I', name);
        end if;
    end loop;
end
$$;
create index if not exists purchases_member_created_points_idx on purchases (member_uid, created_at) include (points);
drop index if exists purchases_member_created_idx;
create index if not exists refunds_member_idx on refunds (member_uid);
