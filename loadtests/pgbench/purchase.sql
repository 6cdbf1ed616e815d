-- konvert's own SQL for one purchase, replayed: the statements the service runs for a purchase
-- batch of one (konvert.earning.service.write_purchases), in their order, in one transaction with
-- a durable commit. Each takes the batch's arrays with one element, built from this script's
-- variables where the service binds a parameter. It writes what a purchase writes: the member's
-- row lock and balance, the lot, the earn transfer, the purchase id's natural key, the purchase
-- with its refund state and stored response, the member's event sequence and two outbox events.
--
-- What the service computes in Python is computed here by pgbench or in SQL: the points by the
-- example program's base rules (1 point per EUR, books double; no tier multiplier or bonus), the
-- tier from the qualifying points (without the downgrade grace), the request hash (a digest of the
-- purchase id) and the response body. loadtests/run.py runs it like ledger.sql (pgbench -M
-- prepared -c C -j 2 -T D -f purchase.sql) in the seeded database, with these variables (-D)
--   members                  seeded members m1..mN
--   tag                      new for each run, so that purchase ids <tag>-<client>-<n> are unique
--   n                        0, each client's purchase counter
--   partner, issued          the partner and the id of its system account issued:<partner>
--   return_window_days, expire_after_days (-1 for never), tier_window_days
--   tier_names, tier_thresholds   the program's tiers as arrays, e.g. {Bronze,Silver} and {0,1000}
\set member random(1, :members)
\set n :n + 1
\set q1 random(1, 3)
\set u1 random(500, 6000)
\set q2 random(1, 3)
\set u2 random(500, 6000)
\set q3 random(1, 3)
\set u3 random(500, 6000)
\set a1 :q1 * :u1
\set a2 :q2 * :u2
\set a3 :q3 * :u3
\set p1 :a1 * 2 / 100
\set p2 :a2 / 100
\set p3 :a3 / 100
\set points :p1 + :p2 + :p3
BEGIN;
-- The member's and the purchase id's claims (earning.store.select_claims).
select kind, scope, key, member_uid from natural_keys
where key = any(array['m' || :member::text]) and kind = 'member' and scope = ''
union all
select n.kind, n.scope, n.key, n.member_uid
from unnest(array[:partner::text], array[:tag::text || '-' || :client_id::int || '-' || :n::int])
     as k (partner, purchase_id)
join natural_keys n on n.key = k.purchase_id and n.kind = 'purchase' and n.scope = k.partner
where n.key = any(array[:tag::text || '-' || :client_id::int || '-' || :n::int])
\gset c_
-- The member's row lock (ledger.book.Book.lock).
select member_uid, member_id, points_available, points_pending, points_held, points_debt,
    points_lifetime_earned, reputation, version, erased_at, tier, tier_below_since, tier_qualifying_points
from members where member_uid = any(array[:c_member_uid::bigint]) order by member_uid for update
\gset m_
-- The purchase id's recorded purchase (none) and the member's points in the tier window
-- (earning.store.read_for_batch).
select p.partner, p.purchase_id, p.member_uid, p.request_hash, p.response, null::bigint as points
from unnest(array[:partner::text], array[:tag::text || '-' || :client_id::int || '-' || :n::int],
            array[:c_member_uid::bigint]) as k (partner, purchase_id, member_uid)
