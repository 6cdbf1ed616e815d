"""Seed members with a purchase history straight in SQL (generate_series), fast enough for 1M members.

Member ``u`` (1-based) is ``member_id = 'm<u>'`` with ``member_uid = u``. Each gets its four
accounts and ``history`` seeded purchases, each with its lot and earn transfer, as the service
would have written them:

* purchase 1 is a few days old, still inside the return window: a pending lot;
* purchases 2.. are past the return window and vested, one every ``every_days`` (30: months
  old): an earn transfer into pending, then a vest transfer pending -> available, and an
  available lot;
* every second member redeemed 1-9 points from their soonest-expiring lot: a redeem transfer, a
  lot entry and a captured redemption.

The stored balances, lifetime earned and tier agree with those rows, so ``konvert audit`` passes
on a freshly seeded database. Seeding runs with the service stopped; ids are explicit and
continue after whatever the database already holds, so a database can be grown in steps (10k,
then up to 1M members) between runs.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import datetime

import asyncpg

# Members are written in chunks of this many, on two connections at once (one per core).
CHUNK_MEMBERS = 50_000
PARALLEL_CONNECTIONS = 2

_FUNCTIONS = """
create or replace function pg_temp.seed_points(u bigint, j int) returns bigint
    language sql immutable as $$ select (10 + ((u * 37 + j * 101) % 290))::bigint $$;
create or replace function pg_temp.seed_age_days(u bigint, j int) returns int
    language sql immutable as $$
    select case when j = 1 then 1 + (u % 5)::int else {first_vested} + (j - 2) * {every} + (u % 20)::int end $$;
create or replace function pg_temp.seed_redeemed(u bigint) returns bigint
    language sql immutable as $$ select case when u % 2 = 0 then 1 + u % 9 else 0 end::bigint $$;
"""

# $1 lo, $2 hi, $3 history, $4 now, $5 tier window days, $6 tier names, $7 tier thresholds,
# $8 the members' age in days.
_MEMBERS = """
insert into members (member_uid, member_id, points_available, points_pending, points_lifetime_earned, version,
                     created_at, tier, tier_qualifying_points, tier_evaluated_at)
overriding system value
select u, 'm' || u, s.available - pg_temp.seed_redeemed(u), s.pending, s.lifetime,
       2 * $3 - 1 + (u % 2 = 0)::int, $4::timestamptz - make_interval(days => $8::int), tier.name,
       case when tier.name is null then 0 else s.qualifying end, case when tier.name is null then null else $4 end
from generate_series($1::bigint, $2::bigint) u
cross join lateral (
    select coalesce(sum(x.p) filter (where x.j >= 2), 0) as available,
           coalesce(sum(x.p) filter (where x.j = 1), 0) as pending,
           sum(x.p) as lifetime,
           coalesce(sum(x.p) filter (where x.age < $5::int), 0) as qualifying
    from (select j, pg_temp.seed_points(u, j) as p, pg_temp.seed_age_days(u, j) as age
          from generate_series(1, $3::int) j) x
) s
left join lateral (
    select t.name from unnest($6::text[], $7::bigint[]) as t (name, min_points)
    where t.min_points <= s.qualifying order by t.min_points desc limit 1
) tier on true
"""

# $1 lo, $2 hi, $3 account base, $4 batch lo
_ACCOUNTS = """
insert into accounts (account_id, member_uid, asset, name, created_at)
overriding system value
select $3::bigint + (u - $4::bigint) * 4 + k, u, case k when 3 then 'reputation' else 'points' end,
       (array['available', 'pending', 'held', 'reputation'])[k + 1], now()
from generate_series($1::bigint, $2::bigint) u, generate_series(0, 3) k
"""

# Each seeded purchase as a row, with its ids; the statements below select from this.
# $1 lo, $2 hi, $3 history, $4 now, $5 return window days, $6 lot base, $7 transfer base, $8 batch lo,
# $9 account base, $10 expire after days (null: never)
_PURCHASE_ROWS = """
select u, j, p, occurred, occurred + make_interval(days => $5::int) as vests_at,
       occurred + make_interval(days => $10::int) as expires_at,
       $6::bigint + (u - $8::bigint) * $3::int + (j - 1) as lot_id,
       $7::bigint + ((u - $8::bigint) * $3::int + (j - 1)) * 2 as earn_id,
       $9::bigint + (u - $8::bigint) * 4 as available_account,
       $9::bigint + (u - $8::bigint) * 4 + 1 as pending_account,
       case when j = $3::int then pg_temp.seed_redeemed(u) else 0 end as redeemed
