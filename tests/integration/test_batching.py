"""Group commit against real PostgreSQL: shared commits, isolated failures, durable results."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from konvert.batching import GroupCommit
from konvert.errors import Unprocessable


@pytest.fixture
async def table(database_url):
    """A scratch table: value must be positive, so a negative item is a database error."""
    name = f"gc_{uuid.uuid4().hex[:10]}"
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    await pool.execute(f"create table {name} (item int primary key, value int not null check (value > 0), txid bigint)")
    yield pool, name
    await pool.execute(f"drop table {name}")
    await pool.close()


def committer(pool, table, committed_seen):
    async def write(conn, item):
        item_id, value = item
        if value == 0:
            raise Unprocessable("zero is refused before writing")
        return await conn.fetchval(
            f"insert into {table} (item, value, txid) values ($1, $2, txid_current()) returning item", item_id, value
        )

    async def after_commit(item_id):
        # Visible from another connection: the commit happened before the result is handed out.
        committed_seen.append(await pool.fetchval(f"select count(*) from {table} where item = $1", item_id))

    return GroupCommit(pool, write, after_commit, sort_key=lambda item: item[0], batch_size_max=50, batches_in_flight_max=1)


async def test_concurrent_writes_share_commits(table):
    pool, name = table
    seen: list[int] = []
    group = committer(pool, name, seen)
    group.start()
    try:
        results = await asyncio.gather(*(group.submit((i, 1)) for i in range(200)))
    finally:
        await group.stop()

    assert sorted(results) == list(range(200))
    assert seen == [1] * 200
    transactions = await pool.fetchval(f"select count(distinct txid) from {name}")
    assert transactions == group.batches_written < 200


async def test_a_refused_item_fails_alone_and_its_neighbours_commit(table):
    pool, name = table
    group = committer(pool, name, [])
    group.start()
    try:
        results = await asyncio.gather(*(group.submit((i, 0 if i == 7 else 1)) for i in range(20)), return_exceptions=True)
    finally:
        await group.stop()

    assert isinstance(results[7], Unprocessable)
    assert [r for i, r in enumerate(results) if i != 7] == [i for i in range(20) if i != 7]
    assert await pool.fetchval(f"select count(*) from {name}") == 19


async def test_a_database_error_fails_only_its_own_item(table):
    pool, name = table
    group = committer(pool, name, [])
    group.start()
    try:
        results = await asyncio.gather(*(group.submit((i, -1 if i == 3 else 1)) for i in range(20)), return_exceptions=True)
    finally:
        await group.stop()

    assert isinstance(results[3], asyncpg.CheckViolationError)
    assert all(r == i for i, r in enumerate(results) if i != 3)
    assert await pool.fetchval(f"select count(*) from {name} where item <> 3") == 19


async def test_stop_writes_what_is_queued(table):
    pool, name = table
    group = committer(pool, name, [])
    group.start()
    pending = [asyncio.ensure_future(group.submit((i, 1))) for i in range(30)]
    await asyncio.sleep(0)
    await group.stop()
    assert sorted(await asyncio.gather(*pending)) == list(range(30))
    assert await pool.fetchval(f"select count(*) from {name}") == 30
