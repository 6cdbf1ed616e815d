-- Points a refund did not claw back because its purchase's lot had expired them already (the
-- member lost them once; a refund must not take them a second time).
alter table refunds add column already_expired bigint not null default 0 check (already_expired >= 0);
