-- purchases_member_idx (member_uid) is a prefix of purchases_member_created_idx (member_uid,
-- created_at), which serves every lookup the first one did. Each purchase wrote an entry into
-- both; now into one. tests/integration/test_foundation.py keeps such pairs from coming back.
drop index purchases_member_idx;