from generate_series($1::bigint, $2::bigint) u, generate_series(1, $3::int) j,
     lateral (select pg_temp.seed_points(u, j) as p,
                     $4::timestamptz - make_interval(days => pg_temp.seed_age_days(u, j)) as occurred) x
"""

_LOTS = f"""
insert into lots (lot_id, member_uid, amount, remaining, state, vests_at, expires_at, created_at)
overriding system value
select lot_id, u, p, p - redeemed, case when j = 1 then 'pending' else 'available' end, vests_at, expires_at, occurred
from ({_PURCHASE_ROWS}) s
"""

# $11 issued account id, $12 partner
_EARN_TRANSFERS = f"""
insert into transfers (transfer_id, member_uid, asset, debit_account_id, credit_account_id, amount, code,
                       cause_type, cause_ref, lot_id, reason, created_at)
overriding system value
select earn_id, u, 'points', $11::bigint, pending_account, p, 'earn', 'purchase',
       $12::text || '/seed-' || u || '-' || j, lot_id, 'points for purchase', occurred
from ({_PURCHASE_ROWS}) s
"""

_VEST_TRANSFERS = f"""
insert into transfers (transfer_id, member_uid, asset, debit_account_id, credit_account_id, amount, code,
                       cause_type, cause_ref, lot_id, reason, created_at)
overriding system value
select earn_id + 1, u, 'points', pending_account, available_account, p, 'vest', 'lot', lot_id::text, lot_id,
       'return window closed', vests_at
from ({_PURCHASE_ROWS}) s where j >= 2
"""

# $11 partner
_PURCHASES = f"""
insert into purchases (partner, purchase_id, member_uid, currency, occurred_at, total_amount, points, refund_state,
                       lot_id, transfer_id, request_hash, response, created_at)
select $11::text, 'seed-' || u || '-' || j, u, 'EUR', occurred, p * 100, p,
       jsonb_build_object('lines', jsonb_build_array(jsonb_build_object(
                              'line_id', '1', 'quantity', 1, 'unit_price', p * 100, 'points', p)),
                          'shipping', 0, 'tax', 0, 'bonus_points', 0),
       lot_id, earn_id, sha256(convert_to('seed-' || u || '-' || j, 'UTF8')), convert_to('{{}}', 'UTF8'), occurred
from ({_PURCHASE_ROWS}) s
"""

# The redemption of every second member, from the lot of its oldest purchase (j = history),
# which expires first. Its transfer id is earn_id + 1 of purchase 1, a slot vesting never uses.
# $11 redeemed account id
_REDEEM_TRANSFERS = f"""
insert into transfers (transfer_id, member_uid, asset, debit_account_id, credit_account_id, amount, code,
                       cause_type, cause_ref, lot_id, reason, created_at)
overriding system value
select earn_id - 2 * ($3::int - 1) + 1, u, 'points', available_account, $11::bigint, redeemed, 'redeem',
       'redemption', 'seed-r-' || u, null, 'points payment', $4::timestamptz - interval '1 day'
from ({_PURCHASE_ROWS}) s where redeemed > 0
"""

_LOT_ENTRIES = f"""
insert into lot_entries (lot_id, member_uid, transfer_id, amount, kind, created_at)
select lot_id, u, earn_id - 2 * ($3::int - 1) + 1, redeemed, 'redeem', $4::timestamptz - interval '1 day'
from ({_PURCHASE_ROWS}) s where redeemed > 0
"""

_REDEMPTIONS = f"""
insert into redemptions (redemption_id, member_uid, reward_id, points, status, hold_expires_at, allocations,
                         transfer_id, request_hash, response, created_at, updated_at)
select 'seed-r-' || u, u, null, redeemed, 'captured', null, jsonb_build_array(jsonb_build_array(lot_id, redeemed)),
       earn_id - 2 * ($3::int - 1) + 1, sha256(convert_to('seed-r-' || u, 'UTF8')), convert_to('{{}}', 'UTF8'),
       $4::timestamptz - interval '1 day', $4::timestamptz - interval '1 day'
