-- Every purchase, redemption and kudos updates its member's row. PostgreSQL rewrites a row in
-- place (a HOT update: no new index entries, no other page touched) only when the new version
-- fits on the same page and no indexed column changed (nor one an index's predicate reads).
-- Purchases no longer move the indexed tier_evaluated_at on every purchase
-- (konvert.earning.store.INSERT_PURCHASES), so only one that changes the member's tier is not
-- HOT; this leaves room on each page for the new versions. It applies to pages written from now on; to give an
-- existing table's pages the room at once, rewrite it in a quiet hour (VACUUM FULL members, or
-- pg_repack without the lock).
alter table members set (fillfactor = 90);
