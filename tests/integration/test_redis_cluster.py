"""konvert on a real Redis Cluster: three masters started on free loopback ports for this module
(``tests.servers.own_redis_cluster``), removed at its end; skipped without redis-server.

The balance cache, the leaderboards, portal links and sessions, the event stream and cache
warming run against it here; the rest of the suite runs against a cluster too when
KONVERT_TEST_REDIS_URL names one (``redis+cluster://host:port,...``). The outage test stops a
master of a cluster of its own: the service answers from PostgreSQL meanwhile, and uses the
cache again once the cluster is whole; on a cluster with replicas, it follows the replica that
takes over. A Sentinel URL is tried against a master and a Sentinel started alike.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import httpx
import pytest
from prometheus_client import REGISTRY
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import SentinelConnectionPool

from konvert import auth, composition
from konvert.app import create_app
from konvert.events import publisher
from konvert.ledger.balances import warm_balances
from konvert.program import Program
from konvert.redis_client import create_redis
from konvert.reputation import leaderboard
from konvert.settings import Settings
from tests.conftest import AppClient, cached_entry, make_settings, purchase_body, serve
from tests.integration.test_reputation import Api, entries, give_likes, kudos
from tests.servers import OwnRedisCluster, own_redis_cluster, own_redis_sentinel


@pytest.fixture(scope="module")
def cluster() -> Iterator[OwnRedisCluster]:
    with own_redis_cluster() as started:
        yield started


@pytest.fixture(scope="module")
async def watcher(cluster: OwnRedisCluster) -> AsyncIterator[RedisCluster]:
    """A client of the test's own, to look at what konvert put in the cluster."""
    client = create_redis(cluster.url, timeout_seconds=5)
    assert isinstance(client, RedisCluster)
    await client.initialize()
    yield client
    await client.aclose()


@pytest.fixture(scope="module")
def cluster_settings(database_url: str, cluster: OwnRedisCluster) -> Settings:
    return make_settings(database_url, cluster.url, portal_cookie_secure=False)


@pytest.fixture(scope="module")
async def app(cluster_settings: Settings, program: Program) -> AsyncIterator[AppClient]:
    async with serve(create_app(cluster_settings, program)) as client:
        yield client


@pytest.fixture
def api(app: AppClient, admin_headers: dict[str, str], database_url: str) -> Api:
    return Api(app, admin_headers, database_url)


def served_from_redis() -> float:
    return REGISTRY.get_sample_value("konvert_balance_reads_total", {"source": "redis"}) or 0.0


async def test_the_service_uses_a_cluster_client_and_is_ready(app: AppClient) -> None:
    assert isinstance(app.app.state.services.redis, RedisCluster)

    ready = await app.get("/health/ready")

    assert ready.status_code == 200 and ready.json()["redis"]["ok"] is True


async def test_balances_of_members_on_every_master_are_cached_and_read_together(
    api: Api, app: AppClient, watcher: RedisCluster, new_id: Any
) -> None:
    cache = app.app.state.services.cache
    members = [new_id("m") for _ in range(30)]
    await asyncio.gather(
        *(api.client.post("/v1/purchases", json=purchase_body(m), headers=api.headers) for m in members)
    )
    assert len({watcher.get_node_from_key(cache.key(m)).name for m in members}) == 3  # every master has some

    first = await asyncio.gather(*(api.balance(m) for m in members))  # misses, read and filled together
    await cache.wait_filled()
    before = served_from_redis()
    again = await asyncio.gather(*(api.balance(m) for m in members))  # one lookup batch across the masters

    assert again == first and all(b["available"] + b["pending"] == 20 for b in again)
    assert served_from_redis() - before == len(members)
    for member, balance in zip(members, again, strict=True):
        version, body = await cached_entry(watcher, member, cache.key(member)) or (None, None)
        assert version == balance["version"] and body is not None and json.loads(body) == balance

    # A write's tombstone reaches the member's master: the next read shows the write.
    await api.client.post("/v1/purchases", json=purchase_body(members[0]), headers=api.headers)
    assert (await api.balance(members[0]))["lifetime_earned"] == 40


async def test_fills_land_after_the_masters_lost_their_scripts(
    api: Api, app: AppClient, watcher: RedisCluster, new_id: Any
) -> None:
    cache = app.app.state.services.cache
    members = [new_id("m") for _ in range(6)]
    for member in members:
        await api.client.post("/v1/purchases", json=purchase_body(member), headers=api.headers)
    await watcher.script_flush()  # every master's  # as a restart or a failover would

    balances = [await api.balance(m) for m in members]
    await cache.wait_filled()

    for member, balance in zip(members, balances, strict=True):
        assert (await cached_entry(watcher, member, cache.key(member)))[0] == balance["version"]


