"""Redis: the versioned balance cache. PostgreSQL decides; Redis only remembers.

Every Redis call here is best-effort: when Redis is down or slow the caller falls back to
PostgreSQL, and a short circuit breaker keeps a dead Redis from adding its timeout to every
request. Nothing here ever authorises a spend.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from urllib.parse import urlsplit

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from konvert.fastredis import SUPPORTED_SCHEMES, MultiplexedRedis, RedisUnavailable
from konvert.observability import TALLY
from konvert.settings import Settings

log = logging.getLogger("konvert.cache")

# Sets the cached balance only if its version is newer than what is cached. A write that has
# committed version N but not computed the full balance stores a tombstone (version N, no body),
# so that a slower reader holding version N-1 cannot put an older balance back.
_PUT_IF_NEWER = """
local current = tonumber(redis.call('HGET', KEYS[1], 'v') or '-1')
local version = tonumber(ARGV[1])
if current > version then return 0 end
if current == version and (ARGV[2] == '' or redis.call('HEXISTS', KEYS[1], 'b') == 1) then return 0 end
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], 'b')
  redis.call('HSET', KEYS[1], 'v', ARGV[1])
else
  redis.call('HSET', KEYS[1], 'v', ARGV[1], 'b', ARGV[2])
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""

_PUT_IF_NEWER_SHA = hashlib.sha1(_PUT_IF_NEWER.encode()).hexdigest()

# A tombstone at this version keeps every balance out of its key until it expires (a power of two:
# exact in the Lua script's numbers, which are doubles).
ABOVE_ANY_VERSION = 2**62
_BREAKER_OPEN_SECONDS = 1.0


def create_redis(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_timeout_seconds,
        socket_connect_timeout=settings.redis_timeout_seconds,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


def balance_key(member_id: str) -> str:
    # The hash tag keeps all of one member's keys in one Redis Cluster slot.
    return f"kv:{{m:{member_id}}}:balance"


class BalanceCache:
    def __init__(self, client: redis.Redis, ttl_seconds: int, reader: MultiplexedRedis | None = None) -> None:
        self._redis = client
        # Reads take the multiplexed connection when the URL allows it (see konvert.fastredis).
        self._reader = reader
        self._ttl_seconds = ttl_seconds
        self._put_if_newer = client.register_script(_PUT_IF_NEWER)
        self._skip_until = 0.0
        self._filling: set[asyncio.Task[bool]] = set()

    @classmethod
    def for_settings(cls, client: redis.Redis, settings: Settings) -> BalanceCache:
        fast = urlsplit(settings.redis_url).scheme in SUPPORTED_SCHEMES
        reader = MultiplexedRedis(settings.redis_url, settings.redis_timeout_seconds) if fast else None
        return cls(client, settings.balance_cache_ttl_seconds, reader)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()

    async def _eval_put(self, key: str, version: int, body: bytes, ttl_seconds: int | None = None) -> None:
        assert self._reader is not None
        args = (key, version, body, ttl_seconds or self._ttl_seconds)
        try:
            await self._reader.execute(b"EVALSHA", _PUT_IF_NEWER_SHA, b"1", *args)
        except RedisUnavailable as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            # Redis forgot the script (restart, SCRIPT FLUSH): EVAL loads it again.
            await self._reader.execute(b"EVAL", _PUT_IF_NEWER, b"1", *args)

    def _available(self) -> bool:
        return time.monotonic() >= self._skip_until

    def _failed(self, action: str, exc: Exception) -> None:
        self._skip_until = time.monotonic() + _BREAKER_OPEN_SECONDS
        log.warning("redis unavailable", extra={"action": action, "error": repr(exc)})

    async def get(self, member_id: str) -> bytes | None:
        """The cached balance body, or None (not cached, a tombstone, or Redis unavailable)."""
        if not self._available():
            return None
        try:
            if self._reader is not None:
                body = await self._reader.execute(b"HGET", balance_key(member_id), b"b")
            else:
                body = await self._redis.hget(balance_key(member_id), "b")
        except (RedisError, OSError) as exc:  # RedisUnavailable is an OSError
            self._failed("get", exc)
            return None
        if body is not None:
            TALLY.balance_read("redis")
        return body

    async def put(self, member_id: str, version: int, body: bytes) -> None:
        await self._put(member_id, version, body)

    async def put_many(self, balances: list[tuple[str, int, bytes]]) -> bool:
        """``put`` for many (member id, version, body) in one round trip: each is cached unless a
        newer one is. False (and the breaker opened) when Redis could not be asked.

        Balances cached together would expire together, and their reads would all go to
        PostgreSQL at once again: each lives a random time between half the TTL and the TTL."""
        if not self._available():
            return False
        ttl = self._ttl_seconds
        entries = [(balance_key(m), v, b, random.randint(max(1, ttl // 2), ttl)) for m, v, b in balances]
        try:
            if self._reader is not None:  # the multiplexed connection sends them in one write
                await asyncio.gather(*(self._eval_put(*entry) for entry in entries))
            else:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for key, version, body, lifetime in entries:
                        await self._put_if_newer(keys=[key], args=[version, body, lifetime], client=pipe)
                    await pipe.execute()
        except (RedisError, OSError) as exc:
            self._failed("put", exc)
            return False
        return True

    def put_soon(self, member_id: str, version: int, body: bytes) -> None:
        """``put`` without waiting for it: a read that missed answers first and fills the cache
        after. Safe in any order: the fill only lands if nothing newer is cached meanwhile.
        A fill that cannot reach Redis is dropped (the breaker logs it)."""
        task = asyncio.get_running_loop().create_task(self._put(member_id, version, body))
        self._filling.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._filling.discard)

    async def wait_filled(self) -> None:
        """Until the fills started so far have landed or been dropped (before closing)."""
        while self._filling:
            await asyncio.gather(*self._filling, return_exceptions=True)

    async def invalidate(self, member_id: str, version: int) -> None:
        """After a committed write at ``version``: no reader may serve an older balance.

        The tombstone (version, no body) is what keeps a slower reader from caching an older
        balance; a plain DEL would not. When Redis cannot be reached at all, entries expire
        after ``balance_cache_ttl_seconds``, which bounds how long an older balance can live.
        """
        # Unlike reads, invalidations do not skip Redis while the breaker is open: a missed
        # tombstone would let an older balance be served. Batches run them concurrently, so a
        # silent Redis costs a write one timeout, not one per member.
        await self._put(member_id, version, b"", even_if_breaker_open=True)

    async def _put(self, member_id: str, version: int, body: bytes, *, even_if_breaker_open: bool = False) -> bool:
        if not (even_if_breaker_open or self._available()):
            return False
        key = balance_key(member_id)
        try:
            if self._reader is not None:
                try:
                    await self._eval_put(key, version, body)
                    return True
                except RedisUnavailable as exc:
                    if "no reply within" in str(exc):
                        raise  # Redis is slow, not the connection broken: do not wait twice
                    # The multiplexed connection may be what failed: try the pooled client once.
            await self._put_if_newer(keys=[key], args=[version, body, self._ttl_seconds])
            return True
        except (RedisError, OSError) as exc:
            self._failed("put", exc)
            return False
