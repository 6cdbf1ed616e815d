-- The daily tier job takes members not evaluated for a day, members new to a tier first
-- (konvert.tiers.reevaluate_due). It asked for "tier_evaluated_at is null or < $1" in nulls-first
-- order, which no index range can bound, so every batch read and sorted every due member: a
-- day's backlog cost quadratic time (at 1,000,000 tiered members ~5,000 members/s against
-- 26,000-42,000/s at 100,000). Never evaluated is now -infinity in the index and in the job's query,
-- one range in index order: a batch reads its own members only. Purchases still update their
-- member in place (sql/0010): the index reads the same columns as the one it replaces.
--
-- On a large database the build holds writes to members. To avoid that pause, build it first
-- without the lock, then migrate:
--   create index concurrently members_tier_due_idx on members
--       ((coalesce(tier_evaluated_at, '-infinity'::timestamptz))) where tier is not null;
-- A concurrent build that failed leaves an invalid index of that name: this migration drops it
-- and builds it again.
do $$
begin
    if exists (select from pg_index i join pg_class c on c.oid = i.indexrelid
               where c.relname = 'members_tier_due_idx' and c.relnamespace = current_schema()::regnamespace
                 and not i.indisvalid) then
        drop index members_tier_due_idx;
    end if;
end
$$;
create index if not exists members_tier_due_idx on members
    ((coalesce(tier_evaluated_at, '-infinity'::timestamptz))) where tier is not null;
drop index if exists members_tier_evaluation_idx;
