-- The credited likes and helpful marks of an author's day: what sharing the daily cap again after
-- a kudos arrives reads (konvert.reputation.store.select_day_shares), so that a popular author's
-- day costs each new kudos what the cap holds, not every kudos of the day.
create index kudos_author_day_credited_idx on kudos (author_uid, day, occurred_at, kudos_id collate "C")
    include (value, author_credited) where status = 'standing' and kind in ('like', 'helpful') and author_credited > 0;
