"""Redis: the versioned balance cache. PostgreSQL decides; Redis only remembers.

Every Redis call here is best-effort: when Redis is down or slow the caller falls back to
PostgreSQL, and a short circuit breaker keeps a dead Redis from adding its timeout to every
request. Nothing here ever authorises a spend.

The breaker: after a failed Redis call, reads and fills skip Redis for a second (doubling, up to
``_BREAKER_OPEN_MAX_SECONDS``, while the failures go on). Invalidations skip Redis only after an
invalidation failed: the first one after another call's failure is still sent, so that a hiccup
alone does not leave a member's older balance in Redis for other processes to serve.

Why it serves nothing stale: an invalidation that could not be delivered (skipped, or failed) is
remembered (member id, latest version), and this process serves no cached balance and fills none
until every remembered one has reached Redis: they are sent with the next invalidation, by the
next read once the breaker allows a try, and by a background replay every
``_REPLAY_INTERVAL_SECONDS`` whatever the breaker says (it waits in no request), which closes the
breaker once it lands. Should more be missed than are remembered (``_MISSED_MAX``), every entry
cached before the last miss may be stale, and none is read or filled until the longest they live
(``balance_cache_ttl_seconds``) has passed. Another process that did not miss them may read such
an entry from the moment Redis answers it until this process's replay lands (up to
``_REPLAY_INTERVAL_SECONDS`` and a round trip); on a Redis that stays unreachable for this
process alone, until the entry expires. The concurrent reads of one turn of the event loop
share one command (MGET; on a Redis Cluster, one pipeline of GETs per master); the invalidations
of a batch of writes share one round trip (a redis-py pipeline).

A member's cached balance is one string, ``<version>|<body>``; an empty body is a tombstone. A
write to a member whose balance is cached puts the balance it committed (read in its transaction
just before the commit), so that a read after a purchase or a redemption hits; other members get
a tombstone, so that a write-heavy member nobody reads costs no balance query. A write that cannot
reach Redis leaves a remembered tombstone either way, like an invalidation.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Iterable
from typing import Any

from konvert.batching import BatchedLookups
from konvert.observability import BALANCE_READS, ThrottledLog
from konvert.redis_client import REDIS_ERRORS, RedisClient, Script, get_many
from konvert.settings import Settings

log = logging.getLogger("konvert.cache")
unavailable_log = ThrottledLog(log)

# Sets the cached balance only if its version is newer than what is cached. A write that has
# committed version N but not computed the full balance stores a tombstone (version N, no body),
# so that a slower reader holding version N-1 cannot put an older balance back.
_PUT_IF_NEWER = Script("""
local current = redis.call('GET', KEYS[1])
local digits = current and string.match(current, '^(%d+)|')
if digits then  -- (another string there is not a balance konvert wrote: replaced)
  local cached, version = tonumber(digits), tonumber(ARGV[1])
  if cached > version then return 0 end
  if cached == version and (ARGV[2] == '' or #current > #digits + 1) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ARGV[2], 'EX', ARGV[3])
return 1
""")

# A tombstone at this version keeps every balance out of its key until it expires (a power of two:
# exact in the Lua script's numbers, which are doubles).
ABOVE_ANY_VERSION = 2**62
_BREAKER_OPEN_SECONDS = 1.0
_BREAKER_OPEN_MAX_SECONDS = 8.0
# Invalidations remembered while Redis could not take them (see the module's doc).
_MISSED_MAX = 100_000
# How often missed invalidations are sent again in the background: after Redis returns, other
# processes may serve the balances they leave stale for about this long.
_REPLAY_INTERVAL_SECONDS = 0.1

# A cache entry to put: (key, version, body, seconds to live); an empty body is a tombstone.
_Entry = tuple[str, int, bytes, int]


class BalanceCache:
    def __init__(self, client: RedisClient, ttl_seconds: int, prefix: str, reads_in_flight_max: int = 4) -> None:
        self._redis = client
        self._ttl_seconds = ttl_seconds
        self._prefix = prefix
        self._skip_until = 0.0
        self._invalidations_skip_until = 0.0
        self._open_seconds = _BREAKER_OPEN_SECONDS
        # Invalidations Redis has not taken yet: member id -> latest version (see the module's doc).
        self._missed: dict[str, int] = {}
        # After more misses than remembered: no cached balance is trusted before this time.
        self._cold_until = 0.0
        self._replaying: asyncio.Task[None] | None = None
        self._replay_timer: asyncio.TimerHandle | None = None
        self._closing = False
        self._filling: set[asyncio.Task[bool]] = set()
        # Concurrent reads share one MGET: one command, one round trip, one pooled connection.
        self._reads: BatchedLookups[str, bytes] = BatchedLookups(
            self._get_many, batch_size_max=1000, batches_in_flight_max=reads_in_flight_max
        )

    @classmethod
    def for_settings(cls, client: RedisClient, settings: Settings) -> BalanceCache:
        return cls(client, settings.balance_cache_ttl_seconds, settings.redis_key_prefix)

    def key(self, member_id: str) -> str:
        # The hash tag keeps all of one member's keys in one Redis Cluster slot.
        return f"{self._prefix}:{{m:{member_id}}}:balance"

    def _available(self) -> bool:
        return time.monotonic() >= self._skip_until

    def _trusted(self) -> bool:
        """Whether cached balances may be read and filled: Redis is not skipped, and it took
        every invalidation (so that nothing in it is older than PostgreSQL says)."""
        return self._available() and not self._missed and time.monotonic() >= self._cold_until

    def _failed(self, action: str, exc: Exception, *, invalidating: bool = False) -> None:
        now = time.monotonic()
        self._skip_until = now + self._open_seconds
        if invalidating:
            self._invalidations_skip_until = self._skip_until
        self._open_seconds = min(self._open_seconds * 2, _BREAKER_OPEN_MAX_SECONDS)
        unavailable_log.warning("redis unavailable", action, action=action, error=repr(exc))

    def _miss(self, latest: dict[str, int]) -> None:
        for member_id, version in latest.items():
            if version > self._missed.get(member_id, -1):
                self._missed[member_id] = version
        if len(self._missed) > _MISSED_MAX:
            self._missed.clear()
            self._cold_until = time.monotonic() + self._ttl_seconds
        if self._missed and self._replay_timer is None and not self._closing:
            self._replay_timer = asyncio.get_running_loop().call_later(_REPLAY_INTERVAL_SECONDS, self._replay_missed)

    def _replay_missed(self) -> None:
        """Send the missed invalidations in the background, breaker or not (see the module's doc)."""
        self._replay_timer = None
        if self._missed and (self._replaying is None or self._replaying.done()):
            self._replaying = asyncio.get_running_loop().create_task(self._send_missed())

    async def _send_missed(self) -> None:
        latest = dict(self._missed)
        entries = [(self.key(member_id), version, b"", self._ttl_seconds) for member_id, version in latest.items()]
        if await self._put_many(entries, invalidating=True):
            self._skip_until = self._invalidations_skip_until = 0.0  # Redis answers again
            self._delivered(latest)
        self._miss({})  # what is still missed (failed, or missed meanwhile) is tried again

    def _replay_soon(self) -> None:
        """Send the missed invalidations once the breaker allows a try (one replay at a time)."""
        if not self._missed or time.monotonic() < self._invalidations_skip_until:
            return
        if self._replaying is None or self._replaying.done():
            self._replaying = asyncio.get_running_loop().create_task(self.invalidate_many(()))

    async def get(self, member_id: str) -> bytes | None:
        """The cached balance body, or None (not cached, a tombstone, or Redis unavailable)."""
        if not self._trusted():
            self._replay_soon()
            return None
        try:
            body = await self._reads.get(member_id)
        except REDIS_ERRORS as exc:
            self._failed("get", exc)
            return None
        if body is not None:
            BALANCE_READS.labels("redis").inc()
        return body

    async def cached(self, member_ids: list[str]) -> set[str]:
        """Which of these members' balances are cached (a tombstone is not): those a write keeps
        cached with the balance it commits. Empty when Redis is unavailable."""
        if not member_ids or not self._trusted():
            return set()
        try:
            return set(await self._get_many(member_ids))
        except REDIS_ERRORS as exc:
            self._failed("get", exc)
            return set()

    async def _get_many(self, member_ids: list[str]) -> dict[str, bytes]:
        found = await get_many(self._redis, [self.key(member_id) for member_id in member_ids])
        bodies = {}
        for member_id, entry in zip(member_ids, found, strict=True):
            if isinstance(entry, bytes):  # else not cached (or not a string konvert wrote: a miss)
                version, _, body = entry.partition(b"|")
                if body and version.isdigit():  # an empty body is a tombstone
                    bodies[member_id] = body
        return bodies

    async def put_many(self, balances: list[tuple[str, int, bytes]]) -> bool:
        """Cache many (member id, version, body) in one round trip, each unless a newer one is.
        False when Redis could not be asked (or may hold balances older than PostgreSQL's).

        Balances cached together would expire together, and their reads would all go to
        PostgreSQL at once again: each lives a random time between half the TTL and the TTL."""
        ttl = self._ttl_seconds
        if not self._trusted():
            return False
        return await self._put_many(
            [(self.key(m), v, b, random.randint(max(1, ttl // 2), ttl)) for m, v, b in balances]
        )

    def put_soon(self, member_id: str, version: int, body: bytes) -> None:
        """Cache a balance without waiting for it: a read that missed answers first and fills the
        cache after. Safe in any order: the fill only lands if nothing newer is cached meanwhile.
        A fill that cannot reach Redis is dropped (the breaker logs it)."""
        if not self._trusted():
            return
        entry = (self.key(member_id), version, body, self._ttl_seconds)
        task = asyncio.get_running_loop().create_task(self._put_many([entry]))
        self._filling.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._filling.discard)

    async def invalidate_many(self, changes: Iterable[tuple[str, int]]) -> None:
        """After committed writes at these (member id, version): no reader may serve an older
        balance. ``refresh_many`` with tombstones only."""
        await self.refresh_many((member_id, version, b"") for member_id, version in changes)

    async def refresh_many(self, balances: Iterable[tuple[str, int, bytes]]) -> None:
        """After committed writes: cache each (member id, version, body) that the write read
        before it committed, so that the next read hits; an empty body is a tombstone. One round
        trip for all of them (a member's latest version only).

        The version is what keeps a slower reader from caching an older balance; a plain DEL
        would not. While the breaker is open they are not sent but remembered as tombstones, and
        sent with the next ones (see the module's doc for why that is safe).
        """
        latest: dict[str, tuple[int, bytes]] = {
            member_id: (version, b"") for member_id, version in self._missed.items()
        }
        for member_id, version, body in balances:
            known, _ = latest.get(member_id, (-1, b""))
            if version > known or (version == known and body):
                latest[member_id] = (version, body)
        if not latest:
            return
        versions = {member_id: version for member_id, (version, _) in latest.items()}
        if time.monotonic() < self._invalidations_skip_until:
            self._miss(versions)
            return
        ttl = self._ttl_seconds
        entries = [(self.key(member_id), version, body, ttl) for member_id, (version, body) in latest.items()]
        if not await self._put_many(entries, invalidating=True):
            self._miss(versions)
            return
        self._delivered(versions)

    def _delivered(self, latest: dict[str, int]) -> None:
        for member_id, version in latest.items():  # (others may have been missed meanwhile)
            if self._missed.get(member_id, -1) <= version:
                self._missed.pop(member_id, None)

    async def _put_many(self, entries: list[_Entry], *, invalidating: bool = False) -> bool:
        if not (invalidating or self._available()):
            return False
        try:
            calls = [((key,), (version, body, ttl)) for key, version, body, ttl in entries]
            _raise_first(await _PUT_IF_NEWER.run_each(self._redis, calls))
        except REDIS_ERRORS as exc:
            self._failed("invalidate" if invalidating else "put", exc, invalidating=invalidating)
            return False
        self._open_seconds = _BREAKER_OPEN_SECONDS
        return True

    async def wait_filled(self) -> None:
        """Until the fills started so far have landed or been dropped."""
        while self._filling:
            await asyncio.gather(*self._filling, return_exceptions=True)

    async def aclose(self) -> None:
        """Until the reads, fills and replays started so far have been answered, landed or dropped."""
        await self._reads.aclose()
        await self.wait_filled()
        self._closing = True
        if self._replay_timer is not None:
            self._replay_timer.cancel()
            self._replay_timer = None
        if self._replaying is not None:
            await asyncio.gather(self._replaying, return_exceptions=True)


def _raise_first(replies: Iterable[Any]) -> None:
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
