"""``konvert audit`` passes on a ledger that went through everything, and fails when corrupted."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from konvert import auth, composition
from konvert.app import create_app
from konvert.composition import AUDIT_CHECKS
from konvert.events import publisher
from konvert.ledger.audit import run_audit
from konvert.ledger.jobs import vest_due_lots
from tests.conftest import make_settings, serve, spend_points
from tests.integration.test_purchases import (
    RECENT,
    held_before_commit,
    line,
    posting,
    purchase,
    until_waiting_for_locks,
)

# Purchase ids posted for two members each (a client's mistake): two requests at once, and one
# request while another process holds the id uncommitted (the service's batch then finds it
# taken, commits nothing, and tries the posting again alone).
SHARED_AT_ONCE, SHARED_RACED = "shared-1", "shared-2"


@pytest.fixture
async def busy_ledger(fresh_database_url, redis_url, program):
    """A database of its own after purchases, replays, vesting, refunds, spending, a debt,
    purchase ids posted for two members (one recorded, the other refused), and the first few
    events numbered."""
    settings = make_settings(fresh_database_url, redis_url, events_batch_size=5)
    conn = await asyncpg.connect(fresh_database_url)
    key, _ = await auth.insert_key(conn, "audit", ["admin"])
    await conn.close()
    headers = {"Authorization": f"Bearer {key}"}
    services = await composition.open_services(settings, program)
    try:
        async with serve(create_app(settings, program)) as client:  # real HTTP, on this loop

            async def post(path, body):
                response = await client.post(path, json=body, headers=headers)
                assert response.status_code == 201, response.text

            for member in ("ann", "bob", "cem"):
                await post(
                    "/v1/purchases", purchase(member, f"{member}-1", line("a", 3, 1000, "books"), line("b", 1, 999))
                )
                await post(
                    "/v1/purchases", purchase(member, f"{member}-1", line("a", 3, 1000, "books"), line("b", 1, 999))
                )
                await post("/v1/purchases", purchase(member, f"{member}-2", occurred_at=RECENT))
            await vest_due_lots(services, now=datetime.now(UTC) + timedelta(days=20))
            await post("/v1/purchases", purchase("ann", "ann-3", occurred_at=RECENT))
            await post("/v1/purchases/ann-1/refunds", {"refund_id": "r1", "lines": [{"line_id": "a", "quantity": 1}]})
            await post("/v1/purchases/ann-3/refunds", {"refund_id": "r1", "amount": 3333})
            await spend_points(services, "bob", 150, code="redeem", cause_type="test", cause_ref="b", reason="t")
            await post("/v1/purchases/bob-1/refunds", {"refund_id": "r1", "amount": 3999})  # bob goes negative
            await post("/v1/purchases", purchase("bob", "bob-3"))  # and repays the debt

            at_once = await asyncio.gather(
                *(
                    client.post("/v1/purchases", json=purchase(member, SHARED_AT_ONCE), headers=headers)
                    for member in ("dan", "eve")
                )
            )
            assert sorted(r.status_code for r in at_once) == [201, 409], [r.text for r in at_once]
            assert {r.json()["code"] for r in at_once if r.status_code == 409} == {"idempotency_conflict"}
            async with held_before_commit(services, [posting(services, purchase("fay", SHARED_RACED))]):
                raced = asyncio.ensure_future(
                    client.post("/v1/purchases", json=purchase("gus", SHARED_RACED), headers=headers)
                )
                await until_waiting_for_locks(services.pool, 1)
            raced_response = await raced
            assert (raced_response.status_code, raced_response.json()["code"]) == (409, "idempotency_conflict")
        assert (await publisher.sequence(services)).numbered == 5
        yield fresh_database_url
    finally:
        await services.close()


async def _audit(database_url: str):
    conn = await asyncpg.connect(database_url)
    try:
        return await run_audit(conn, AUDIT_CHECKS)
    finally:
        await conn.close()


def _cli_audit(database_url: str, redis_url: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KONVERT_")}
    env |= {"KONVERT_DATABASE_URL": database_url, "KONVERT_REDIS_URL": redis_url}
    return subprocess.run(
        [sys.executable, "-m", "konvert", "audit"], env=env, capture_output=True, text=True, timeout=60
    )


async def test_audit_passes_after_every_kind_of_write(busy_ledger, redis_url):
    assert await _audit(busy_ledger) == []
    result = _cli_audit(busy_ledger, redis_url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "audit passed" in result.stdout


async def test_a_purchase_id_posted_for_two_members_is_recorded_once(busy_ledger):
    conn = await asyncpg.connect(busy_ledger)
    try:
        recorded = await conn.fetch(
            "select p.purchase_id, m.member_id, p.transfer_id from purchases p join members m using (member_uid)"
            " where p.purchase_id = any($1::text[]) order by p.purchase_id",
            [SHARED_AT_ONCE, SHARED_RACED],
        )
        earns = await conn.fetchval(
            "select count(*) from transfers where code = 'earn' and cause_ref = any($1::text[])",
            [f"webshop/{SHARED_AT_ONCE}", f"webshop/{SHARED_RACED}"],
        )
        members = await conn.fetchval(
            "select array_agg(member_id order by member_id) from members"
            " where member_id in ('dan', 'eve', 'fay', 'gus')"
        )
    finally:
        await conn.close()

    # Each id once, for one member; the refused postings created no member and wrote nothing.
    assert [r["purchase_id"] for r in recorded] == [SHARED_AT_ONCE, SHARED_RACED]
    assert recorded[1]["member_id"] == "fay"
    assert recorded[0]["member_id"] in members and len(members) == 2 and "fay" in members
    assert earns == 2 and all(r["transfer_id"] is not None for r in recorded)


CORRUPTIONS = {
    # The busy ledger's first five events are numbered, 1 to 5, ann's first.
    "7 each event's position is given once": "update outbox_events set position = 1 where position = 2",
    "7 no event's position is past the sequencer's": "update outbox_events set position = 1005 where position = 5",
    "7 each member's events are numbered in their order": "update outbox_events set position = null where position = 1",
    "2 stored balances equal transfers": "update members set points_available = points_available + 7 where member_id = 'ann'",
    "2 stored balances equal lots": "update lots set remaining = remaining - 1 where lot_id = (select min(lot_id) from lots)",
    "2 lots equal their entries": "update lots set remaining = remaining - 1, amount = amount where lot_id = (select max(lot_id) from lots)",
    "4 every purchase earned exactly once": (
        "insert into transfers (member_uid, asset, debit_account_id, credit_account_id, amount, code, cause_type, cause_ref)"
        " select member_uid, asset, debit_account_id, credit_account_id, amount, code, cause_type, cause_ref"
        " from transfers where code = 'earn' limit 1"
    ),
    "3 available points never below zero except by refund debt": "update members set points_available = -5 where member_id = 'cem'",
    "5 reputation is never spent": (
        "insert into transfers (member_uid, asset, debit_account_id, credit_account_id, amount, code, cause_type, cause_ref)"
        " select m.member_uid, 'reputation', a.account_id,"
        " (select account_id from system_accounts where asset = 'points' limit 1), 5, 'redeem', 'test', 'x'"
        " from members m join accounts a on a.member_uid = m.member_uid and a.asset = 'reputation' where m.member_id = 'cem'"
    ),
}


@pytest.mark.parametrize("invariant", sorted(CORRUPTIONS))
async def test_audit_names_the_broken_invariant(busy_ledger, redis_url, invariant):
    conn = await asyncpg.connect(busy_ledger)
    try:
        await conn.execute(CORRUPTIONS[invariant])
    finally:
        await conn.close()

    violations = await _audit(busy_ledger)

    assert invariant in {v.invariant for v in violations}, violations
    result = _cli_audit(busy_ledger, redis_url)
    assert result.returncode == 1
    assert f"VIOLATION {invariant}" in result.stdout


# Transfers, lots and purchases have no foreign keys (sql/0011): the audit finds a reference
# that points nowhere, whichever of the three holds it.
DANGLING = {
    "transfer debit account": (
        "update transfers set debit_account_id = -1 where transfer_id = (select min(transfer_id) from transfers)",
        "transfer ",
        "no account -1",
    ),
    "transfer lot": (
        "update transfers set lot_id = -4 where transfer_id = (select min(transfer_id) from transfers)",
        "transfer ",
        "no lot -4",
    ),
    "transfer reversed": (
        "update transfers set reverses_transfer_id = -5 where transfer_id = (select max(transfer_id) from transfers)",
        "transfer ",
        "no transfer -5",
    ),
    "lot member": (
        # A lot without entries: the entries' foreign key (member_uid, lot_id) keeps the others.
        "update lots set member_uid = -2 where lot_id = (select min(lot_id) from lots l"
        " where not exists (select 1 from lot_entries e where e.lot_id = l.lot_id))",
        "lot ",
        "no member -2",
    ),
    "purchase transfer": (
        "update purchases set transfer_id = -3 where purchase_pk = (select min(purchase_pk) from purchases)",
        "purchase ",
        "no transfer -3",
    ),
    "purchase member": (
        # A purchase without refunds: the refunds' foreign key (member_uid, purchase_pk) keeps the others.
        "update purchases set member_uid = -6 where purchase_pk = (select min(purchase_pk) from purchases p"
        " where not exists (select 1 from refunds r where r.purchase_pk = p.purchase_pk))",
        "purchase ",
        "no member -6",
    ),
}


@pytest.mark.parametrize("reference", sorted(DANGLING))
async def test_audit_finds_a_reference_that_points_nowhere(busy_ledger, reference):
    corruption, holder, detail = DANGLING[reference]
    conn = await asyncpg.connect(busy_ledger)
    try:
        await conn.execute(corruption)
    finally:
        await conn.close()

    found = [v.detail for v in await _audit(busy_ledger) if v.invariant == "6 every reference resolves"]

    assert len(found) == 1 and found[0].startswith(holder) and detail in found[0], found


@pytest.mark.parametrize("table", ["members", "accounts", "lots", "transfers", "purchases"])
async def test_nothing_a_ledger_row_refers_to_is_ever_deleted(fresh_database_url, table):
    conn = await asyncpg.connect(fresh_database_url)
    try:
        await conn.execute("insert into members (member_id) values ('kept')")  # something to delete
        before = await conn.fetchval(f"select count(*) from {table}")
        for statement in (f"delete from {table}", f"truncate {table} cascade"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="never deleted"):
                await conn.execute(statement)
        assert await conn.fetchval(f"select count(*) from {table}") == before
    finally:
        await conn.close()
