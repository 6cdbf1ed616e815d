-- Preferences members share for points, their consents per purpose, and the privacy log.
--
-- Member-scoped like the ledger (keyed by member_uid). Every change happens under the member's
-- row lock. Nothing here records connection data (addresses, user agents, login times): only
-- what the API fields carry, and the name of the API key (the client) that made a change.

-- What a member shares now: one row per (member, catalog key). Deleting a preference deletes
-- its row; the value is never kept anywhere else except the privacy log (see below).
create table preferences (
    member_uid bigint not null references members (member_uid),
    key        text not null check (length(key) between 1 and 64),
    -- A JSON string, boolean or array of strings, as the catalog's type says.
    value      jsonb not null,
    -- The purposes the member agrees this preference may be used for (a subset of the
    -- catalog entry's purposes; possibly empty).
    consent    text[] not null,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    primary key (member_uid, key)
);

-- The first time a member shared each key, and the points it paid. A row is never deleted
-- (not by deleting the preference, not by erasure), so "the first share pays, once" holds
-- across delete and re-share; concurrent first shares meet on the primary key.
create table preference_awards (
    member_uid         bigint not null references members (member_uid),
    key                text not null,
    -- The catalog's points when the member first shared the key: what the key is worth to them.
    points             bigint not null check (points >= 0),
    -- Sums of the earn and clawback transfers of this key. points_awarded - points_clawed_back
    -- is what the member holds from it, never more than points.
    points_awarded     bigint not null default 0 check (points_awarded >= 0),
    points_clawed_back bigint not null default 0 check (points_clawed_back >= 0),
    -- The first award's transfer and lot (null when the key paid no points), and the latest
    -- lot (a re-share after a clawback pays into a new lot).
    transfer_id        bigint references transfers (transfer_id),
    lot_id             bigint references lots (lot_id),
    latest_lot_id      bigint references lots (lot_id),
    awarded_at         timestamptz not null default now(),
    primary key (member_uid, key),
    constraint preference_awards_held_check
        check (points_awarded - points_clawed_back between 0 and points)
);

-- Member-level consent per purpose. A purpose without a row is not granted: shared
-- preferences are only readable for a purpose the member has granted here.
create table consents (
    member_uid bigint not null references members (member_uid),
    purpose    text not null check (length(purpose) between 1 and 64),
    granted    boolean not null,
    changed_at timestamptz not null default now(),
    -- The name of the API key (the client) through which the member made the change.
    changed_by text not null,
    primary key (member_uid, purpose)
);

-- Append-only record of every preference and consent change, export and erasure.
create table privacy_log (
    log_id     bigint generated always as identity primary key,
    member_uid bigint not null references members (member_uid),
    kind       text not null check (kind in ('preference_set', 'preference_deleted', 'consent_changed', 'exported', 'erased')),
    -- The preference key or the purpose the entry is about (null for exports and erasure).
    subject    text,
    -- Preference entries: {"value": ..., "consent": [...]} before and after (null where there was
    -- none). Consent entries: the granted flag before and after. Erasure nulls both.
    old_value  jsonb,
    new_value  jsonb,
    -- Points the change awarded (positive) or clawed back (negative).
    points     bigint not null default 0,
    client     text not null,
    created_at timestamptz not null default now()
);
create index privacy_log_member_idx on privacy_log (member_uid, log_id);

-- The log cannot be edited, through the API or otherwise, with one exception: the erasure
-- transaction (which runs `set local konvert.erasure = 'on'`) may blank a row's values. Rows
-- are never deleted, and nothing else in a row ever changes.
create function privacy_log_append_only() returns trigger language plpgsql as $$
begin
    if tg_op = 'UPDATE' and current_setting('konvert.erasure', true) = 'on'
       and new.old_value is null and new.new_value is null
       and (new.log_id, new.member_uid, new.kind, new.subject, new.points, new.client, new.created_at)
           is not distinct from
           (old.log_id, old.member_uid, old.kind, old.subject, old.points, old.client, old.created_at) then
        return new;
    end if;
    raise exception 'privacy_log is append-only (% refused)', tg_op
        using errcode = 'insufficient_privilege', constraint = 'privacy_log_append_only';
end;
$$;
create trigger privacy_log_append_only before update or delete on privacy_log
    for each row execute function privacy_log_append_only();
create trigger privacy_log_no_truncate before truncate on privacy_log
    for each statement execute function privacy_log_append_only();

create index members_erased_idx on members (erased_at) where erased_at is not null;
