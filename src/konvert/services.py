"""What a running konvert process holds: settings, program, the pool, Redis and their helpers.

Built once per process by the app's lifespan (or by the CLI for jobs and audits) and handed to
use cases explicitly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import redis.asyncio as redis
from litestar.di import NamedDependency

from konvert.auth import KeyVerifier
from konvert.batching import BatchedLookups, GroupCommit
from konvert.cache import BalanceCache, create_redis
from konvert.db import create_pool
from konvert.ledger import store
from konvert.program import Program
from konvert.settings import Settings


@dataclass
class SystemAccounts:
    """Ids of the program's system accounts, created on first use and then remembered.

    An account is created on a connection of its own that commits at once, never inside the
    caller's transaction: if that transaction rolled back, a remembered id would point at a row
    that does not exist. ``warm`` creates the known ones at start-up.
    """

    database_url: str
    _ids: dict[tuple[str, str], int] = field(default_factory=dict)

    async def id(self, conn: asyncpg.Connection, asset: str, name: str) -> int:
        key = (asset, name)
        account_id = self._ids.get(key)
        if account_id is None:
            account_id = await conn.fetchval(
                "select account_id from accounts where member_uid is null and asset = $1 and name = $2", asset, name
            )
            if account_id is None:
                account_id = await self._create(asset, name)
            self._ids[key] = account_id
        return account_id

    async def _create(self, asset: str, name: str) -> int:
        own = await asyncpg.connect(self.database_url)
        try:
            return await store.ensure_system_account(own, asset, name)
        finally:
            await own.close()

    async def warm(self, pool: asyncpg.Pool, names: list[tuple[str, str]]) -> None:
        async with pool.acquire() as conn:
            for asset, name in names:
                await self.id(conn, asset, name)


@dataclass
class Services:
    settings: Settings
    program: Program
    pool: asyncpg.Pool
    redis: redis.Redis
    keys: KeyVerifier
    balances: BalanceCache
    accounts: SystemAccounts
    # Balance reads that miss the cache, batched: concurrent misses share one query.
    balance_reads: BatchedLookups[str, asyncpg.Record]
    # The one source of "now" for use cases and jobs, so that tests can move time.
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    # Group commit for purchase postings, started by the app (None: each posting commits alone).
    purchases: GroupCommit[Any, Any] | None = None

    @classmethod
    async def open(cls, settings: Settings, program: Program) -> Services:
        pool = await create_pool(settings)
        client = create_redis(settings)
        return cls(
            settings=settings,
            program=program,
            pool=pool,
            redis=client,
            keys=KeyVerifier(pool, settings.auth_cache_seconds),
            balances=BalanceCache.for_settings(client, settings),
            accounts=SystemAccounts(settings.database_url),
            balance_reads=_balance_reads(pool, settings, program.points.expiring_lots_shown),
        )

    async def close(self) -> None:
        await self.balance_reads.wait_idle()
        await self.balances.wait_filled()
        self.balances.close()
        await self.redis.aclose()
        await self.pool.close()


def _balance_reads(pool: asyncpg.Pool, settings: Settings, expiring_lots: int) -> BatchedLookups[str, asyncpg.Record]:
    async def many(member_ids: list[str]) -> dict[str, asyncpg.Record]:
        return {row["member_id"]: row for row in await store.select_balances(pool, member_ids, expiring_lots)}

    async def one(member_id: str) -> asyncpg.Record | None:
        return await store.select_balance(pool, member_id, expiring_lots)

    return BatchedLookups(
        many,
        one,
        batch_size_max=settings.read_batch_size_max,
        batches_in_flight_max=settings.read_batches_in_flight_max,
    )


# How route handlers ask for the Services (injected by name from create_app's dependencies).
Svc = NamedDependency[Services]