async def test_leaderboards_rank_and_rebuild_on_a_cluster(
    api: Api, app: AppClient, watcher: RedisCluster, new_id: Any
) -> None:
    source = new_id("lb")
    a, b, c = (new_id(name) for name in "abc")
    for member, likes in ((a, 2), (b, 3), (c, 2)):
        await give_likes(api, member, range(likes), source=source)
    await api.give(kudos(a, new_id("g"), source=source))

    board = await api.board(source=source)
    assert entries(board) == [(1, a, 30), (1, b, 30), (2, c, 20)]
    assert (await api.position(c, source=source))["rank"] == 2

    services = app.app.state.services
    keys = await leaderboard.keyspace_of(services.pool, services.settings.redis_key_prefix)
    await watcher.delete(keys.marker)  # as if the master holding the boards came back empty
    assert entries(await api.board(source=source)) == entries(board)  # rebuilt from PostgreSQL
    assert await watcher.get(keys.marker) is not None


async def test_a_portal_link_opens_a_session_kept_in_the_cluster(
    api: Api, app: AppClient, watcher: RedisCluster, new_id: Any
) -> None:
    member = new_id("m")
    await api.client.post("/v1/purchases", json=purchase_body(member), headers=api.headers)
    made = await api.client.post(f"/v1/members/{member}/portal-sessions", json={}, headers=api.headers)
    assert made.status_code == 201, made.text
    settings = app.app.state.services.settings

    async with httpx.AsyncClient(base_url=str(app.base_url)) as browser:
        opened = await browser.get(made.json()["url"])
        page = await browser.get("/portal")
        reused = await browser.get(made.json()["url"])  # single use: the link is gone
        session_id = browser.cookies["konvert_portal"]

    assert opened.status_code == 303 and page.status_code == 200 and reused.status_code == 401
    ttl = await watcher.ttl(f"{settings.redis_key_prefix}:portal:session:{session_id}")
    assert 0 < ttl <= settings.portal_session_idle_seconds


async def test_events_are_published_to_a_stream_on_the_cluster(
    fresh_database_url: str, cluster: OwnRedisCluster, program: Program, watcher: RedisCluster, new_id: Any
) -> None:
    settings = make_settings(fresh_database_url, cluster.url)
    conn = await asyncpg.connect(fresh_database_url)
    try:
        key, _ = await auth.insert_key(conn, "test", ["admin"])
    finally:
        await conn.close()
    member = new_id("m")
    services = await composition.open_services(settings, program)
    try:
        async with serve(create_app(settings, program)) as client:
            posted = await client.post(
                "/v1/purchases", json=purchase_body(member), headers={"Authorization": f"Bearer {key}"}
            )
            assert posted.status_code == 201, posted.text
        numbered = await publisher.sequence(services)
        published = await publisher.publish_stream(services)
    finally:
        await services.close()

    stream = await watcher.xrange(settings.events_stream_key)
    types = [fields[b"type"].decode() for _, fields in stream]
    assert numbered.numbered == published == 2
    assert types == ["purchase.recorded", "points.earned"]
    assert {json.loads(fields[b"event"])["member_id"] for _, fields in stream} == {member}
    await watcher.delete(settings.events_stream_key)


async def test_warming_caches_every_balance_on_the_cluster(
    fresh_database_url: str, cluster: OwnRedisCluster, program: Program, watcher: RedisCluster, new_id: Any
) -> None:
    settings = make_settings(fresh_database_url, cluster.url)
    services = await composition.open_services(settings, program)
    try:
        members = [new_id("m") for _ in range(12)]
        async with serve(create_app(settings, program)) as client:
            conn = await asyncpg.connect(fresh_database_url)
            try:
                key, _ = await auth.insert_key(conn, "test", ["admin"])
            finally:
                await conn.close()
            for member in members:
                posted = await client.post(
                    "/v1/purchases", json=purchase_body(member), headers={"Authorization": f"Bearer {key}"}
                )
                assert posted.status_code == 201

        warmed = await warm_balances(services, batch_size=5)
        cached = [await cached_entry(watcher, m, services.cache.key(m)) for m in members]
    finally:
        await services.close()

    assert warmed.members == len(members) and warmed.stopped_at_memory is None
    assert all(entry is not None and entry[1] for entry in cached)


async def test_while_a_master_is_down_the_service_answers_from_postgresql_and_recovers(
    database_url: str, program: Program, admin_headers: dict[str, str], new_id: Any
) -> None:
    with own_redis_cluster() as own:
        settings = make_settings(database_url, own.url, portal_cookie_secure=False)
        async with serve(create_app(settings, program)) as client:
            api = Api(client, admin_headers, database_url)
            cache = client.app.state.services.cache
            members = [new_id("m") for _ in range(12)]
            for member in members:
                await api.client.post("/v1/purchases", json=purchase_body(member), headers=api.headers)
                await api.balance(member)
            await cache.wait_filled()
            assert all(await asyncio.gather(*(cached_entry_of(own, cache, m) for m in members)))  # older ones, cached

            down = own.master_of(cache.key(members[0]))
            down.stop()  # its slots refuse connections at once; the others answer
            first = await during_the_outage(api, members[:6])
            own.wait_down()  # then every master refuses every key
            second = await during_the_outage(api, members[6:])
            assert (await client.get("/health/ready")).status_code == 503

            down.start()
            own.wait_healthy()
            after = [await api.balance(m) for m in members]
            assert all(b["lifetime_earned"] == 40 for b in after)  # never an older balance from Redis
            assert await cached_again(api, cache, own, members[0])
            assert (await client.get("/health/ready")).status_code == 200
            source = new_id("lb")
            await api.give(kudos(members[0], new_id("g"), source=source))
            assert entries(await api.board(source=source)) == [(1, members[0], 10)]

    # Writes and reads were answered from PostgreSQL; what lives in Redis alone said 503.
    assert first["purchase"] == second["purchase"] == {201} and first["balance"] == second["balance"] == {200}
    assert first["leaderboard"] <= {200, 503} and first["portal"] <= {201, 503}
    assert second["leaderboard"] == second["portal"] == {503}


