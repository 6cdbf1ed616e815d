"""The near cache: balances kept in a process's memory, retired by Redis pushes and write stamps.

Real Redis throughout. Two BalanceCaches sharing a stamps file stand for two workers of one
``konvert serve``.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis.asyncio as redis

from konvert.cache import BalanceCache, NearCache, balance_key
from konvert.fastredis import MultiplexedRedis
from konvert.services import Services
from konvert.stamps import Stamps
from tests.conftest import make_settings

PUSH_WAIT_SECONDS = 2.0

MakeCache = Callable[[], BalanceCache]


@pytest.fixture
async def make_cache(redis_url: str, redis_client: redis.Redis, tmp_path: Path) -> AsyncIterator[MakeCache]:
    """Caches ("workers") sharing one stamps file, each with its own tracking connection."""
    stamps_file = str(tmp_path / "stamps")
    made: list[BalanceCache] = []

    def make() -> BalanceCache:
        near = NearCache(Stamps(stamps_file), seconds=30, max_entries=100)
        cache = BalanceCache(redis_client, 60, MultiplexedRedis(redis_url, 1.0, near.on_push), near)
        made.append(cache)
        return cache

    yield make
    for cache in made:
        cache.close()


def member() -> str:
    return f"near-{uuid.uuid4().hex[:12]}"


async def hget_calls(redis_client: redis.Redis) -> int:
    return (await redis_client.info("commandstats")).get("cmdstat_hget", {}).get("calls", 0)


async def filled(cache: BalanceCache, member_id: str) -> bytes | None:
    """Read until the read is kept in memory (the first read also connects, and is not kept)."""
    for _ in range(3):
        body = await cache.get(member_id)
        if cache.near is not None and cache.near.get(member_id) is not None:
            return body
    raise AssertionError("the near cache never kept the balance")


async def until(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + PUSH_WAIT_SECONDS
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return condition()


async def test_a_repeated_read_is_served_from_memory(
    make_cache: MakeCache, redis_client: redis.Redis
) -> None:
    cache, member_id = make_cache(), member()
    await cache.put(member_id, 1, b'{"available":1}')
    assert await filled(cache, member_id) == b'{"available":1}'

    before = await hget_calls(redis_client)
    for _ in range(5):
        assert await cache.get(member_id) == b'{"available":1}'
    assert await hget_calls(redis_client) == before


async def test_a_change_by_any_redis_client_retires_the_entry(
    make_cache: MakeCache, redis_client: redis.Redis
) -> None:
    cache, member_id = make_cache(), member()
    await cache.put(member_id, 1, b'{"available":1}')
    await filled(cache, member_id)
    assert cache.near is not None

    # Another host's write, or `konvert jobs` in a process without the stamps file: only
    # Redis's push tells this process.
    await redis_client.hset(balance_key(member_id), "b", b'{"available":2}')

    assert await until(lambda: cache.near is not None and len(cache.near) == 0)
    assert await cache.get(member_id) == b'{"available":2}'


async def test_a_write_on_another_worker_retires_the_entry_before_its_push_arrives(
    make_cache: MakeCache,
) -> None:
    reader, writer, member_id = make_cache(), make_cache(), member()
    await writer.put(member_id, 1, b'{"available":1}')
    await filled(reader, member_id)
    assert reader._reader is not None
    # The reader's push is late (it has not been handled yet when the client reads again).
    reader._reader._on_push = lambda push: None

    await writer.invalidate(member_id, 2)  # what every write does after its commit

    # The writer's response has left; the client now reads on the other worker.
    assert reader.near is not None and reader.near.get(member_id) is None
    assert await reader.get(member_id) is None  # the tombstone: the reader goes to PostgreSQL


async def test_a_push_during_a_read_keeps_that_read_out_of_memory(make_cache: MakeCache) -> None:
    cache, member_id = make_cache(), member()
    await cache.put(member_id, 1, b'{"available":1}')
    await cache.get(f"{member_id}-other")  # connected and tracking; this member not read yet
    assert cache._reader is not None and cache.near is not None

    reading = asyncio.ensure_future(cache.get(member_id))
    await asyncio.sleep(0)  # the read is sent and waits for its reply
    cache._reader._pushed([b"invalidate", [balance_key(member_id).encode()]])

    assert await reading == b'{"available":1}'
    assert cache.near.get(member_id) is None


async def test_a_lost_connection_stops_serving_from_memory(
    make_cache: MakeCache, redis_client: redis.Redis
) -> None:
    cache, member_id = make_cache(), member()
    await cache.put(member_id, 1, b'{"available":1}')
    await filled(cache, member_id)
    assert cache._reader is not None
    client_id = await cache._reader.execute(b"CLIENT", b"ID")

    await redis_client.client_kill_filter(_id=client_id)
    assert await until(
        lambda: cache._reader is not None and not cache._reader.tracking_since(cache._reader.epoch)
    )
    # Redis no longer tracks anything for this process: this change pushes nothing.
    await redis_client.hset(balance_key(member_id), "b", b'{"available":2}')

    assert await cache.get(member_id) == b'{"available":2}'


async def test_a_flush_clears_the_near_cache(make_cache: MakeCache, redis_client: redis.Redis) -> None:
    cache, member_id = make_cache(), member()
    await cache.put(member_id, 1, b'{"available":1}')
    await filled(cache, member_id)

    await redis_client.flushdb()

    assert await until(lambda: cache.near is not None and len(cache.near) == 0)
    assert await cache.get(member_id) is None


def test_stamps_are_shared_between_processes(tmp_path: Path) -> None:
    path = str(tmp_path / "stamps")
    stamps = Stamps(path)
    before = stamps.read("m-1"), stamps.read("m-2")

    bump = f"from konvert.stamps import Stamps; Stamps({path!r}).bump('m-1')"
    subprocess.run([sys.executable, "-c", bump], check=True, timeout=30)

    assert stamps.read("m-1") != before[0]
    assert stamps.read("m-2") == before[1]
    stamps.close()


def test_the_oldest_entry_goes_first_when_the_near_cache_is_full(tmp_path: Path) -> None:
    near = NearCache(Stamps(), seconds=30, max_entries=2)
    for name in ("a", "b", "c"):
        near.put(name, name.encode(), 0, 0)
    assert len(near) == 2
    assert set(near._entries) == {"b", "c"}


async def test_the_near_cache_can_be_turned_off(database_url: str, redis_url: str, program) -> None:
    services = await Services.open(make_settings(database_url, redis_url, near_cache_seconds=0), program)
    try:
        assert services.balances.near is None
    finally:
        await services.close()


async def test_balances_read_over_http_are_kept_and_a_write_replaces_them(
    client, admin_headers, new_id, post
):
    services = client.app.state.services
    assert services.balances.near is not None
    member_id = new_id("near")
    purchase = {
        "purchase_id": new_id("p"),
        "member_id": member_id,
        "partner": "webshop",
        "currency": "EUR",
        "occurred_at": "2026-01-01T10:00:00Z",
        "lines": [{"line_id": "1", "sku": "A", "category": "books", "quantity": 1, "unit_price": 1000}],
    }
    assert (await post("/v1/purchases", purchase)).status_code == 201
    path = f"/v1/members/{member_id}/balance"
    for _ in range(3):  # PostgreSQL, then Redis (kept), then memory
        first = (await client.get(path, headers=admin_headers)).json()
    assert services.balances.near.get(member_id) is not None

    purchase["purchase_id"] = new_id("p")
    assert (await post("/v1/purchases", purchase)).status_code == 201

    assert services.balances.near.get(member_id) is None
    second = (await client.get(path, headers=admin_headers)).json()
    assert second["lifetime_earned"] > first["lifetime_earned"]


async def test_a_redis_that_refuses_tracking_gets_a_plain_connection(
    redis_url: str, redis_client: redis.Redis
) -> None:
    user = f"konvert-no-tracking-{uuid.uuid4().hex[:8]}"
    try:
        # Everything but CLIENT (so no CLIENT TRACKING), as a cautious ACL might have it.
        await redis_client.execute_command("ACL", "SETUSER", user, "on", ">secret", "~*", "+@all", "-client")
    except redis.ResponseError as exc:  # an embedded Redis without ACLs
        pytest.skip(f"this Redis has no ACLs: {exc}")
    try:
        url = redis_url.replace("redis://", f"redis://{user}:secret@", 1)
        near = NearCache(Stamps(), seconds=30, max_entries=10)
        cache = BalanceCache(redis_client, 60, MultiplexedRedis(url, 1.0, near.on_push), near)
        member_id = member()
        await cache.put(member_id, 1, b'{"available":1}')
        for _ in range(3):
            assert await cache.get(member_id) == b'{"available":1}'
        assert cache._reader is not None and not cache._reader.tracking
        assert len(near) == 0  # nothing kept that no push could retire
        cache.close()
    finally:
        await redis_client.execute_command("ACL", "DELUSER", user)
