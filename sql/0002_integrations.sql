-- Integrations: signed webhooks in from Shopify, Stripe and Discourse, the links between their
-- customer/user ids and members, and keys bound to partners.


-- A key bound to partners may post and refund purchases only for them; null: any partner.
alter table api_keys add column partners text[] check (partners is null or cardinality(partners) > 0);


-- A connected source. Its signing secrets are stored encrypted with KONVERT_SECRET_KEY when one
-- is set (each element "fernet:<token>"), else as "plain:<secret>"; a list, so that a secret can
-- be rotated with old and new both valid for a while.
create table integrations (
    integration_id bigint generated always as identity primary key,
    name           text not null check (name ~ '^[a-z0-9][a-z0-9_-]{0,63}$'),
    kind           text not null check (kind in ('shopify', 'stripe', 'discourse')),
    -- The partner a shop's purchases are recorded for; null for forums.
    partner        text,
    -- konvert.integrations.model.Options as JSON.
    options        jsonb not null default '{}',
    secrets        text[] not null check (cardinality(secrets) between 1 and 4),
    created_at     timestamptz not null default now(),
    updated_at     timestamptz not null default now(),
    constraint integrations_name_key unique (name)
);


-- Which member a source's customer or user is.
create table identity_links (
    integration_id bigint not null references integrations on delete cascade,
    external_id    text not null check (length(external_id) between 1 and 128),
    member_uid     bigint not null references members,
    linked_at      timestamptz not null default now(),
    primary key (integration_id, external_id)
);
-- A member's links: the identities route, the export and erasure.
create index identity_links_member_idx on identity_links (member_uid);


-- The inbox: every verified delivery, recorded in the transaction that applies it. Only what the
-- program needs is kept (the action: ids, amounts, lines, the external customer/user id), never
-- the delivery's body, names, e-mail or postal addresses or IP addresses.
create table deliveries (
    delivery_pk    bigint generated always as identity primary key,
    -- No foreign key: checking one share-locks the integration's row on every insert, and
    -- overlapping purchase batches then turn those locks into a multixact per delivery. Deleting
    -- an integration deletes its deliveries in the same transaction.
    integration_id bigint not null,
    -- The sender's id for the delivery (X-Shopify-Webhook-Id, Stripe's evt_ id) or, for senders
    -- whose retries carry new ids (Discourse), what the delivery is about: the duplicate key.
    delivery_key   text not null check (length(delivery_key) between 1 and 300),
    topic          text not null check (length(topic) between 1 and 100),
    received_at    timestamptz not null,
    status         text not null check (status in ('applied', 'ignored', 'parked', 'failed')),
    -- The customer/user at the source; kept while the delivery waits for a link.
    external_id    text,
    -- The member it was applied to, once it was (no foreign key, like the ledger's rows).
    member_uid     bigint,
    -- konvert.integrations.model.Action as JSON; null when the delivery could not be read.
    action         jsonb,
    -- What it made in konvert (purchase, refund or kudos ids).
    results        jsonb not null default '{}',
    -- Why it was ignored or failed: a stable code and a sentence.
    error_code     text,
    error          text,
    attempts       integer not null default 1,
    updated_at     timestamptz not null,
    constraint deliveries_integration_delivery_key_key unique (integration_id, delivery_key)
);
-- GET /v1/integrations/{name}/deliveries?status=..., newest first.
create index deliveries_status_idx on deliveries (integration_id, status, delivery_pk);
-- Parked deliveries of an external id: applied when it is linked.
create index deliveries_parked_idx on deliveries (integration_id, external_id) where status = 'parked';
-- Refunds that came before their purchase, retried when it is applied.
create index deliveries_waiting_refunds_idx on deliveries (integration_id, (action->>'purchase_id'))
    where status = 'failed' and error_code = 'purchase_not_found';
-- A member's deliveries: the export and erasure.
create index deliveries_member_idx on deliveries (member_uid) where member_uid is not null;
