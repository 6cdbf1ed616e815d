"""``konvert cache warm``: every member's balance cached ahead of reads, never over a newer one."""

from __future__ import annotations

import os
import subprocess
import sys

import asyncpg
import pytest
import redis.asyncio as redis
from litestar.testing import AsyncTestClient

from konvert import auth, composition, errors
from konvert.app import create_app
from konvert.cache import BalanceCache
from konvert.ledger.balances import balance_body, warm_balances
from tests.conftest import REDIS_PREFIX, cached_entry, make_settings
from tests.integration.test_purchases import purchase


def warm_with_cli(*args: str, database_url: str = "", redis_url: str = "") -> subprocess.CompletedProcess[str]:
    """``konvert cache warm ...`` in a process of its own, with the settings (and so the Redis
    keys) the tests' services use on that database; without KONVERT_* variables otherwise."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("KONVERT_")}
    if database_url:
        env |= {
            "KONVERT_DATABASE_URL": database_url,
            "KONVERT_REDIS_URL": redis_url,
            "KONVERT_REDIS_KEY_PREFIX": make_settings(database_url, redis_url).redis_key_prefix,
        }
    return subprocess.run(
        [sys.executable, "-m", "konvert", "cache", "warm", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
async def ledger(fresh_database_url, redis_url, program, new_id):
    """A database of its own with five members who bought something (one of them erased since),
    the balance bodies a read returned for the others, and Services on it."""
    settings = make_settings(fresh_database_url, redis_url)
    conn = await asyncpg.connect(fresh_database_url)
    key, _ = await auth.insert_key(conn, "warm", ["admin"])
    await conn.close()
    headers = {"Authorization": f"Bearer {key}"}
    members = [new_id("w") for _ in range(5)]
    services = await composition.open_services(settings, program)
    try:
        async with AsyncTestClient(create_app(settings, program)) as client:
            for member in members:
                response = await client.post("/v1/purchases", json=purchase(member, new_id("p")), headers=headers)
                assert response.status_code == 201, response.text
            assert (await client.delete(f"/v1/members/{members[-1]}", headers=headers)).status_code in (
                200,
                204,
            )
            read = {}
            for member in members[:-1]:
                response = await client.get(f"/v1/members/{member}/balance", headers=headers)
                assert response.status_code == 200, response.text
                read[member] = response.content
        yield services, read
    finally:
        await services.close()


async def test_warming_caches_every_member_s_balance_as_a_read_would(ledger, redis_client):
    services, read = ledger
    await redis_client.delete(*(services.cache.key(member) for member in read))

    warmed = await warm_balances(services, batch_size=2)  # two pages and a short one

    assert warmed == (len(read), None)  # the erased member is not cached
    for member, body in read.items():
        assert await services.cache.get(member) == body
    assert await services.cache.get(next(iter(read))) == read[next(iter(read))]


async def test_warming_never_puts_back_an_older_balance(ledger, redis_client):
    services, read = ledger
    member = next(iter(read))
    await redis_client.delete(*(services.cache.key(m) for m in read))
    version = await services.pool.fetchval("select version from members where member_id = $1", member)
    # A write committed version + 1 after warming read the member: its tombstone is in Redis.
    await services.cache.invalidate_many([(member, version + 1)])

    await warm_balances(services)

    assert await cached_entry(redis_client, member, services.cache.key(member)) == (version + 1, None)
    assert await services.cache.get(member) is None  # read from PostgreSQL, then cached afresh


async def test_many_balances_go_to_redis_in_one_call(redis_client, new_id):
    cache = BalanceCache(redis_client, 60, f"{REDIS_PREFIX}-many")
    newer, older = new_id("n"), new_id("o")
    many = [(new_id("m"), 1, b"{}") for _ in range(40)]
    try:
        await cache.put_many([(newer, 5, b'{"v": 5}')])
        await redis_client.script_flush()  # as after a Redis restart: the script is loaded again
        assert await cache.put_many([(newer, 4, b'{"v": 4}'), (older, 1, b'{"v": 1}'), *many])
    finally:
        await cache.aclose()
    assert await cached_entry(redis_client, newer, cache.key(newer)) == (5, b'{"v": 5}')
    assert await cached_entry(redis_client, older, cache.key(older)) == (1, b'{"v": 1}')
    # Cached together, they expire at different times: between half the TTL and the TTL.
    lifetimes = [await redis_client.ttl(cache.key(member)) for member, _, _ in many]
    assert all(29 <= t <= 60 for t in lifetimes) and len(set(lifetimes)) > 5, lifetimes


async def test_warming_stops_before_redis_runs_out_of_memory(ledger, redis_client):
    services, read = ledger
    await redis_client.delete(*(services.cache.key(member) for member in read))
    before = (await redis_client.config_get("maxmemory"))["maxmemory"]
    used = (await redis_client.info("memory"))["used_memory"]
    await redis_client.config_set("maxmemory", used * 2)
    try:
        warmed = await warm_balances(services, memory_share_max=0.4)
    finally:
        await redis_client.config_set("maxmemory", before)

    assert warmed.members == 0 and warmed.stopped_at_memory is not None
    assert warmed.stopped_at_memory[1] == used * 2
    assert not await redis_client.exists(*(services.cache.key(member) for member in read))


async def test_warming_says_so_when_redis_does_not_take_the_balances(ledger):
    services, _ = ledger
    nowhere = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    dead = BalanceCache(nowhere, 60, services.settings.redis_key_prefix)
    services.cache, live = dead, services.cache
    try:
        with pytest.raises(errors.ServiceUnavailable):
            await warm_balances(services)
    finally:
        services.cache = live
        await dead.aclose()
        await nowhere.aclose()


async def test_after_a_redis_error_the_breaker_skips_reads_and_warming_but_not_invalidations(
    ledger, redis_client, monkeypatch
):
    services, read = ledger
    monkeypatch.setattr("konvert.cache._BREAKER_OPEN_SECONDS", 60.0)  # open for the whole test, however slow
    cached, broken = list(read)[:2]
    await redis_client.delete(*(services.cache.key(member) for member in read))
    await warm_balances(services)
    cache = BalanceCache(redis_client, 60, services.settings.redis_key_prefix)
    services.cache, live = cache, services.cache
    try:
        assert await cache.get(cached) == read[cached]  # Redis answers: the breaker is closed
        # A key Redis refuses to treat as a balance (WRONGTYPE): caching one fails, the breaker opens.
        await redis_client.delete(cache.key(broken))
        await redis_client.hset(cache.key(broken), "not", "a string")
        assert not await cache.put_many([(broken, 1, b"{}")])

        # For a moment every read goes to PostgreSQL instead, and warming says it did not cache.
        assert await cache.get(cached) is None
        with pytest.raises(errors.ServiceUnavailable):
            await warm_balances(services)
        # A tombstone still reaches Redis: no reader may put an older balance back meanwhile.
        version = await services.pool.fetchval("select version from members where member_id = $1", cached)
        await cache.invalidate_many([(cached, version + 1)])
        assert await cached_entry(redis_client, cached, cache.key(cached)) == (version + 1, None)
    finally:
        services.cache = live
        await cache.aclose()


async def test_the_cli_warms_the_cache(ledger, fresh_database_url, redis_url, redis_client):
    services, read = ledger
    await redis_client.delete(*(services.cache.key(member) for member in read))

    result = warm_with_cli(database_url=fresh_database_url, redis_url=redis_url)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"balances cached: {len(read)} members in ")
    for member, body in read.items():
        assert await services.cache.get(member) == body


@pytest.mark.parametrize("size", ["0", "10001", "-5", "many"])
def test_the_cli_refuses_a_batch_size_out_of_bounds(size):
    result = warm_with_cli("--batch-size", size)
    assert result.returncode == 2
    assert "--batch-size: must be a whole number from 1 to 10000" in result.stderr


async def test_the_cli_says_when_it_stopped_for_redis_memory(ledger, fresh_database_url, redis_url, redis_client):
    before = (await redis_client.config_get("maxmemory"))["maxmemory"]
    used = (await redis_client.info("memory"))["used_memory"]
    await redis_client.config_set("maxmemory", int(used * 1.1))  # past 80%: no page goes in
    try:
        result = warm_with_cli(database_url=fresh_database_url, redis_url=redis_url)
    finally:
        await redis_client.config_set("maxmemory", before)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.startswith("balances cached: 0 members in ")
    assert "stopped early: Redis uses" in result.stdout and "raise maxmemory" in result.stdout


async def test_an_entry_konvert_did_not_write_is_a_miss_not_an_error(ledger, redis_client):
    services, read = ledger
    member = next(iter(read))
    await redis_client.set(services.cache.key(member), b"not|a balance konvert wrote")

    assert await services.cache.get(member) is None
    assert await balance_body(services, member) == read[member]  # from PostgreSQL, then cached
    await services.cache.wait_filled()
    assert await services.cache.get(member) == read[member]
