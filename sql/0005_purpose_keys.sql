-- Keys bound to consent purposes: such a key reads a member's preferences only as far as those
-- purposes may (the member consented to them), and not the member's whole export; null: unbound.
alter table api_keys add column purposes text[] check (purposes is null or cardinality(purposes) > 0);
