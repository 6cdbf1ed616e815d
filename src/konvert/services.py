"""What a running konvert process holds: settings, program, the pool, Redis, the balance cache,
and the per-process state its features keep.

Built once per process (by the app's lifespan, a CLI command, or a test) with ``Services.open``
and handed to use cases explicitly. It knows no feature: a feature keeps its own per-process
state (a batcher, a circuit breaker) in a class of its own, which ``shared`` creates on first use.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar, runtime_checkable

import asyncpg
from litestar.di import NamedDependency

from konvert.auth import KeyVerifier
from konvert.cache import BalanceCache
from konvert.db import create_pool
from konvert.ledger.book import Book, Member
from konvert.program import Program
from konvert.redis_client import RedisClient, create_redis
from konvert.redis_client import close as close_redis
from konvert.settings import Settings

T = TypeVar("T")


@runtime_checkable
class Closing(Protocol):
    """Per-process state that must finish its work before the process stops."""

    async def aclose(self) -> None: ...


# Run inside the erasure transaction, after the member's row is locked and before it is renamed:
# (the transaction's book, the member, the pseudonym). A feature clears or rewrites its personal
# data there; an exception rolls the whole erasure back.
ErasureStep = Callable[[Book, Member, str], Awaitable[None]]
# Run after the erasure committed (and on every repeated erasure, with pseudonym None, so that a
# retry finishes a clean-up that failed): (services, old member id, pseudonym). Idempotent.
AfterErasure = Callable[["Services", str, "str | None"], Awaitable[None]]


@dataclass(frozen=True)
class Erasure:
    """How each feature takes part in erasing a member (registered by konvert.composition)."""

    steps: tuple[ErasureStep, ...] = ()
    after: tuple[AfterErasure, ...] = ()


@dataclass
class Services:
    settings: Settings
    program: Program
    pool: asyncpg.Pool
    redis: RedisClient
    cache: BalanceCache
    keys: KeyVerifier
    erasure: Erasure = Erasure()
    # The one source of "now" for use cases and jobs, so that tests can move time.
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    _shared: dict[Any, Any] = field(default_factory=dict, repr=False)

    @classmethod
    async def open(cls, settings: Settings, program: Program, erasure: Erasure = Erasure()) -> Services:
        pool = await create_pool(settings)
        client = create_redis(settings.redis_url, settings.redis_timeout_seconds)
        return cls(
            settings=settings,
            program=program,
            pool=pool,
            redis=client,
            cache=BalanceCache.for_settings(client, settings),
            keys=KeyVerifier(pool, settings.auth_cache_seconds, settings.auth_failures_per_minute),
            erasure=erasure,
        )

    def shared(self, kind: Callable[[Services], T]) -> T:
        """This process's one ``kind(self)``: state a feature keeps per process, created on first use."""
        instance = self._shared.get(kind)
        if instance is None:
            instance = self._shared[kind] = kind(self)
        return instance

    async def close(self) -> None:
        """Let per-process state finish (batches in flight, cache fills), then close the clients."""
        for instance in list(self._shared.values()):
            if isinstance(instance, Closing):
                await instance.aclose()
        await self.cache.aclose()
        await close_redis(self.redis)
        await self.pool.close()


# How route handlers ask for the Services (injected by name; konvert.app provides them).
Svc = NamedDependency[Services]
