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
from collections.abc import Iterable
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

# A cache entry to put: (key, version, body, seconds to live); an empty body is a tombstone.
_Entry = tuple[str, int, bytes, int]


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

    async def _eval_put_many(self, entries: list[_Entry]) -> None:
        """Put-if-newer for every (key, version, body, ttl) on the multiplexed connection, sent in
        one write; raises RedisUnavailable if any of them could not be applied."""
        assert self._reader is not None
        replies = await self._reader.execute_many(
            [(b"EVALSHA", _PUT_IF_NEWER_SHA, b"1", *entry) for entry in entries]
        )
        forgotten = []
        for entry, reply in zip(entries, replies, strict=True):
            if isinstance(reply, RedisUnavailable):
                if not str(reply).startswith("NOSCRIPT"):
                    raise reply
                forgotten.append(entry)
        if forgotten:
            # Redis forgot the script (restart, SCRIPT FLUSH): EVAL loads it again.
            replies = await self._reader.execute_many(
                [(b"EVAL", _PUT_IF_NEWER, b"1", *entry) for entry in forgotten]
            )
            for reply in replies:
                if isinstance(reply, RedisUnavailable):
                    raise reply

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
        ttl = self._ttl_seconds
        return await self._put_many(
            [(balance_key(m), v, b, random.randint(max(1, ttl // 2), ttl)) for m, v, b in balances]
        )

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
        await self.invalidate_many([(member_id, version)])

    async def invalidate_many(self, changes: Iterable[tuple[str, int]]) -> None:
        """``invalidate`` for the (member id, version) pairs a batch of writes committed, in one
        round trip (a member's latest version only)."""
        latest: dict[str, int] = {}
        for member_id, version in changes:
            if version > latest.get(member_id, -1):
                latest[member_id] = version
        if not latest:
            return
        # Unlike reads, invalidations do not skip Redis while the breaker is open: a missed
        # tombstone would let an older balance be served. A silent Redis costs the whole batch
        # one timeout.
        ttl = self._ttl_seconds
        entries = [(balance_key(member_id), version, b"", ttl) for member_id, version in latest.items()]
        await self._put_many(entries, even_if_breaker_open=True)

    async def _put(self, member_id: str, version: int, body: bytes) -> bool:
        return await self._put_many([(balance_key(member_id), version, body, self._ttl_seconds)])

    async def _put_many(self, entries: list[_Entry], *, even_if_breaker_open: bool = False) -> bool:
        if not (even_if_breaker_open or self._available()):
            return False
        try:
            if self._reader is not None:
                try:
                    await self._eval_put_many(entries)
                    return True
                except RedisUnavailable as exc:
                    if "no reply within" in str(exc):
                        raise  # Redis is slow, not the connection broken: do not wait twice
                    # The multiplexed connection may be what failed: try the pooled client once
                    # (putting an entry again is harmless: it only lands if still newer).
            if len(entries) == 1:  # one EVALSHA; a pipeline would ask SCRIPT EXISTS first
                key, version, body, ttl = entries[0]
                await self._put_if_newer(keys=[key], args=[version, body, ttl])
                return True
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, version, body, ttl in entries:
                    await self._put_if_newer(keys=[key], args=[version, body, ttl], client=pipe)
                await pipe.execute()
            return True
        except (RedisError, OSError) as exc:
            self._failed("put", exc)
            return False