from ({_PURCHASE_ROWS}) s where redeemed > 0
"""

# Where the schema has them (konvert.ledger.keys), the seeded member, purchase and redemption ids'
# claims; a baseline from before them has none.
_NATURAL_KEYS = """
insert into natural_keys (key, kind, scope, member_uid)
select member_id, 'member', '', member_uid from members where member_uid between $1 and $2
union all
select purchase_id, 'purchase', partner, member_uid from purchases where member_uid between $1 and $2
union all
select redemption_id, 'redemption', '', member_uid from redemptions where member_uid between $1 and $2
"""

_SEQUENCES = (("members", "member_uid"), ("accounts", "account_id"), ("lots", "lot_id"), ("transfers", "transfer_id"))


@dataclass(frozen=True)
class ProgramFacts:
    """What seeding needs from the program file."""

    partner: str
    return_window_days: int
    expire_after_days: int | None
    tier_window_days: int
    tier_names: list[str]
    tier_thresholds: list[int]


async def _system_account(conn: asyncpg.Connection, name: str) -> int:
    if await conn.fetchval("select to_regclass('system_accounts') is not null"):
        await conn.execute(
            "insert into system_accounts (asset, name) values ('points', $1) on conflict (asset, name) do nothing", name
        )
        return await conn.fetchval("select account_id from system_accounts where asset = 'points' and name = $1", name)
    # A baseline from before system accounts had a table of their own.
    await conn.execute(
        "insert into accounts (member_uid, asset, name) values (null, 'points', $1) "
        "on conflict (member_uid, asset, name) do nothing",
        name,
    )
    return await conn.fetchval(
        "select account_id from accounts where member_uid is null and asset = 'points' and name = $1", name
    )


# Seeded members joined this long ago; their purchases must be younger.
MEMBER_AGE_DAYS = 400


def history_problem(facts: ProgramFacts, history: int, every_days: int) -> str | None:
    """Why ``history`` purchases ``every_days`` apart cannot be seeded (None: they can): the oldest
    must be younger than the member, and not expired yet (the seed writes its lot as available)."""
    oldest = _first_vested_age(facts, every_days) + (history - 2) * every_days + 19
    if oldest >= MEMBER_AGE_DAYS:
        return f"the oldest seeded purchase would be {oldest} days old, older than the members ({MEMBER_AGE_DAYS})"
    if facts.expire_after_days is not None and oldest >= facts.expire_after_days:
        return f"the oldest seeded purchase would be {oldest} days old, past the program's expiry ({facts.expire_after_days})"
    return None


def _first_vested_age(facts: ProgramFacts, every_days: int) -> int:
    """Days since purchase 2 (before its member's ``u % 20``): ``2 * every_days``, and past the return window."""
    return max(2 * every_days, facts.return_window_days + 1)


def _functions(facts: ProgramFacts, every_days: int) -> str:
    """The seed's SQL functions (seed_age_days: purchase 1, then purchases 2.. ``every_days`` apart)."""
    first_vested = _first_vested_age(facts, every_days)
    return _FUNCTIONS.replace("{first_vested}", str(first_vested)).replace("{every}", str(every_days))


async def _prepare_session(conn: asyncpg.Connection, functions: str) -> None:
    # Foreign keys are not checked while bulk loading (the rows are consistent by construction,
    # and `konvert audit` checks the ledger afterwards); commits need not wait for the disk.
    await conn.execute("set session_replication_role = replica")
    await conn.execute("set synchronous_commit = off")
    await conn.execute(functions)


async def seed_members(
    database_url: str, lo: int, hi: int, history: int, facts: ProgramFacts, now: datetime, every_days: int = 30
) -> float:
    """Seed members lo..hi (inclusive), ``history`` purchases each, one every ``every_days`` after
    the first; return the seconds it took. The service must be stopped."""
    if history < 2:
        raise ValueError("history must be at least 2 purchases per member (one pending, one available)")
    if every_days < 1:
        raise ValueError("purchases must be at least a day apart")
    if problem := history_problem(facts, history, every_days):
        raise ValueError(problem)
    functions = _functions(facts, every_days)
    started = time.monotonic()
    conn = await asyncpg.connect(database_url)
    try:
        await _prepare_session(conn, functions)
        if (await conn.fetchval("select coalesce(max(member_uid), 0) from members")) >= lo:
            raise RuntimeError(f"members from uid {lo} on exist already; seed into an empty range")
        issued = await _system_account(conn, f"issued:{facts.partner}")
        redeemed = await _system_account(conn, "redeemed")
        # Past every account id the sequence gave, system accounts' too (one sequence for both).
        account_base = await conn.fetchval(
            "select greatest(coalesce(max(account_id), 0), (select last_value from accounts_account_id_seq)) + 1 "
            "from accounts"
        )
        lot_base = await conn.fetchval("select coalesce(max(lot_id), 0) + 1 from lots")
        transfer_base = await conn.fetchval("select coalesce(max(transfer_id), 0) + 1 from transfers")
    finally:
        await conn.close()

    chunks = [(start, min(start + CHUNK_MEMBERS - 1, hi)) for start in range(lo, hi + 1, CHUNK_MEMBERS)]
    queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
    for chunk in chunks:
        queue.put_nowait(chunk)

    async def worker() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await _prepare_session(conn, functions)
            while not queue.empty():
                chunk_lo, chunk_hi = queue.get_nowait()
                await _seed_chunk(
                    conn,
                    chunk_lo,
                    chunk_hi,
                    lo,
                    history,
                    facts,
                    now,
                    account_base,
                    lot_base,
                    transfer_base,
                    issued,
                    redeemed,
                )
        finally:
            await conn.close()

    await asyncio.gather(*(worker() for _ in range(min(PARALLEL_CONNECTIONS, len(chunks)))))

    conn = await asyncpg.connect(database_url)
    try:
        for table, column in _SEQUENCES:
            await conn.execute(
                f"select setval(pg_get_serial_sequence('{table}', '{column}'), "
                f"(select greatest(coalesce(max({column}), 0), 1) from {table}))"
            )
        if await conn.fetchval("select to_regclass('natural_keys') is not null"):
            await conn.execute(_NATURAL_KEYS, lo, hi)
        # Fresh statistics and visibility map, as a long-running database would have.
        await conn.execute("vacuum analyze")
    finally:
        await conn.close()
    return time.monotonic() - started


async def _seed_chunk(
    conn: asyncpg.Connection,
    lo: int,
    hi: int,
    batch_lo: int,
    history: int,
    facts: ProgramFacts,
    now: datetime,
    account_base: int,
    lot_base: int,
    transfer_base: int,
    issued: int,
    redeemed: int,
) -> None:
    rows = (
        lo,
        hi,
        history,
        now,
        facts.return_window_days,
        lot_base,
        transfer_base,
        batch_lo,
        account_base,
        facts.expire_after_days,
    )
    async with conn.transaction():
        await conn.execute(
            _MEMBERS,
            lo,
            hi,
            history,
            now,
            facts.tier_window_days,
            facts.tier_names,
            facts.tier_thresholds,
            MEMBER_AGE_DAYS,
        )
        await conn.execute(_ACCOUNTS, lo, hi, account_base, batch_lo)
        await conn.execute(_LOTS, *rows)
        await conn.execute(_EARN_TRANSFERS, *rows, issued, facts.partner)
        await conn.execute(_VEST_TRANSFERS, *rows)
        await conn.execute(_PURCHASES, *rows, facts.partner)
        await conn.execute(_REDEEM_TRANSFERS, *rows, redeemed)
        await conn.execute(_LOT_ENTRIES, *rows)
        await conn.execute(_REDEMPTIONS, *rows)


def program_facts(program: object) -> ProgramFacts:
    """What seeding and the load scripts need from a konvert Program (konvert.program.Program)."""
    partners = program.partners  # type: ignore[attr-defined]
    if not partners:
        raise ValueError("the program has no partners; purchases need one")
    levels = program.tiers.levels  # type: ignore[attr-defined]
    return ProgramFacts(
        partner=partners[0].id,
        return_window_days=program.points.return_window_days,  # type: ignore[attr-defined]
        expire_after_days=program.points.expire_after_days,  # type: ignore[attr-defined]
        tier_window_days=program.tiers.window_days,  # type: ignore[attr-defined]
        tier_names=[level.name for level in levels],
        tier_thresholds=[level.min_points for level in levels],
    )