async def cached_entry_of(cluster: OwnRedisCluster, cache: Any, member: str) -> tuple[int, bytes | None] | None:
    client = create_redis(cluster.url, timeout_seconds=5)
    try:
        return await cached_entry(client, member, cache.key(member))
    finally:
        await client.aclose()


async def during_the_outage(api: Api, members: list[str]) -> dict[str, set[int]]:
    """A purchase and a balance read for every member, and what lives only in Redis, with the
    balance checked against what PostgreSQL holds."""
    statuses: dict[str, set[int]] = {"purchase": set(), "balance": set(), "leaderboard": set(), "portal": set()}
    for member in members:
        posted = await api.client.post("/v1/purchases", json=purchase_body(member), headers=api.headers)
        statuses["purchase"].add(posted.status_code)
        read = await api.client.get(f"/v1/members/{member}/balance", headers=api.headers)
        statuses["balance"].add(read.status_code)
        assert read.json()["lifetime_earned"] == 40, read.text
    board = await api.client.get("/v1/leaderboards/reputation", headers=api.headers)
    link = await api.client.post(f"/v1/members/{members[0]}/portal-sessions", json={}, headers=api.headers)
    for kind, response in (("leaderboard", board), ("portal", link)):
        statuses[kind].add(response.status_code)
        if response.status_code == 503:
            assert response.headers["retry-after"] and response.json()["code"] in (
                "leaderboard_unavailable",
                "service_unavailable",
            )
    return statuses


async def cached_again(api: Api, cache: Any, cluster: OwnRedisCluster, member: str) -> bool:
    """Whether, within 15 s, the member's balance is cached and served from Redis again."""
    for _ in range(300):
        balance = await api.balance(member)
        await cache.wait_filled()
        before = served_from_redis()
        if await cached_entry_of(cluster, cache, member) == (balance["version"], None):
            pass  # a tombstone: the next read fills it
        elif await api.balance(member) == balance and served_from_redis() > before:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_a_sentinel_url_reaches_the_master_it_names(
    database_url: str, program: Program, admin_headers: dict[str, str], new_id: Any
) -> None:
    with own_redis_sentinel() as sentinel:
        settings = make_settings(database_url, sentinel.url)
        member = new_id("m")
        async with serve(create_app(settings, program)) as client:
            api = Api(client, admin_headers, database_url)
            await api.client.post("/v1/purchases", json=purchase_body(member), headers=api.headers)
            balance = await api.balance(member)
            cache = client.app.state.services.cache
            await cache.wait_filled()
            pool = client.app.state.services.redis.connection_pool
            ready = await client.get("/health/ready")
            master = create_redis(sentinel.master_url, timeout_seconds=5)
            try:
                cached = await cached_entry(master, member, cache.key(member))
            finally:
                await master.aclose()

    assert isinstance(pool, SentinelConnectionPool) and ready.status_code == 200
    assert cached is not None and cached[0] == balance["version"] and cached[1] is not None


async def test_when_a_replica_takes_over_a_stopped_master_the_service_follows_it(
    database_url: str, program: Program, admin_headers: dict[str, str], new_id: Any
) -> None:
    with own_redis_cluster(replicas=1) as own:
        settings = make_settings(database_url, own.url)
        async with serve(create_app(settings, program)) as client:
            api = Api(client, admin_headers, database_url)
            cache = client.app.state.services.cache
            members = [new_id("m") for _ in range(8)]
            for member in members:
                await api.client.post("/v1/purchases", json=purchase_body(member), headers=api.headers)
                await api.balance(member)
            await cache.wait_filled()

            key = cache.key(members[0])
            old = own.master_of(key)
            old.stop()
            during = await during_the_outage(api, members[:4])  # before or while the replica takes over
            promoted = own.wait_promoted(key)
            after = await during_the_outage(api, members[4:])

            assert promoted is not old
            assert [(await api.balance(m))["lifetime_earned"] for m in members] == [40] * len(members)
            assert await cached_again(api, cache, own, members[0])  # from the promoted replica
            assert await ready_again(client)

    assert during["purchase"] == after["purchase"] == {201} and during["balance"] == after["balance"] == {200}
    assert after["leaderboard"] == {200} and after["portal"] == {201}


async def ready_again(client: AppClient) -> bool:
    """Whether, within 15 s, /health/ready says every master answers (the client has followed the
    promotion)."""
    for _ in range(300):
        if (await client.get("/health/ready")).status_code == 200:
            return True
        await asyncio.sleep(0.05)
    return False
