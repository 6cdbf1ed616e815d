"""Redis: the versioned balance cache. PostgreSQL decides; Redis only remembers.

Every Redis call here is best-effort: when Redis is down or slow the caller falls back to
PostgreSQL, and a short circuit breaker keeps a dead Redis from adding its timeout to every
request. Nothing here ever authorises a spend.

In front of Redis, each process keeps the balances it read recently in memory (the near
cache, :class:`NearCache`), for ``near_cache_seconds``. Two things retire an entry early:
Redis's client-side-caching pushes (any writer, any host) and the host's write stamps
(:mod:`konvert.stamps`: every worker of one ``konvert serve``, with no round trip). The stamps
are what keep read-your-writes exact on a host; the pushes bring other hosts' writes within
about a round trip.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from konvert.fastredis import SUPPORTED_SCHEMES, MultiplexedRedis, RedisUnavailable
from konvert.observability import BALANCE_READS_MEMORY, BALANCE_READS_REDIS
from konvert.settings import Settings
from konvert.stamps import Stamps

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


_KEY_PREFIX, _KEY_SUFFIX = b"kv:{m:", b"}:balance"


class NearCache:
    """Balance bodies this process read from Redis recently, each served while three things hold:
    it is younger than ``seconds``, the Redis connection that read it is still up and tracking
    (so no push for it can have been missed), and its member's write stamp is unchanged."""

    def __init__(self, stamps: Stamps, seconds: float, max_entries: int) -> None:
        self.stamps = stamps
        self._seconds = seconds
        self._max_entries = max_entries
        # member id -> (body, stamp, connection epoch, expires at)
        self._entries: dict[str, tuple[bytes, int, int, float]] = {}
        self.reader: MultiplexedRedis | None = None

    def get(self, member_id: str) -> bytes | None:
        entry = self._entries.get(member_id)
        if entry is None:
            return None
        body, stamp, epoch, expires = entry
        reader = self.reader
        if (
            time.monotonic() < expires
            and reader is not None
            and reader.tracking_since(epoch)
            and self.stamps.read(member_id) == stamp
        ):
            return body
        del self._entries[member_id]
        return None

    def put(self, member_id: str, body: bytes, stamp: int, epoch: int) -> None:
        entries = self._entries
        if len(entries) >= self._max_entries and member_id not in entries:
            del entries[next(iter(entries))]  # the oldest fill
        entries[member_id] = (body, stamp, epoch, time.monotonic() + self._seconds)

    def drop(self, member_id: str) -> None:
        self._entries.pop(member_id, None)

    def on_push(self, push: list[Any]) -> None:
        """Redis's ``invalidate`` push: the keys that changed, or None when it flushed them all."""
        if not push or push[0] != b"invalidate":
            return
        keys = push[1]
        if keys is None:
            self._entries.clear()
            return
        for key in keys:
            if key.startswith(_KEY_PREFIX) and key.endswith(_KEY_SUFFIX):
                self._entries.pop(key[len(_KEY_PREFIX) : -len(_KEY_SUFFIX)].decode(), None)

    def __len__(self) -> int:
        return len(self._entries)


class BalanceCache:
    def __init__(
        self,
        client: redis.Redis,
        ttl_seconds: int,
        reader: MultiplexedRedis | None = None,
        near: NearCache | None = None,
    ) -> None:
        self._redis = client
        # Reads take the multiplexed connection when the URL allows it (see konvert.fastredis).
        self._reader = reader
        self._ttl_seconds = ttl_seconds
        self._put_if_newer = client.register_script(_PUT_IF_NEWER)
        self._skip_until = 0.0
        # The near cache needs the multiplexed connection: its pushes are what retire entries.
        self.near = near if reader is not None else None
        if self.near is not None:
            self.near.reader = reader

    @classmethod
    def for_settings(cls, client: redis.Redis, settings: Settings) -> BalanceCache:
        fast = urlsplit(settings.redis_url).scheme in SUPPORTED_SCHEMES
        near = None
        if fast and settings.near_cache_seconds > 0:
            near = NearCache(
                Stamps(settings.stamps_file), settings.near_cache_seconds, settings.near_cache_entries
            )
        reader = (
            MultiplexedRedis(
                settings.redis_url, settings.redis_timeout_seconds, near.on_push if near is not None else None
            )
            if fast
            else None
        )
        return cls(client, settings.balance_cache_ttl_seconds, reader, near)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        if self.near is not None:
            self.near.stamps.close()

    async def _eval_put(self, key: str, version: int, body: bytes) -> None:
        assert self._reader is not None
        args = (key, version, body, self._ttl_seconds)
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
        near = self.near
        if near is not None and (body := near.get(member_id)) is not None:
            BALANCE_READS_MEMORY.inc()
            return body
        if not self._available():
            return None
        try:
            if self._reader is None:
                body = await self._redis.hget(balance_key(member_id), "b")
            elif near is None:
                body = await self._reader.execute(b"HGET", balance_key(member_id), b"b")
            else:
                body = await self._read_and_keep(near, self._reader, member_id)
        except (RedisError, OSError) as exc:  # RedisUnavailable is an OSError
            self._failed("get", exc)
            return None
        if body is not None:
            BALANCE_READS_REDIS.inc()
        return body

    async def _read_and_keep(self, near: NearCache, reader: MultiplexedRedis, member_id: str) -> bytes | None:
        # The stamp before the read: a write stamped after it retires what this read fills.
        stamp, epoch, pushes = near.stamps.read(member_id), reader.epoch, reader.pushes
        body = await reader.execute(b"HGET", balance_key(member_id), b"b")
        # Kept only if nothing could have changed it unseen: the same tracking connection
        # before and after, and no push in between (a push may have been for this key and
        # come before the reply was handled).
        if body is not None and reader.tracking_since(epoch) and reader.pushes == pushes:
            near.put(member_id, body, stamp, epoch)
        return body

    async def put(self, member_id: str, version: int, body: bytes) -> None:
        await self._put(member_id, version, body)

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
        self._retire_near(member_id)

    async def forget(self, member_id: str) -> None:
        try:
            await self._redis.delete(balance_key(member_id))
        except (RedisError, OSError) as exc:
            self._failed("forget", exc)
        self._retire_near(member_id)

    def _retire_near(self, member_id: str) -> None:
        """After Redis forgot the old balance, so that a worker that fetches it again after the
        new stamp gets the new one: the stamp retires every worker's copy on this host."""
        if self.near is not None:
            self.near.stamps.bump(member_id)
            self.near.drop(member_id)

    async def _put(
        self, member_id: str, version: int, body: bytes, *, even_if_breaker_open: bool = False
    ) -> bool:
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
