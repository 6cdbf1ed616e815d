-- API keys. The key itself is shown once at creation; only its SHA-256 is stored.
-- Keys are 256-bit random secrets, so a fast hash is enough (no password stretching needed).
create table api_keys (
    key_id      bigint generated always as identity primary key,
    name        text not null check (length(name) between 1 and 100),
    -- The key's first characters, shown by `konvert keys list` so an operator can tell keys apart.
    prefix      text not null,
    secret_hash bytea not null,
    scopes      text[] not null check (cardinality(scopes) > 0),
    created_at  timestamptz not null default now(),
    revoked_at  timestamptz,
    constraint api_keys_secret_hash_key unique (secret_hash)
);
