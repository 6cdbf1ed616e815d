"""The schema can be distributed by member on Citus, checked on plain PostgreSQL.

konvert.distribution lists how every table goes. The catalog must agree with it: each
distributed table's primary key and unique constraints hold its distribution column, and each
foreign key between distributed tables joins co-located tables on it (Citus refuses anything
else). And the hot requests (a purchase batch, a balance read, a redemption hold, kudos and
acceptances, a retraction, a refund, an integration's arrivals) and the jobs are run for real
with every statement they send captured and EXPLAINed: each scan of a distributed table must
compare its distribution column with the statement's values (or join it to a co-located scan
that does), which is what lets Citus send the statement to those members' shards alone. Only the
reads that find a job's due rows, the messages to lease or the events to prune go across
members. Locking members one by one
(KONVERT_LOCK_MEMBERS), no statement that locks rows names more than one member: Citus runs a
locking statement only when it goes to one shard.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec
import pytest
import redis.asyncio as redis

from konvert import composition, distribution
from konvert.earning.model import PurchaseIn, RefundIn
from konvert.earning.refunds import refund_purchase
from konvert.earning.service import post_purchase
from konvert.errors import IdempotencyConflict
from konvert.events import store as events_store
from konvert.integrations import store as integrations
from konvert.ledger import batches, jobs
from konvert.ledger import store as ledger_store
from konvert.ledger.accounts import ADJUSTMENTS
from konvert.ledger.balances import read_balance
from konvert.ledger.book import writing
from konvert.ledger.model import Cause
from konvert.program import Program
from konvert.redemption.model import RedemptionIn
from konvert.redemption.service import redeem
from konvert.reputation.model import KudosIn, RetractionIn
from konvert.reputation.service import give_kudos, retract_kudos_by_key
from konvert.settings import Settings
from tests.conftest import make_settings, purchase_body

DISTRIBUTED = {t.table: t for t in distribution.distributed_tables()}
REFERENCE = set(distribution.REFERENCE_TABLES)

_KEYS = """
select c.conname as name, c.contype::text as kind, rel.relname as table_name,
       array(select a.attname::text from unnest(c.conkey) with ordinality k (n, i)
             join pg_attribute a on a.attrelid = c.conrelid and a.attnum = k.n order by k.i) as columns,
       ref.relname as referenced,
       array(select a.attname::text from unnest(c.confkey) with ordinality k (n, i)
             join pg_attribute a on a.attrelid = c.confrelid and a.attnum = k.n order by k.i) as referenced_columns
from pg_constraint c
join pg_class rel on rel.oid = c.conrelid
left join pg_class ref on ref.oid = c.confrelid
where c.connamespace = 'public'::regnamespace and c.contype in ('p', 'u', 'f')
union all
-- Unique indexes that are not constraints (partial ones, say).
select i.relname, 'u', rel.relname,
       array(select a.attname::text from unnest(x.indkey) with ordinality k (n, i)
             join pg_attribute a on a.attrelid = x.indrelid and a.attnum = k.n order by k.i),
       null, null
from pg_index x
join pg_class i on i.oid = x.indexrelid
join pg_class rel on rel.oid = x.indrelid
where x.indisunique and rel.relnamespace = 'public'::regnamespace
  and not exists (select 1 from pg_constraint c where c.conindid = x.indexrelid)
