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
from konvert.batching import GroupCommit
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
        )

    async def close(self) -> None:
        self.balances.close()
        await self.redis.aclose()
        await self.pool.close()


# How route handlers ask for the Services (injected by name from create_app's dependencies).
Svc = NamedDependency[Services]