join purchases p on p.member_uid = k.member_uid and p.partner = k.partner and p.purchase_id = k.purchase_id
where p.member_uid = any(array[:c_member_uid::bigint])
union all
select null, null, u.member_uid, null, null, (
    (select coalesce(sum(p.points), 0) from purchases p
     where p.member_uid = u.member_uid and p.created_at >= now() - make_interval(days => :tier_window_days::int))
    - (select coalesce(sum(r.points), 0) from refunds r join purchases p on p.purchase_pk = r.purchase_pk
       where r.member_uid = u.member_uid and p.member_uid = u.member_uid
         and p.created_at >= now() - make_interval(days => :tier_window_days::int))
)::bigint
from unnest(array[:c_member_uid::bigint]) as u (member_uid)
\gset r_
\set qualifying :r_points + :points
-- The lot, the earn transfer and the member's balance and tier (ledger.batches.post_earns); the
-- earn's state and dates come back with the ids, for the rows below.
with earn as (
    select *
    from unnest(array[:c_member_uid::bigint], array[:points::bigint],
                array[case when now() - interval '1 hour' + make_interval(days => :return_window_days::int) > now()
                           then 'pending' else 'available' end],
                array[now() - interval '1 hour' + make_interval(days => :return_window_days::int)],
                array[now() + nullif(:expire_after_days::int, -1) * interval '1 day'],
                array[:issued::bigint], array['purchase'],
                array[:partner::text || '/' || :tag::text || '-' || :client_id::int || '-' || :n::int],
                array['points for purchase'])
         with ordinality as e (member_uid, points, state, vests_at, expires_at, source_account_id, cause_type,
                               cause_ref, reason, ord)
), posted as materialized (
    select e.*, nextval('lots_lot_id_seq') as lot_id, nextval('transfers_transfer_id_seq') as transfer_id
    from earn e where e.points > 0
), lot as (
    insert into lots (lot_id, member_uid, amount, remaining, state, vests_at, expires_at)
    overriding system value
    select lot_id, member_uid, points, points, state, vests_at, expires_at from posted order by ord
), transfer as (
    insert into transfers (transfer_id, member_uid, asset, debit_account_id, credit_account_id, amount, code,
                           cause_type, cause_ref, lot_id, reason)
    overriding system value
    select p.transfer_id, p.member_uid, 'points', p.source_account_id, a.account_id, p.points, 'earn',
           p.cause_type, p.cause_ref, p.lot_id, p.reason
    from posted p
    left join accounts a on a.member_uid = p.member_uid and a.asset = 'points' and a.name = p.state
                        and a.member_uid = any(array[:c_member_uid::bigint])
    order by p.ord
), change as (
    select member_uid,
           coalesce(sum(points) filter (where state = 'pending'), 0) as pending,
           coalesce(sum(points) filter (where state = 'available'), 0) as available,
           sum(points) as earned, count(*) as earns
    from earn group by member_uid
), standing as (
    select * from unnest(array[:c_member_uid::bigint],
                         array[(select t.name from unnest(:tier_names::text[], :tier_thresholds::bigint[])
                                    as t (name, min_points)
                                where t.min_points <= :qualifying::bigint order by t.min_points desc limit 1)],
                         array[null::timestamptz], array[:qualifying::bigint])
                  as s (member_uid, tier, below_since, qualifying_points)
), updated as (
    update members m
    set points_pending = m.points_pending + c.pending,
        points_available = m.points_available + c.available,
        points_lifetime_earned = m.points_lifetime_earned + c.earned,
        tier = case when s.member_uid is null then m.tier else s.tier end,
        tier_below_since = case when s.member_uid is null then m.tier_below_since else s.below_since end,
        tier_qualifying_points = coalesce(s.qualifying_points, m.tier_qualifying_points),
        version = m.version + c.earns
    from change c left join standing s using (member_uid)
    where m.member_uid = c.member_uid and m.member_uid = any(array[:c_member_uid::bigint])
    returning m.member_uid, m.member_id, m.version, m.points_debt, m.points_available
)
select u.member_uid, u.member_id, u.version, u.points_debt, u.points_available, p.ord, p.lot_id, p.transfer_id,
       p.state, p.vests_at, coalesce(p.expires_at::text, '') as expires_at