"""


def violations(keys: list[asyncpg.Record], tables: dict[str, distribution.Distributed]) -> dict[str, list[str]]:
    """What each table does that Citus would refuse, by table (tables keeping the rules: none)."""
    found: dict[str, list[str]] = {}
    for key in keys:
        table = tables.get(key["table_name"])
        if key["kind"] in ("p", "u"):
            if table is not None and table.column not in key["columns"]:
                found.setdefault(table.table, []).append(f"{key['name']} lacks {table.column}")
            continue
        referenced = tables.get(key["referenced"])
        if referenced is None:
            if table is None and key["referenced"] not in REFERENCE:
                found.setdefault(key["table_name"], []).append(f"{key['name']}: refers to an unlisted table")
            continue  # to a reference table: Citus keeps a copy on every node
        if table is None:
            found.setdefault(key["table_name"], []).append(f"{key['name']}: a reference table refers to a member's")
        elif _colocation(table, tables) != _colocation(referenced, tables):
            found.setdefault(table.table, []).append(f"{key['name']}: refers to a table on other shards")
        elif (table.column, referenced.column) not in zip(key["columns"], key["referenced_columns"], strict=True):
            found.setdefault(table.table, []).append(f"{key['name']} does not join on {table.column}")
    return found


def _colocation(table: distribution.Distributed, tables: dict[str, distribution.Distributed]) -> str:
    while table.colocate_with is not None:
        table = tables[table.colocate_with]
    return table.table


async def _keys(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return await conn.fetch(_KEYS)


async def test_every_table_is_listed_once(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        tables = {
            r["relname"]
            for r in await conn.fetch(
                "select relname from pg_class where relkind = 'r' and relnamespace = 'public'::regnamespace"
            )
        }
    finally:
        await conn.close()
    listed = [*DISTRIBUTED, *distribution.REFERENCE_TABLES, *distribution.LOCAL_TABLES]

    assert sorted(listed) == sorted(set(listed))
    assert set(listed) == tables


async def test_keys_and_foreign_keys_hold_the_distribution_column(database_url: str) -> None:
    """Every distributed table keeps the rules, except those konvert.distribution.GAPS names,
    which still break them (a gap that is closed must leave the list)."""
    conn = await asyncpg.connect(database_url)
    try:
        found = violations(await _keys(conn), DISTRIBUTED)
    finally:
        await conn.close()

    assert {table: why for table, why in found.items() if table not in distribution.GAPS} == {}
    assert set(distribution.GAPS) <= set(found), "closed gaps: " + ", ".join(set(distribution.GAPS) - set(found))


async def test_the_check_finds_a_key_and_a_foreign_key_without_the_member(fresh_database_url: str) -> None:
    conn = await asyncpg.connect(fresh_database_url)
    try:
        await conn.execute(
            """
            create table tokens (token text primary key, member_uid bigint not null);
            create table token_uses (member_uid bigint not null, token text references tokens (token));
            """
        )
        tables = DISTRIBUTED | {
            "tokens": distribution.Distributed("tokens", "member_uid", "members"),
            "token_uses": distribution.Distributed("token_uses", "member_uid", "members"),
        }
        found = violations(await _keys(conn), tables)
    finally:
        await conn.close()

    assert found["tokens"] == ["tokens_pkey lacks member_uid"]
    assert found["token_uses"] == ["token_uses_token_fkey does not join on member_uid"]


def test_citus_setup_distributes_reference_tables_first_then_members_then_the_rest() -> None:
    sql = distribution.citus_setup_sql()
    calls = re.findall(r"select (create_\w+)\('(\w+)'(?:, '(\w+)', colocate_with => '(\w+)')?\);", sql)

    assert [table for _, table, _, _ in calls] == [*distribution.REFERENCE_TABLES, *DISTRIBUTED]
    assert calls[len(REFERENCE)] == ("create_distributed_table", "members", "member_uid", "none")
    assert ("create_distributed_table", "purchases", "member_uid", "members") in calls
    assert ("create_distributed_table", "kudos", "author_uid", "members") in calls


# --- the hot statements ------------------------------------------------------------------------


class Captured:
    """Every statement a connection sends, with its arguments (asyncpg's query logger). A statement
    run for many argument lists (``fetchmany``, whose arguments konvert passes as a list) counts
    once per list."""

    def __init__(self) -> None:
        self.statements: list[tuple[str, tuple[Any, ...]]] = []

    def __call__(self, record: Any) -> None:
        if isinstance(record.args, list):
            self.statements += [(record.query, tuple(args)) for args in record.args]
        else:
            self.statements.append((record.query, tuple(record.args or ())))


async def _captured_services(
    database_url: str, redis_url: str, program: Program, lock_members: str
) -> tuple[Any, Captured]:
    """Services on one pooled connection whose statements are captured."""
    settings: Settings = make_settings(database_url, redis_url, db_pool_min=1, db_pool_max=1, lock_members=lock_members)
    services = await composition.open_services(settings, program)
    captured = Captured()
    async with services.pool.acquire() as conn:
        conn.add_query_logger(captured)
    return services, captured


# Both ways of locking several members (KONVERT_LOCK_MEMBERS): a test marked with it gets
# one_connection or fresh_connection in each (the parameter overrides the lock_members fixture).
LOCK_MODES = pytest.mark.parametrize("lock_members", ["together", "one_by_one"])


@pytest.fixture
def lock_members() -> str:
    return "together"


@pytest.fixture
async def one_connection(
    database_url: str, redis_url: str, program: Program, redis_client: redis.Redis, lock_members: str
) -> Any:
    services, captured = await _captured_services(database_url, redis_url, program, lock_members)
    yield services, captured
    await services.close()


@pytest.fixture
async def fresh_connection(
    fresh_database_url: str, redis_url: str, program: Program, redis_client: redis.Redis, lock_members: str
) -> Any:
    """As one_connection, on a database of its own (for jobs, which work on every member)."""
    services, captured = await _captured_services(fresh_database_url, redis_url, program, lock_members)
    yield services, captured, fresh_database_url
    await services.close()


def _scans(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from _scans(child)


async def _unrouted(
    conn: asyncpg.Connection, statements: list[tuple[str, tuple[Any, ...]]]
) -> tuple[list[str], set[str]]:
    """The scans of distributed tables that do not name their rows by the table's distribution
    column, in every statement captured; and the tables checked. A scan names its rows when it
    compares the column with the statement's values, or joins it to the same column of a
    co-located table whose scan does (Citus runs such a join on those rows' shards)."""
    found, checked = [], set()
    for sql, args in statements:
        if not re.match(r"\s*(with|select|insert|update|delete)\b", sql, re.IGNORECASE):
            continue
        scans = [scan for scan in await _distributed_scans(conn, sql, args) if scan[1].table not in distribution.GAPS]
        checked |= {table.table for _, table, _ in scans}
        # alias -> (co-location group, distribution column) of the scans that name their rows
        routed = {
            node.get("Alias"): (_colocation(table, DISTRIBUTED), table.column)
            for node, table, conditions in scans
            if _names_its_rows(table.column, conditions)
        }
        for node, table, conditions in scans:
            group = _colocation(table, DISTRIBUTED)
            joined = [
                alias
                for alias, column in re.findall(rf"\b{table.column} = (\w+)\.(\w+)\b", conditions)
                if routed.get(alias) == (group, column)
            ]
            if node.get("Alias") not in routed and not joined:
                found.append(f"{node['Node Type']} on {table.table} ({conditions.strip() or 'no condition'}): {sql}")
    return found, checked


_LOCKS = re.compile(r"\bfor (update|no key update|share|key share)\b", re.IGNORECASE)


async def _locking_several_members(conn: asyncpg.Connection, statements: list[tuple[str, tuple[Any, ...]]]) -> set[str]:
    """The statements captured that lock rows (``for update``/``for share``) and scan a distributed
    table without naming one value of its distribution column (``member_uid = $1``): Citus runs a
    locking statement only when it goes to one shard (citus#4647)."""
    found = set()
    for sql, args in statements:
        if not _LOCKS.search(sql):
            continue
        for _, table, conditions in await _distributed_scans(conn, sql, args):
            if not _names_its_rows(table.column, conditions, one=True):
                found.add(_flat(sql))
    return found


async def _distributed_scans(
    conn: asyncpg.Connection, sql: str, args: tuple[Any, ...]
) -> list[tuple[dict[str, Any], distribution.Distributed, str]]:
    """Each scan of a distributed table in the statement's plan: (its node, the table, its conditions)."""
    plan = json.loads(await conn.fetchval(f"explain (format json) {sql}", *args))[0]["Plan"]
    scans = []
    for node in _scans(plan):
        table = DISTRIBUTED.get(node.get("Relation Name", ""))
        if table is not None and node.get("Node Type") != "ModifyTable":
            conditions = " ".join(str(node.get(k, "")) for k in ("Index Cond", "Recheck Cond", "Filter"))
            scans.append((node, table, conditions))
    return scans


def _names_its_rows(column: str, conditions: str, *, one: bool = False) -> bool:
    """Whether a scan's conditions compare the distribution column with the statement's values (a
    parameter, or a constant), which Citus can route by: a join on another table's column (``l.member_uid
    = c.member_uid``) does not say which shards to read. With ``one``, with one value (not ``= ANY``)."""
    value = r"(\$\d+|'[^']*'|\d+)(::[\w\[\] ]+)?"
    any_of = "" if one else r"(ANY \()?"
    return re.search(rf"\b{column}\)? = {any_of}\(?{value}", conditions) is not None


def _purchase(member_id: str) -> PurchaseIn:
    return msgspec.convert(purchase_body(member_id), PurchaseIn)


async def _hot_requests(services: Any) -> str:
    """Run the hot requests for a new member; returns the member's id."""
    member_id, author_id = f"dist-{uuid.uuid4().hex[:10]}", f"dist-{uuid.uuid4().hex[:10]}"
    purchase = _purchase(member_id)
    await post_purchase(services, purchase)
    await read_balance(services, member_id)
    async with writing(services) as book:
        member = await book.member(member_id)
        assert member is not None
        await book.credit(
            member,
            100,
            source=ADJUSTMENTS,
            code="adjust",
            cause=Cause("test", member_id),
            reason="test",
            expires_at=None,
            vests_at=datetime.now(UTC),
        )
    await redeem(services, member_id, RedemptionIn(redemption_id=f"r-{member_id}", points=10, hold=True))
    kudos = {
        "kudos_id": f"k-{member_id}",
        "source": "forum",
        "post_id": f"post-{member_id}",
        "thread_id": f"t-{member_id}",
        "author_id": author_id,
        "giver_id": member_id,
        "kind": "like",
        "occurred_at": "2026-01-01T10:00:00Z",
    }
    await give_kudos(services, msgspec.convert(kudos, KudosIn))
    # Two acceptances in a thread (the second supersedes the first), and a retraction by post.
    for n, giver in enumerate((member_id, author_id)):
        accepted = kudos | {"kudos_id": f"a{n}-{member_id}", "kind": "accepted_answer", "giver_id": giver}
        await give_kudos(services, msgspec.convert(accepted | {"occurred_at": f"2026-01-01T1{n}:00:00Z"}, KudosIn))
    await retract_kudos_by_key(
        services, RetractionIn(source="forum", post_id=f"post-{member_id}", giver_id=member_id, kind="like")
    )
    await refund_purchase(services, purchase.purchase_id, RefundIn(refund_id="rf-1", remaining=True))
    # An integration's arrivals: a delivery's duplicate check and its customer's link.
    async with services.pool.acquire() as conn:
        integration, _ = await integrations.upsert_integration(conn, f"shop-{member_id}", "shopify", None, b"{}", ["s"])
        await conn.execute(
            "insert into identity_links (integration_id, external_id, member_uid) select $1, $2, member_uid "
            "from natural_keys where key = $3 and kind = 'member'",
            integration["integration_id"],
            f"c-{member_id}",
            member_id,
        )
    arrived = await integrations.select_arrivals(
        services.pool, [(integration["integration_id"], f"d-{member_id}", f"c-{member_id}")]
    )
    assert [linked for _, linked in arrived.values()] == [member_id]
    return member_id


@LOCK_MODES
async def test_the_hot_requests_read_and_write_by_member(one_connection: Any, database_url: str) -> None:
    """A purchase (through the group commit), a balance read, a redemption hold, a kudos and a
    refund: every scan of a member's table in every statement they send filters by member. Locked
    one by one, no statement locks rows of several members."""
    services, captured = one_connection
    member_id = await _hot_requests(services)
    assert len(captured.statements) > 10  # the logger saw the requests' statements

    # Planned as konvert plans them: once per connection, for any values (konvert.db).
    conn = await asyncpg.connect(database_url, server_settings={"plan_cache_mode": "force_generic_plan"})
    try:
        unrouted, checked = await _unrouted(conn, captured.statements)
        locking_several = await _locking_several_members(conn, captured.statements)
        member = await conn.fetchrow(
            "select points_available, points_held from members where member_id = $1", member_id
        )
        kudos = await conn.fetch(
            "select status, not_counted_reason from kudos where kudos_id = any($1::text[]) order by kudos_id",
            [f"k-{member_id}", f"a0-{member_id}", f"a1-{member_id}"],
        )
    finally:
        await conn.close()

    # 20 points earned and 100 credited; 10 held for the redemption; the refund's 20 clawed back.
    assert tuple(member) == (90, 10)
    # The like retracted by post; the first acceptance superseded by the second (by the author
    # themself, so it awards nothing).
    assert [tuple(k) for k in kudos] == [("superseded", None), ("standing", "self_accept"), ("retracted", None)]

    assert unrouted == []
    if services.settings.lock_one_by_one:
        assert locking_several == set()
        assert _flat(ledger_store.LOCK_MEMBER) in {_flat(sql) for sql, _ in captured.statements}
    else:
        assert locking_several == {_flat(ledger_store.LOCK_MEMBERS)}
    assert {
        *("members", "natural_keys", "accounts", "lots", "purchases", "refunds", "redemptions", "kudos"),
        *("kudos_given", "kudos_threads", "reputation_entries", "identity_links", "deliveries"),
    } <= checked


@LOCK_MODES
async def test_the_jobs_lock_and_settle_their_members_by_name(fresh_connection: Any) -> None:
    """Vesting and expiry find due lots across members (a read without locks, in their index's
    order); every statement that locks or writes names the members it found. Locked one by one,
    no statement locks rows of several members."""
    services, captured, database_url = fresh_connection
    now = datetime.now(UTC)
    async with writing(services) as book:
        for member_id in (f"job-{uuid.uuid4().hex[:10]}", f"job-{uuid.uuid4().hex[:10]}"):
            (member,) = await book.lock(ids={member_id}, create=True)
            await book.credit(
                member, 100, source=ADJUSTMENTS, code="adjust", cause=Cause("test", member_id), reason="test",
                expires_at=now + timedelta(days=2), vests_at=now + timedelta(days=1), state="pending",
            )  # fmt: skip
    captured.statements.clear()

    assert await jobs.vest_due_lots(services, now + timedelta(days=1, hours=1)) == 2
    assert await jobs.expire_due_lots(services, now + timedelta(days=3)) == 2

    conn = await asyncpg.connect(database_url, server_settings={"plan_cache_mode": "force_generic_plan"})
    try:
        unrouted, checked = await _unrouted(conn, captured.statements)
        locking_several = await _locking_several_members(conn, captured.statements)
    finally:
        await conn.close()
    finds = {" ".join(sql.split()) for sql in (batches.FIND_DUE_PENDING_LOTS, batches.FIND_EXPIRING_LOTS)}
    assert {" ".join(found.partition("): ")[2].split()) for found in unrouted} == finds
    assert {"members", "lots", "accounts"} <= checked
    if services.settings.lock_one_by_one:
        assert locking_several == set()
    else:
        assert locking_several == {_flat(batches.LOCK_LOT_MEMBERS)}


@LOCK_MODES
async def test_the_webhook_leases_and_pruning_lock_by_member(fresh_connection: Any) -> None:
    """The deliverer's leases and the outbox's pruning find their rows across members; locked one
    by one, each statement that locks them names one member's."""
    services, captured, database_url = fresh_connection
    for member_id in (f"hook-{uuid.uuid4().hex[:10]}", f"hook-{uuid.uuid4().hex[:10]}"):
        await post_purchase(services, _purchase(member_id))  # two events each
    setup = await asyncpg.connect(database_url)
    try:
        await setup.execute(
            "insert into webhook_endpoints (endpoint_id, url, secret) values ('crm', 'http://127.0.0.1:9/', 's');"
            "insert into webhook_messages (endpoint_id, event_id, member_uid, sequence, next_attempt_at)"
            " select 'crm', event_id, member_uid, sequence, now() from outbox_events"
        )
        async with services.pool.acquire() as conn, conn.transaction():
            await events_store.sequence_events(conn, 0, 10, 0)
        captured.statements.clear()
        now = datetime.now(UTC)
        one_by_one = services.settings.lock_one_by_one
        # Each member's first message is due.
        leased = await events_store.claim_messages(services.pool, "crm", now, 10, now, one_by_one=one_by_one)
        # What a delivery does next: the events read, the outcomes written, the next messages due.
        await events_store.select_events(
            services.pool, [events_store.EventKey(m["member_uid"], m["event_id"]) for m in leased]
        )
        await events_store.record_outcomes(
            services.pool,
            [events_store.Outcome(m["member_uid"], m["message_id"], "delivered", None, 200, None, now) for m in leased],
        )
        made_due = await events_store.make_next_due(
            services.pool, [events_store.MessageKey(m["member_uid"], m["message_id"]) for m in leased], now
        )
        await setup.execute(
            "update webhook_messages set status = 'delivered';"
            "update event_cursors set position = (select max(position) from outbox_events)"
        )
        pruned = await events_store.prune_events(services.pool, now + timedelta(days=1), 10, one_by_one=one_by_one)
        await setup.execute("set plan_cache_mode = force_generic_plan")
        unrouted, _ = await _unrouted(setup, captured.statements)
        locking_several = await _locking_several_members(setup, captured.statements)
    finally:
        await setup.close()

    assert (len(leased), made_due, pruned) == (2, 0, 4)
    delivering = {
        _flat(sql) for sql in (events_store.SELECT_EVENTS, events_store.RECORD_OUTCOMES, events_store.MAKE_NEXT_DUE)
    }
    assert not {_flat(found.partition("): ")[2]) for found in unrouted} & delivering, unrouted
    if one_by_one:
        assert locking_several == set()
        finds = {_flat(events_store.FIND_DUE_MESSAGES), _flat(events_store.FIND_PRUNABLE)}
        assert {_flat(found.partition("): ")[2]) for found in unrouted} == finds
    else:
        assert locking_several == {_flat(events_store.CLAIM), _flat(events_store.PRUNE)}


def _flat(sql: str) -> str:
    return " ".join(sql.split())


async def test_the_explain_check_finds_a_scan_that_is_not_by_member(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        unrouted, _ = await _unrouted(conn, [("select count(*) from lots where state = $1", ("pending",))])
    finally:
        await conn.close()

    assert len(unrouted) == 1 and "on lots" in unrouted[0]


async def test_the_explain_check_routes_a_join_only_through_a_table_named_by_value(database_url: str) -> None:
    joins = [
        # lots joined to the values of an array: nothing says which shards hold them
        "select l.lot_id from unnest($1::bigint[]) as d (member_uid) join lots l on l.member_uid = d.member_uid",
        # lots joined to members that are named by value: the same shards
        "select l.lot_id from members m join lots l on l.member_uid = m.member_uid where m.member_uid = any($1)",
    ]
    # Joined by index lookups, as on tables of a real size (the check reads the scans' conditions).
    joined_by_index = {"enable_hashjoin": "off", "enable_mergejoin": "off", "enable_seqscan": "off"}
    conn = await asyncpg.connect(database_url, server_settings=joined_by_index)
    try:
        unrouted, _ = await _unrouted(conn, [(sql, ([1, 2],)) for sql in joins])
    finally:
        await conn.close()

    assert [found.partition("): ")[2] for found in unrouted] == [joins[0]]


def test_konvert_citus_setup_prints_the_calls(capsys: pytest.CaptureFixture[str]) -> None:
    from konvert.cli import main

    assert main(["citus-setup", "--print"]) == 0

    printed = capsys.readouterr().out
    assert printed == distribution.citus_setup_sql()
    assert "select create_distributed_table('members', 'member_uid', colocate_with => 'none');" in printed


# --- ids unique across members ------------------------------------------------------------------


async def test_an_id_another_member_claimed_is_a_conflict_that_changes_nothing(
    services: Any, client: Any, admin_headers: dict[str, str]
) -> None:
    """Purchase and redemption ids are unique across members through their claims in
    natural_keys, not a unique constraint of the member's table."""
    owner, other = f"dist-{uuid.uuid4().hex[:10]}", f"dist-{uuid.uuid4().hex[:10]}"
    purchase = _purchase(owner)
    await post_purchase(services, purchase)
    await post_purchase(services, _purchase(other))
    async with writing(services) as book:
        for member_id in (owner, other):
            member = await book.member(member_id)
            assert member is not None
            await book.credit(
                member, 50, source=ADJUSTMENTS, code="adjust", cause=Cause("test", member_id), reason="test",
                expires_at=None, vests_at=datetime.now(UTC),
            )  # fmt: skip
    redemption_id = f"r-{owner}"
    await redeem(services, owner, RedemptionIn(redemption_id=redemption_id, points=10))
    before = await read_balance(services, other)

    with pytest.raises(IdempotencyConflict):
        await post_purchase(services, msgspec.structs.replace(purchase, member_id=other))
    refused = await client.post(
        f"/v1/members/{other}/redemptions", json={"redemption_id": redemption_id, "points": 10}, headers=admin_headers
    )

    assert (refused.status_code, refused.json()["code"]) == (409, "idempotency_conflict")

    assert await read_balance(services, other) == before
    claims = await services.pool.fetch(
        "select kind, member_uid from natural_keys where key = any($1::text[]) order by kind",
        [purchase.purchase_id, redemption_id],
    )
    owner_uid = await services.pool.fetchval("select member_uid from natural_keys where key = $1", owner)
    assert [tuple(c) for c in claims] == [("purchase", owner_uid), ("redemption", owner_uid)]


async def test_a_kudos_id_another_author_holds_is_a_conflict_and_giver_rows_follow_the_kudos(services: Any) -> None:
    """A kudos id is claimed in natural_keys for the kudos' author, so it stays unique across
    authors; the giver's row in kudos_given stops standing with the kudos."""
    author, other, giver = (f"dist-{uuid.uuid4().hex[:10]}" for _ in range(3))
    kudos = {
        "kudos_id": f"k-{author}",
        "source": "forum",
        "post_id": f"post-{author}",
        "thread_id": "t-1",
        "author_id": author,
        "giver_id": giver,
        "kind": "like",
        "occurred_at": "2026-01-01T10:00:00Z",
    }
    await give_kudos(services, msgspec.convert(kudos, KudosIn))

    with pytest.raises(IdempotencyConflict):
        await give_kudos(services, msgspec.convert(kudos | {"author_id": other, "post_id": "elsewhere"}, KudosIn))
    await retract_kudos_by_key(
        services, RetractionIn(source="forum", post_id=f"post-{author}", giver_id=giver, kind="like")
    )

    claims = await services.pool.fetch(
        "select n.member_uid, m.member_id from natural_keys n join members m using (member_uid) "
        "where n.key = $1 and n.kind = 'kudos'",
        f"k-{author}",
    )
    assert [tuple(claim)[1] for claim in claims] == [author]
    given = await services.pool.fetch(
        "select g.standing, k.status from kudos_given g join kudos k on k.author_uid = g.author_uid "
        "and k.kudos_pk = g.kudos_pk where g.kudos_id = $1",
        f"k-{author}",
    )
    assert [tuple(row) for row in given] == [(False, "retracted")]
    assert await services.pool.fetchval("select count(*) from kudos where kudos_id = $1", f"k-{author}") == 1
