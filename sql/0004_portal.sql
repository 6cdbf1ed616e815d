-- The member portal.
--
-- Its secrets (the key that signs CSRF tokens) are made once by the first process that needs
-- them and then read by every process, so that a form one worker rendered is accepted by
-- another, and a restart does not invalidate the forms members have open.

create table portal_secrets (
    name       text primary key,
    secret     text not null check (length(secret) >= 32),
    created_at timestamptz not null default now()
);