from updated u left join posted p using (member_uid)
\gset e_
-- The purchase's natural key and the purchase, with its refund state and stored response
-- (earning.store.insert_purchases).
with r as (
    select *
    from unnest(array[:partner::text], array[:tag::text || '-' || :client_id::int || '-' || :n::int],
                array[:c_member_uid::bigint], array['EUR'], array[now() - interval '1 hour'],
                array[:a1::bigint + :a2::bigint + :a3::bigint], array[:points::bigint],
                array[json_build_object(
                    'lines', json_build_array(
                        json_build_object('line_id', '1', 'quantity', :q1::int, 'unit_price', :u1::int,
                                          'points', :p1::int, 'refunded_quantity', 0, 'refunded_amount', 0,
                                          'points_clawed', 0),
                        json_build_object('line_id', '2', 'quantity', :q2::int, 'unit_price', :u2::int,
                                          'points', :p2::int, 'refunded_quantity', 0, 'refunded_amount', 0,
                                          'points_clawed', 0),
                        json_build_object('line_id', '3', 'quantity', :q3::int, 'unit_price', :u3::int,
                                          'points', :p3::int, 'refunded_quantity', 0, 'refunded_amount', 0,
                                          'points_clawed', 0)),
                    'shipping', 0, 'tax', 0, 'bonus_points', 0, 'bonus_clawed', 0, 'other_refunded_amount', 0)::text],
                array[:e_lot_id::bigint], array[:e_transfer_id::bigint],
                array[sha256(convert_to(:tag::text || '-' || :client_id::int || '-' || :n::int, 'UTF8'))],
                -- The service's response body, byte for byte but for the dates' format. (In this
                -- script a colon followed by a letter or digit is a variable, also in a string: the
                -- template's values all come from arguments.)
                array[convert_to(format(
                    '{"purchase_id":"%s","partner":"%s","member_id":"%s","currency":"EUR","points":%s,"status":"%s",'
                    '"vests_at":"%s","expires_at":%s,"lines":[{"line_id":"1","amount":%s,"points":%s,"rules":['
                    '{"kind":"rate","ref":"EUR","factor":"1"},{"kind":"category","ref":"books","factor":"2"},'
                    '{"kind":"rounding","ref":"floor","factor":"%s"}]},{"line_id":"2","amount":%s,"points":%s,'
                    '"rules":[{"kind":"rate","ref":"EUR","factor":"1"}]},{"line_id":"3","amount":%s,"points":%s,'
                    '"rules":[{"kind":"rate","ref":"EUR","factor":"1"}]}],"bonus_points":%s,"bonuses":[],'
                    '"points_before_cap":%s,"cap_applied":%s,"rules":[],"lot_id":%s,"transfer_id":%s}',
                    :tag::text || '-' || :client_id::int || '-' || :n::int, :partner::text, :m_member_id::text,
                    :points::int, :e_state::text, :e_vests_at::text,
                    coalesce(to_json(nullif(:e_expires_at::text, ''))::text, 'null'), :a1::int, :p1::int,
                    round(:a1::int * 2 / 100.0, 2), :a2::int, :p2::int, :a3::int, :p3::int, 0, :points::int, 'false',
                    :e_lot_id::bigint, :e_transfer_id::bigint), 'UTF8')])
         as r (partner, purchase_id, member_uid, currency, occurred_at, total_amount, points, refund_state,
               lot_id, transfer_id, request_hash, response)
), claimed as (
    insert into natural_keys (key, kind, scope, member_uid)
    select purchase_id, 'purchase', partner, member_uid from r
    order by partner, purchase_id
    on conflict do nothing
    returning key, scope
), recorded as (
    insert into purchases (partner, purchase_id, member_uid, currency, occurred_at, total_amount, points,
                           refund_state, lot_id, transfer_id, request_hash, response)
    select r.partner, r.purchase_id, r.member_uid, r.currency, r.occurred_at, r.total_amount, r.points,
           r.refund_state::jsonb, r.lot_id, r.transfer_id, r.request_hash, r.response
    from r join claimed c on c.key = r.purchase_id and c.scope = r.partner
    returning 1
)
select count(*) from recorded;
-- purchase.recorded and points.earned in the outbox, numbered in the member's sequence
-- (ledger.events, written at the end of the batch's transaction).
with input as (
    select * from unnest(array[:c_member_uid::bigint, :c_member_uid::bigint],
                         array['purchase.recorded', 'points.earned'],
                         array[json_build_object('partner', :partner::text,
                                   'purchase_id', :tag::text || '-' || :client_id::int || '-' || :n::int,
                                   'currency', 'EUR', 'occurred_at', now() - interval '1 hour',
                                   'points', :points::int)::text,
                               json_build_object('points', :points::int, 'state', :e_state::text,
                                   'cause_type', 'purchase',
                                   'cause_ref', :partner::text || '/' || :tag::text || '-' || :client_id::int
                                                || '-' || :n::int,
                                   'lot_id', :e_lot_id::bigint, 'transfer_id', :e_transfer_id::bigint,
                                   'vests_at', :e_vests_at::timestamptz,
                                   'expires_at', nullif(:e_expires_at::text, '')::timestamptz,
                                   'balance', json_build_object(
                                       'available', :e_points_available::bigint,
                                       'pending', :m_points_pending::bigint
                                                  + case when :e_state::text = 'pending' then :points::int else 0 end,
                                       'held', :m_points_held::bigint))::text],
                         array[clock_timestamp(), clock_timestamp()])
                  with ordinality as i (member_uid, type, data, occurred_at, ord)
), counted as (
    select member_uid, count(*) as n from input where member_uid is not null group by member_uid
), numbered as (
    insert into event_sequences as s (member_uid, last_sequence)
    select member_uid, n from counted order by member_uid
    on conflict (member_uid) do update set last_sequence = s.last_sequence + excluded.last_sequence
    returning member_uid, last_sequence
)
insert into outbox_events (member_uid, sequence, type, data, occurred_at)
select i.member_uid,
       n.last_sequence - c.n + row_number() over (partition by i.member_uid order by i.ord),
       i.type, i.data::jsonb, i.occurred_at
from input i
left join counted c using (member_uid)
left join numbered n using (member_uid)
order by i.ord;
END;
