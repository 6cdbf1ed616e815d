"""A real ``konvert serve`` (two workers) under a small concurrent load while its own PostgreSQL
and Redis are frozen, stopped and restarted and a worker is killed.

Writers post purchases and, until one is answered 201, post the same one again (a retry is an
idempotent replay, so an answer lost with a connection costs nothing); readers read balances.
Throughout: no answer but 2xx or 503 (each 503 ``service_unavailable`` with ``Retry-After``), no
balance older than a purchase answered before the read began. Afterwards: every accepted
purchase is in the database exactly once with exactly one earn transfer, ``konvert audit``
passes, and the service recovered without a restart.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import asyncpg
import httpx
import pytest

from konvert import auth, db
from tests.conftest import TEST_PROGRAM, purchase_body
from tests.e2e.test_serve import READY_TIMEOUT_SECONDS, Server, konvert_env, konvert_serve
from tests.servers import OwnPostgres, OwnRedis, descendants, own_postgres, own_redis

pytestmark = pytest.mark.faults

WRITERS = 4
READERS = 2
MEMBERS = 6
POINTS_PER_PURCHASE = 20  # purchase_body under the tests' program: one book for 10.00 EUR, books x2
# How long each fault lasts, and how long the load runs between faults.
FAULT_SECONDS = 2.0
CALM_SECONDS = 1.0
# After Redis returns, how long another process's missed invalidations may take to land (the
# background replay's interval, and a replay that was waiting for the frozen Redis's timeout).
REPLAY_WINDOW_SECONDS = 1.0
# A write still unanswered this long after its fault ended is a service that did not recover.
RECOVERY_SECONDS = 30.0


@dataclasses.dataclass
class Load:
    """What the load saw: answers by kind, purchases accepted per member, and the problems."""

    client: httpx.AsyncClient
    headers: dict[str, str]
    members: list[str]
    answers: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    accepted: dict[str, set[str]] = dataclasses.field(default_factory=lambda: collections.defaultdict(set))
    problems: list[str] = dataclasses.field(default_factory=list)
    stopping: bool = False
    # Until then (monotonic), a balance read may miss what a process could not invalidate while
    # Redis was away: konvert.cache's replay window.
    stale_allowed_until: float = 0.0

    def check(self, what: str, response: httpx.Response) -> None:
        self.answers[f"{what} {response.status_code}"] += 1
        if response.status_code == 503:
            body = response.json()
            if body.get("code") != "service_unavailable" or int(response.headers.get("retry-after", "0")) < 1:
                self.problems.append(f"{what}: a 503 without Retry-After or code: {response.headers} {body}")
        elif not 200 <= response.status_code < 300:
            self.problems.append(f"{what}: {response.status_code} {response.text[:300]}")

    async def write(self, n: int) -> None:
        """Purchases, each posted until it is answered 201."""
        while not self.stopping:
            member = self.members[n % len(self.members)]
            body = purchase_body(member, f"fl-{n}-{uuid.uuid4().hex[:10]}")
            while True:
                try:
                    response = await self.client.post("/v1/purchases", json=body, headers=self.headers)
                except httpx.TransportError as exc:  # a killed worker's connections, a timeout
                    self.answers[f"purchase {type(exc).__name__}"] += 1
                    await asyncio.sleep(0.05)
                    continue
                self.check("purchase", response)
                if response.status_code == 201:
                    self.accepted[member].add(body["purchase_id"])
                    break
                await asyncio.sleep(0.05)  # a test's Retry-After: the service said it recovers by itself
            n += WRITERS

    async def read(self, n: int) -> None:
        """Balances, each at least as new as every purchase accepted before the read began."""
        while not self.stopping:
            member = self.members[n % len(self.members)]
            n += 1
            at_least = len(self.accepted[member]) * POINTS_PER_PURCHASE
            started = time.monotonic()
            try:
                response = await self.client.get(f"/v1/members/{member}/balance", headers=self.headers)
            except httpx.TransportError as exc:
                self.answers[f"balance {type(exc).__name__}"] += 1
                await asyncio.sleep(0.05)
                continue
            self.check("balance", response)
            if response.status_code == 200 and (seen := response.json()["lifetime_earned"]) < at_least:
                if started < self.stale_allowed_until:
                    self.answers["balance stale in the replay window"] += 1
                else:
                    self.problems.append(f"a stale balance of {member}: {seen} < {at_least}")
            await asyncio.sleep(0.01)

    def accepted_count(self) -> int:
        return sum(len(ids) for ids in self.accepted.values())


@contextlib.asynccontextmanager
async def running(load: Load) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(load.write(n)) for n in range(WRITERS)]
    tasks += [asyncio.create_task(load.read(n)) for n in range(READERS)]
    try:
        yield
    finally:
        load.stopping = True
        async with asyncio.timeout(RECOVERY_SECONDS):  # each writer finishes the purchase it holds
            await asyncio.gather(*tasks)


async def progress(load: Load, seconds: float) -> None:
    """Let the load run ``seconds``, then until it has had a purchase accepted since: the service
    works again."""
    await asyncio.sleep(seconds)
    before = load.accepted_count()
    async with asyncio.timeout(RECOVERY_SECONDS):
        while load.accepted_count() <= before + WRITERS:  # noqa: ASYNC110 - progress, not an event
            await asyncio.sleep(0.05)


async def during(load: Load, fault: Fault) -> None:
    """One fault: start it (in a thread: these are blocking process calls), let the load run
    into it, end it, and wait until purchases are accepted again."""
    if fault.redis:
        load.stale_allowed_until = float("inf")
    await asyncio.to_thread(fault.start)
    await asyncio.sleep(FAULT_SECONDS)
    await asyncio.to_thread(fault.end)
    if fault.redis:
        load.stale_allowed_until = time.monotonic() + REPLAY_WINDOW_SECONDS
    await progress(load, CALM_SECONDS)


class Fault(NamedTuple):
    name: str
    start: Callable[[], None]
    end: Callable[[], None]
    redis: bool = False


def kill_a_worker(server: Server) -> None:
    workers = live_workers(server)
    assert len(workers) == 2, f"konvert serve --workers 2 has workers {workers}"
    os.kill(workers[0], signal.SIGKILL)


def live_workers(server: Server) -> list[int]:
    """The worker processes (not multiprocessing's resource tracker, nor a killed one not yet reaped)."""
    workers = []
    for pid in descendants(server.process.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if cmdline and b"resource_tracker" not in cmdline:  # a zombie's is empty
            workers.append(pid)
    return workers


@contextlib.contextmanager
def served(tmp_path: Path, postgres: OwnPostgres, redis_server: OwnRedis) -> Iterator[Server]:
    program_file = tmp_path / "program.toml"
    program_file.write_text(TEST_PROGRAM)  # no tiers or campaigns: every purchase earns the same
    env = konvert_env(
        KONVERT_PROGRAM_FILE=str(program_file),
        KONVERT_DATABASE_URL=postgres.url,
        KONVERT_REDIS_URL=redis_server.url,
        KONVERT_DB_STATEMENT_TIMEOUT_SECONDS="1",
        KONVERT_DB_CONNECT_TIMEOUT_SECONDS="1",
        KONVERT_REDIS_TIMEOUT_SECONDS="0.2",
        KONVERT_JOBS_INTERVAL_SECONDS="0",
        KONVERT_LOG_LEVEL="warning",
    )
    with konvert_serve(tmp_path, env, "--workers", "2") as server:
        server.wait_ready(READY_TIMEOUT_SECONDS)
        yield server


async def admin_key(database_url: str) -> str:
    conn = await asyncpg.connect(database_url)
    try:
        return (await auth.insert_key(conn, "faults", ["admin"]))[0]
    finally:
        await conn.close()


async def recorded(database_url: str, prefix: str) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """Purchase rows and earn transfers per purchase id starting with ``prefix``."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("select purchase_id from purchases where purchase_id like $1", f"{prefix}%")
        earns = await conn.fetch(
            "select cause_ref from transfers where code = 'earn' and cause_type = 'purchase' and cause_ref like $1",
            f"webshop/{prefix}%",
        )
    finally:
        await conn.close()
    return (
        collections.Counter(r["purchase_id"] for r in rows),
        collections.Counter(r["cause_ref"].removeprefix("webshop/") for r in earns),
    )


def konvert_audit(database_url: str, redis_url: str) -> subprocess.CompletedProcess[str]:
    env = konvert_env(KONVERT_DATABASE_URL=database_url, KONVERT_REDIS_URL=redis_url)
    return subprocess.run(
        [sys.executable, "-m", "konvert", "audit"], env=env, capture_output=True, text=True, timeout=120, check=False
    )


async def test_every_accepted_purchase_survives_frozen_stopped_and_restarted_servers_once(tmp_path: Path) -> None:
    with own_postgres() as postgres, own_redis() as redis_server:
        await db.migrate_url(postgres.url)
        key = await admin_key(postgres.url)
        members = [f"fl-m{i}-{uuid.uuid4().hex[:6]}" for i in range(MEMBERS)]
        with served(tmp_path, postgres, redis_server) as server:
            async with httpx.AsyncClient(base_url=server.base_url, timeout=RECOVERY_SECONDS) as client:
                load = Load(client, {"Authorization": f"Bearer {key}"}, members)
                faults = [
                    Fault("redis frozen", redis_server.freeze, redis_server.thaw, redis=True),
                    Fault("redis stopped", redis_server.stop, redis_server.start, redis=True),
                    Fault("postgres frozen", postgres.freeze, postgres.thaw),
                    Fault("postgres restarted", postgres.stop, postgres.start),
                    Fault("a worker killed", lambda: kill_a_worker(server), lambda: None),
                ]
                for member in members:  # every member exists before the readers ask
                    body = purchase_body(member, f"fl-first-{member}")
                    assert (await client.post("/v1/purchases", json=body, headers=load.headers)).status_code == 201
                    load.accepted[member].add(body["purchase_id"])
                accepted_before: dict[str, int] = {}
                async with running(load):
                    await progress(load, CALM_SECONDS)
                    for fault in faults:
                        accepted_before[fault.name] = load.accepted_count()
                        await during(load, fault)
                        assert load.problems == [], (fault.name, "\n".join(load.problems))

                final = {
                    m: (await client.get(f"/v1/members/{m}/balance", headers=load.headers)).json() for m in members
                }
            assert server.process.poll() is None, "konvert serve stopped"
            assert len(live_workers(server)) == 2, "the killed worker was not replaced"

        rows, earns = await recorded(postgres.url, "fl-")
        audit = konvert_audit(postgres.url, redis_server.url)

    accepted = set().union(*load.accepted.values())
    assert load.problems == []
    assert load.answers["purchase 503"] > 0, f"no fault reached the writes: {load.answers}"
    assert set(rows) == accepted and set(rows.values()) == {1}, "lost, doubled or unexpected purchases"
    assert earns == rows, "a purchase without exactly one earn transfer"
    assert {m: b["lifetime_earned"] for m, b in final.items()} == {
        m: len(load.accepted[m]) * POINTS_PER_PURCHASE for m in members
    }
    assert audit.returncode == 0, audit.stdout + audit.stderr
    print(f"faults under load: {accepted_before} accepted before each fault; answers {dict(load.answers)}")
