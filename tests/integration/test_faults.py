"""Faults under the app: PostgreSQL stopped and its backends terminated, Redis frozen, clients
that go away mid-request. Each against a server of the test's own (tests/servers.py)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import asyncpg
import httpx
import pytest
import redis.asyncio as redis
from prometheus_client.parser import text_string_to_metric_families

from konvert import auth, composition, db
from konvert.app import create_app
from konvert.cache import BalanceCache
from konvert.events import publisher
from konvert.program import Program
from konvert.redis_client import create_redis
from tests.conftest import AppClient, cached_entry, make_settings, purchase_body, serve
from tests.servers import own_postgres, own_redis

pytestmark = pytest.mark.faults


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["code"] == "service_unavailable"
    assert int(response.headers["retry-after"]) >= 1


async def _admin_key(database_url: str) -> dict[str, str]:
    conn = await asyncpg.connect(database_url)
    try:
        key = (await auth.insert_key(conn, "operator", ["admin"]))[0]
    finally:
        await conn.close()
    return {"Authorization": f"Bearer {key}"}


async def _until_answered(client: AppClient, path: str, headers: dict[str, str]) -> httpx.Response:
    """Until the request is answered with anything but a 503 (30 s at most)."""
    async with asyncio.timeout(30):
        while (response := await client.get(path, headers=headers)).status_code == 503:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    return response


async def test_a_lost_database_answers_503_with_retry_after_and_recovers(
    redis_url: str, program: Program, caplog: pytest.LogCaptureFixture
) -> None:
    with own_postgres() as postgres:
        await db.migrate_url(postgres.url)
        admin = await _admin_key(postgres.url)
        # Keys are trusted for a while: the requests below reach their routes' database work.
        settings = make_settings(postgres.url, redis_url, auth_cache_seconds=300)
        member = f"m-{uuid.uuid4().hex[:8]}"
        async with serve(create_app(settings, program)) as client:
            assert (await client.post("/v1/purchases", json=purchase_body(member), headers=admin)).status_code == 201
            activity = f"/v1/members/{member}/activity"
            assert (await client.get(activity, headers=admin)).status_code == 200

            # Backends terminated under the pool's connections: 503 or a fresh connection, never 500.
            killer = await asyncpg.connect(postgres.url)
            await killer.execute(
                "select pg_terminate_backend(pid) from pg_stat_activity where pid <> pg_backend_pid() and backend_type = 'client backend'"
            )
            await killer.close()
            after_kill = [await client.get(activity, headers=admin) for _ in range(5)]
            assert {r.status_code for r in after_kill} <= {200, 503}
            for response in after_kill:
                if response.status_code == 503:
                    assert_unavailable(response)

            caplog.clear()
            with caplog.at_level(logging.WARNING):
                await asyncio.to_thread(postgres.stop)
                down = []
                for _ in range(10):
                    down.append(await client.get(activity, headers=admin))
                    down.append(await client.post("/v1/purchases", json=purchase_body(member), headers=admin))
                    down.append(
                        await client.get(
                            "/v1/members/unknown/balance", headers={"Authorization": "Bearer kvt_" + "x" * 43}
                        )
                    )
            for response in down:
                assert_unavailable(response)
            unavailable = [r for r in caplog.records if r.name == "konvert.errors"]
            assert unavailable, "the outage was not logged"
            # konvert's: no tracebacks, and one line per kind of failure (and logger), not one per
            # request. (asyncpg's pool retries its connections with a backoff, and says so.)
            ours = [r for r in caplog.records if r.name.startswith("konvert")]
            assert [r.getMessage() for r in ours if r.exc_info or r.levelno > logging.WARNING] == []
            kinds = {(r.name, r.__dict__.get("kind")) for r in ours}
            assert len(ours) == len(kinds) < len(down) / 2

            await asyncio.to_thread(postgres.start)
            assert (await _until_answered(client, activity, admin)).status_code == 200
            assert (await client.post("/v1/purchases", json=purchase_body(member), headers=admin)).status_code == 201


def _requests_by_status(metrics_text: str, route: str) -> dict[str, float]:
    return {
        sample.labels["status"]: sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name == "konvert_http_requests_total" and sample.labels["route"] == route
    }


async def test_a_client_that_leaves_mid_body_is_a_client_abort_not_a_failure(
    client: AppClient, admin_headers: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    before = _requests_by_status((await client.get("/metrics")).text, "/v1/purchases")
    host, port = client.base_url.host, client.base_url.port
    assert port is not None
    head = (
        f"POST /v1/purchases HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Authorization: {admin_headers['Authorization']}\r\nContent-Length: 1000\r\n\r\n"
    )

    with caplog.at_level(logging.INFO):
        _, writer = await asyncio.open_connection(host, port)
        writer.write(head.encode() + b'{"purchase_id": "half-')  # half a body, and gone
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        async with asyncio.timeout(10):  # until the server has seen the client go
            while True:
                after = _requests_by_status((await client.get("/metrics")).text, "/v1/purchases")
                if after.get("499", 0) > before.get("499", 0):
                    break
                await asyncio.sleep(0.02)

    assert after.get("499", 0) == before.get("499", 0) + 1
    assert {status: n for status, n in after.items() if status.startswith("5")} == {
        status: n for status, n in before.items() if status.startswith("5")
    }
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    logged = [r for r in caplog.records if r.name == "konvert.access" and r.__dict__.get("path") == "/v1/purchases"]
    assert [r.__dict__["status"] for r in logged][-1:] == [499]


async def test_a_body_that_does_not_arrive_in_time_is_408(
    database_url: str, redis_url: str, program: Program, admin_headers: dict[str, str]
) -> None:
    settings = make_settings(database_url, redis_url, body_read_timeout_seconds=0.5)
    async with serve(create_app(settings, program)) as client:
        host, port = client.base_url.host, client.base_url.port
        assert port is not None
        head = (
            f"POST /v1/purchases HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Authorization: {admin_headers['Authorization']}\r\nContent-Length: 1000\r\n\r\n"
        )
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(head.encode() + b'{"purchase_id": "slow-')  # and the rest never comes
            await writer.drain()
            async with asyncio.timeout(10):
                answer = await reader.readuntil(b"\r\n\r\n")
        finally:
            writer.close()

    status_line = answer.split(b"\r\n", 1)[0]
    assert status_line.split()[1] == b"408", answer
    assert b"application/problem+json" in answer.lower()


async def test_a_frozen_redis_does_not_slow_every_purchase_and_serves_nothing_stale_after(
    database_url: str, program: Program, admin_headers: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    timeout = 0.5
    with own_redis() as redis_server:
        settings = make_settings(database_url, redis_server.url, redis_timeout_seconds=timeout)
        member = f"m-{uuid.uuid4().hex[:8]}"
        balance_path = f"/v1/members/{member}/balance"
        async with serve(create_app(settings, program)) as client:
            cache = client.app.state.services.cache
            watcher = redis.Redis.from_url(redis_server.url)
            try:
                first = await client.post("/v1/purchases", json=purchase_body(member), headers=admin_headers)
                assert first.status_code == 201, first.text
                points = first.json()["points"]
                assert (await client.get(balance_path, headers=admin_headers)).status_code == 200
                await cache.wait_filled()
                assert await cached_entry(watcher, member, cache.key(member)) is not None  # an older balance to come

                redis_server.freeze()
                caplog.clear()
                with caplog.at_level(logging.WARNING):
                    started = time.monotonic()
                    for _ in range(10):  # one after another: each its own batch and invalidation
                        posted = await client.post("/v1/purchases", json=purchase_body(member), headers=admin_headers)
                        assert posted.status_code == 201, posted.text
                    elapsed = time.monotonic() - started
                    during = await client.get(balance_path, headers=admin_headers)
                # Without the breaker each purchase would wait for Redis's timeout.
                assert elapsed < 10 * timeout / 2, f"10 purchases took {elapsed:.1f}s with Redis frozen"
                assert during.json()["lifetime_earned"] == 11 * points
                warned = [r for r in caplog.records if r.getMessage() == "redis unavailable"]
                assert 1 <= len(warned) <= 3

                redis_server.thaw()
                # Redis still holds the balance from before: it is never served again.
                for _ in range(20):
                    after = await client.get(balance_path, headers=admin_headers)
                    assert after.json()["lifetime_earned"] == 11 * points
                version = after.json()["version"]
                async with asyncio.timeout(15):  # until the missed invalidations and a fill landed
                    while (await cached_entry(watcher, member, cache.key(member))) != (version, after.content):
                        await client.get(balance_path, headers=admin_headers)
                        await cache.wait_filled()
                        await asyncio.sleep(0.05)
                assert (await client.get(balance_path, headers=admin_headers)).json() == after.json()
            finally:
                redis_server.thaw()
                await watcher.aclose()


async def test_a_process_that_missed_invalidations_sends_them_once_redis_returns_without_traffic() -> None:
    """Another process (here: another cache) that missed nothing may serve what Redis holds as soon
    as it answers again; the process that missed the invalidations sends them by itself, without
    waiting for a request of its own."""
    with own_redis() as redis_server:
        settings = make_settings("postgresql://unused", redis_server.url, redis_timeout_seconds=0.2)
        missing, other = (
            BalanceCache.for_settings(create_redis(settings.redis_url, settings.redis_timeout_seconds), settings)
            for _ in range(2)
        )
        try:
            await asyncio.to_thread(redis_server.stop)
            await missing.invalidate_many([("m-1", 2)])  # version 2 committed; Redis is away
            await asyncio.to_thread(redis_server.start)
            # A reader of the other process that read version 1 before the write fills it now.
            assert await other.put_many([("m-1", 1, b'{"available": 1}')])
            async with asyncio.timeout(5):
                while await other.get("m-1") is not None:  # noqa: ASYNC110 - Redis's state, polled
                    await asyncio.sleep(0.02)
            assert await other.get("m-1") is None
        finally:
            await missing.aclose()
            await other.aclose()


async def test_publishing_without_redis_logs_a_line_now_and_then_not_a_traceback_per_round(
    program: Program, caplog: pytest.LogCaptureFixture
) -> None:
    # A PostgreSQL of its own: publishers wait for every older transaction on the server, and
    # the shared one's (other tests') could keep the events out of this test's rounds.
    with own_postgres() as postgres, own_redis() as redis_server:
        await db.migrate_url(postgres.url)
        settings = make_settings(postgres.url, redis_server.url)
        admin = await _admin_key(postgres.url)
        async with serve(create_app(settings, program)) as client:  # a purchase: events to publish
            posted = await client.post("/v1/purchases", json=purchase_body("m-events"), headers=admin)
            assert posted.status_code == 201, posted.text
        services = await composition.open_services(settings, program)
        rounds = publisher.Publisher(services)
        try:
            await asyncio.to_thread(redis_server.stop)
            with caplog.at_level(logging.WARNING, logger="konvert"):
                for _ in range(20):  # a round every poll interval while Redis is away
                    await rounds.round()
        finally:
            await rounds.aclose()
            await services.close()

    said = [r for r in caplog.records if r.name == "konvert.events"]
    assert said, "the outage was not logged"
    assert [r.getMessage() for r in said if r.exc_info or r.levelno > logging.WARNING] == []
    assert len(said) == len({r.__dict__.get("kind") for r in said})  # one line per kind of failure
