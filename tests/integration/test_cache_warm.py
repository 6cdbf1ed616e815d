"""``konvert cache warm``: every member's balance cached ahead of reads, never over a newer one."""

from __future__ import annotations

import asyncpg
import pytest
import redis.asyncio as redis
from litestar.testing import AsyncTestClient

from konvert import auth
from konvert.app import create_app
from konvert.cache import BalanceCache, balance_key
from konvert.fastredis import MultiplexedRedis, RedisUnavailable
from konvert.ledger.service import warm_balances
from konvert.services import Services
from tests.conftest import make_settings
from tests.integration.test_foundation import konvert_env, run_konvert
from tests.integration.test_purchases import purchase


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
    services = await Services.open(settings, program)
    try:
        async with AsyncTestClient(create_app(settings, program)) as client:
            for member in members:
                response = await client.post(
                    "/v1/purchases", json=purchase(member, new_id("p")), headers=headers
                )
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
    await redis_client.delete(*(balance_key(member) for member in read))

    warmed = await warm_balances(services, batch_size=2)  # two pages and a short one

    assert warmed == (len(read), None)  # the erased member is not cached
    for member, body in read.items():
        assert await redis_client.hget(balance_key(member), "b") == body
    assert await services.balances.get(next(iter(read))) == read[next(iter(read))]


async def test_warming_never_puts_back_an_older_balance(ledger, redis_client):
    services, read = ledger
    member = next(iter(read))
    await redis_client.delete(*(balance_key(m) for m in read))
    version = await services.pool.fetchval("select version from members where member_id = $1", member)
    # A write committed version + 1 after warming read the member: its tombstone is in Redis.
    await services.balances.invalidate(member, version + 1)

    await warm_balances(services)

    assert await redis_client.hgetall(balance_key(member)) == {b"v": str(version + 1).encode()}
    assert await services.balances.get(member) is None  # read from PostgreSQL, then cached afresh


@pytest.mark.parametrize("fast", [True, False], ids=["multiplexed", "redis-py pipeline"])
async def test_many_balances_go_to_redis_in_one_call_either_way(redis_url, redis_client, new_id, fast):
    reader = MultiplexedRedis(redis_url, timeout_seconds=1.0) if fast else None
    cache = BalanceCache(redis_client, 60, reader)
    newer, older = new_id("n"), new_id("o")
    many = [(new_id("m"), 1, b"{}") for _ in range(40)]
    try:
        await cache.put_many([(newer, 5, b'{"v": 5}')])
        await redis_client.script_flush()  # as after a Redis restart: the script is loaded again
        assert await cache.put_many([(newer, 4, b'{"v": 4}'), (older, 1, b'{"v": 1}'), *many])
    finally:
        cache.close()
    assert await redis_client.hget(balance_key(newer), "b") == b'{"v": 5}'
    assert await redis_client.hget(balance_key(older), "b") == b'{"v": 1}'
    # Cached together, they expire at different times: between half the TTL and the TTL.
    lifetimes = [await redis_client.ttl(balance_key(member)) for member, _, _ in many]
    assert all(29 <= t <= 60 for t in lifetimes) and len(set(lifetimes)) > 5, lifetimes


async def test_warming_stops_before_redis_runs_out_of_memory(ledger, redis_client):
    services, read = ledger
    await redis_client.delete(*(balance_key(member) for member in read))
    before = (await redis_client.config_get("maxmemory"))["maxmemory"]
    used = (await redis_client.info("memory"))["used_memory"]
    await redis_client.config_set("maxmemory", used * 2)
    try:
        warmed = await warm_balances(services, memory_share_max=0.4)
    finally:
        await redis_client.config_set("maxmemory", before)

    assert warmed.members == 0 and warmed.stopped_at_memory is not None
    assert warmed.stopped_at_memory[1] == used * 2
    assert not await redis_client.exists(*(balance_key(member) for member in read))


async def test_warming_says_so_when_redis_does_not_take_the_balances(ledger):
    services, _ = ledger
    nowhere = "redis://127.0.0.1:1/0"
    pooled = redis.Redis.from_url(nowhere, socket_connect_timeout=0.5)
    dead = BalanceCache(pooled, 60, MultiplexedRedis(nowhere, timeout_seconds=0.5))
    services.balances, live = dead, services.balances
    try:
        with pytest.raises(RedisUnavailable):
            await warm_balances(services)
    finally:
        services.balances = live
        dead.close()
        await pooled.aclose()


async def test_warming_takes_the_pooled_client_when_the_multiplexed_connection_fails(ledger, redis_client):
    services, read = ledger
    await redis_client.delete(*(balance_key(member) for member in read))
    half_dead = BalanceCache(redis_client, 60, MultiplexedRedis("redis://127.0.0.1:1/0", timeout_seconds=0.5))
    services.balances, live = half_dead, services.balances
    try:
        warmed = await warm_balances(services)
    finally:
        services.balances = live
        half_dead.close()

    assert warmed.members >= len(read)
    assert all([await redis_client.hexists(balance_key(member), "b") for member in read])


async def test_the_cli_warms_the_cache(ledger, fresh_database_url, redis_url, redis_client):
    _, read = ledger
    await redis_client.delete(*(balance_key(member) for member in read))

    result = run_konvert(
        "cache", "warm", env=konvert_env(KONVERT_DATABASE_URL=fresh_database_url, KONVERT_REDIS_URL=redis_url)
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"balances cached: {len(read)} members in ")
    for member, body in read.items():
        assert await redis_client.hget(balance_key(member), "b") == body


@pytest.mark.parametrize("size", ["0", "10001", "-5", "many"])
def test_the_cli_refuses_a_batch_size_out_of_bounds(size):
    result = run_konvert("cache", "warm", "--batch-size", size, env=konvert_env())
    assert result.returncode == 2
    assert "--batch-size: must be a whole number from 1 to 10000" in result.stderr


async def test_the_cli_says_when_it_stopped_for_redis_memory(
    ledger, fresh_database_url, redis_url, redis_client
):
    before = (await redis_client.config_get("maxmemory"))["maxmemory"]
    used = (await redis_client.info("memory"))["used_memory"]
    await redis_client.config_set("maxmemory", int(used * 1.1))  # past 80%: no page goes in
    try:
        result = run_konvert(
            "cache",
            "warm",
            env=konvert_env(KONVERT_DATABASE_URL=fresh_database_url, KONVERT_REDIS_URL=redis_url),
        )
    finally:
        await redis_client.config_set("maxmemory", before)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.startswith("balances cached: 0 members in ")
    assert "stopped early: Redis uses" in result.stdout and "raise maxmemory" in result.stdout
