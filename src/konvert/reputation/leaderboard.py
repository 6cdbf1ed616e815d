"""Reputation leaderboards: Redis sorted sets, kept current after every commit, rebuilt from PostgreSQL.

Boards: all time, the ISO week and the calendar month (UTC), each per source and over all
sources (``*``). A change is attributed to the UTC day and source of the kudos that caused it,
so a late webhook lands in the period its kudos happened in. Scores are reputation gained in
the board's period (the ledger's moves, so the all-time board over all sources adds up to
each member's reputation). Members are stored by member_uid and named from PostgreSQL when
read; an erasure drops the build marker (``privacy.rebuild_leaderboards``), so the next read
rebuilds the boards without the erased member.

Keys (one hash tag, so one Redis Cluster slot; ``<g>`` is the build generation)::

    <prefix>:{lb:<ns>}:rep:built                     generation of the complete build (the marker)
    <prefix>:{lb:<ns>}:rep:generation                counter of builds (a generation is <counter>-<random>)
    <prefix>:{lb:<ns>}:rep:g<g>:<board>:<source|*>   sorted set member_uid -> score
    ...:<source|*>:scores                            sorted set of the distinct scores (dense ranks)
    ...:<source|*>:counts                            hash score -> members with it
    <prefix>:{lb:<ns>}:rep:g<g>:keys                 every key of the generation (to drop it later)

``<prefix>`` is KONVERT_REDIS_KEY_PREFIX; ``<ns>`` names the PostgreSQL database the boards come
from (a digest of its system identifier and name), so several konvert databases (test runs,
staging next to production) can share one Redis without rebuilding each other's boards.

with ``<board>`` one of ``all``, ``week:2026-W47``, ``month:2026-11``. Sources cannot contain
``:``, so these names never collide. A member's dense rank is one more than the number of
distinct scores above theirs: O(log n) whatever the ties.

Consistency with PostgreSQL. A writing transaction first takes a shared PostgreSQL advisory
lock, held until it ends, and reads under it the generation of the complete build (the
marker); after the commit it adds its changes to that generation only, with a script that
checks the marker still names it. A rebuild holds the lock exclusively from before its
snapshot until it has switched the marker to its new generation, so it waits for the
transactions in flight and they for it: a change that committed before its snapshot is in the
new build, and its increment goes to the old generation or nowhere; a transaction that started
after it reads the new generation. Every build's generation is a name never used before (a
counter and a random part), so an increment can never reach a later build by its number. A
rebuild writes a new generation and then switches the marker, so readers never see half a build.
When the marker is missing (Redis was flushed or restarted empty) the first read rebuilds
(writers skip their increments meanwhile: the rebuild includes them), and a process that
could not reach Redis after a commit drops the marker as soon as Redis answers again, so the
next read rebuilds rather than serve a board missing that change. Reads while Redis is down
are refused with 503 ``leaderboard_unavailable``: computing boards from PostgreSQL on every
read would move the load of a Redis outage onto the database that decides balances.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import secrets
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING

import asyncpg
import msgspec

from konvert import errors
from konvert.db import Connection, Queryable
from konvert.ledger.store import select_member_uid
from konvert.observability import ThrottledLog
from konvert.redis_client import REDIS_ERRORS, RedisClient, Script
from konvert.reputation import rules, store
from konvert.reputation.model import Leaderboard, LeaderboardEntry, LeaderboardPosition

if TYPE_CHECKING:
    from konvert.services import Services

log = logging.getLogger("konvert.reputation.leaderboard")
unavailable_log = ThrottledLog(log)

ALL_SOURCES = "*"
# pg_advisory_lock key of the leaderboards: writers share it, a rebuild takes it alone.
LOCK_KEY = 0x6B6F6E76_6C620001
# Period boards outlive their period by this much (only the current ones are read).
PERIOD_RETENTION = timedelta(days=40)
_BREAKER_OPEN_SECONDS = 1.0
_REBUILD_BATCH_ROWS = 1000
# What adding changes can fail with: Redis, or PostgreSQL naming the key space.
_ADD_ERRORS: tuple[type[Exception], ...] = (*REDIS_ERRORS, asyncpg.PostgresError)

# Adds ARGV[3] to member ARGV[2] of the board, keeping the distinct scores and their counts, if
# the marker still names generation ARGV[1] (else a rebuild will include the change).
_INCREMENT = Script("""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local old = redis.call('ZSCORE', KEYS[2], ARGV[2])
local new = redis.call('ZINCRBY', KEYS[2], ARGV[3], ARGV[2])
if old then
  if redis.call('HINCRBY', KEYS[4], old, -1) <= 0 then
    redis.call('HDEL', KEYS[4], old)
    redis.call('ZREM', KEYS[3], old)
  end
end
if tonumber(new) == 0 then
  redis.call('ZREM', KEYS[2], ARGV[2])
else
  redis.call('HINCRBY', KEYS[4], new, 1)
  redis.call('ZADD', KEYS[3], new, new)
end
redis.call('SADD', KEYS[5], KEYS[2], KEYS[3], KEYS[4])
local ttl = tonumber(ARGV[4])
if ttl > 0 then
  for i = 2, 4 do redis.call('EXPIRE', KEYS[i], ttl) end
end
return 1
""")


class Delta(msgspec.Struct, frozen=True):
    """A committed change to a member's reputation, where leaderboards attribute it."""

    member_uid: int
    source: str
    day: date
    amount: int


class BoardKeys(msgspec.Struct, frozen=True):
    members: str
    scores: str
    counts: str


def board_name(period: str, day: date) -> str:
    return "all" if period == "all" else f"{period}:{rules.period_key(period, day)}"


class KeySpace(msgspec.Struct, frozen=True):
    """The leaderboard keys of one PostgreSQL database."""

    prefix: str

    @classmethod
    def of(cls, prefix: str, system_identifier: str, database: str) -> KeySpace:
        digest = hashlib.sha256(f"{system_identifier}/{database}".encode()).hexdigest()[:12]
        return cls(f"{prefix}:{{lb:{digest}}}:rep")

    @property
    def marker(self) -> str:
        return f"{self.prefix}:built"

    @property
    def generation_counter(self) -> str:
        return f"{self.prefix}:generation"

    def board(self, generation: int | str, board: str, source: str) -> BoardKeys:
        base = f"{self.prefix}:g{generation}:{board}:{source}"
        return BoardKeys(base, f"{base}:scores", f"{base}:counts")

    def registry(self, generation: int | str) -> str:
        return f"{self.prefix}:g{generation}:keys"


async def keyspace_of(conn: Queryable, prefix: str) -> KeySpace:
    database = await conn.fetchval("select current_database()")
    try:
        system_identifier = await conn.fetchval("select system_identifier::text from pg_control_system()")
    except asyncpg.InsufficientPrivilegeError:  # the database's name must do
        system_identifier = ""
    return KeySpace.of(prefix, system_identifier, database)


def board_ttl_seconds(board: str, now: datetime) -> int:
    """How long a board's keys live: none for all time; a while past the end of its period."""
    if board == "all":
        return 0
    period, _, key = board.partition(":")
    if period == "week":
        year, week = key.split("-W")
        start = date.fromisocalendar(int(year), int(week), 1)
    else:
        year, month = key.split("-")
        start = date(int(year), int(month), 1)
    end = rules.period_end(period, start)
    assert end is not None
    expires = datetime(end.year, end.month, end.day, tzinfo=UTC) + PERIOD_RETENTION
    return max(60, int((expires - now).total_seconds()))


def dense_ranks(scores: Iterable[float], first_rank: int = 1) -> list[int]:
    """Dense ranks of scores sorted best first."""
    ranks = []
    rank, previous = first_rank, None
    for score in scores:
        if previous is not None and score != previous:
            rank += 1
        ranks.append(rank)
        previous = score
    return ranks


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _score_text(score: int) -> str:
    # Redis prints integral scores without a fraction ("10", "-5"); counts and distinct scores
    # written here must use the same text as the script's ZINCRBY results.
    return str(int(score))


class Leaderboards:
    """Per process: the key space, the increment script, a short circuit breaker, and whether a
    change was lost."""

    def __init__(self, services: Services) -> None:
        self.redis: RedisClient = services.redis
        self._prefix = services.settings.redis_key_prefix
        self._keys: KeySpace | None = None
        self._skip_until = 0.0
        # A change committed in PostgreSQL could not be added here: the boards are missing it.
        self.missed_change = False

    async def keys(self, conn: Queryable) -> KeySpace:
        if self._keys is None:
            self._keys = await keyspace_of(conn, self._prefix)
        return self._keys

    def available(self) -> bool:
        return time.monotonic() >= self._skip_until

    def failed(self, action: str, exc: Exception) -> None:
        self._skip_until = time.monotonic() + _BREAKER_OPEN_SECONDS
        unavailable_log.warning("redis unavailable for leaderboards", action, action=action, error=repr(exc))

    async def forget_missed_changes(self, keys: KeySpace) -> None:
        """After a change could not be added: drop the marker so the next read rebuilds."""
        if self.missed_change:
            await self.redis.delete(keys.marker)
            self.missed_change = False
            log.info("leaderboards marked for rebuild after a missed change")

    async def hold(self, conn: Connection) -> str | None:
        """First thing in a writing transaction: take the leaderboards' lock shared until the
        transaction ends, and return the generation of the complete build that its changes go to
        after the commit (None: there is none, or Redis does not answer)."""
        await conn.execute("select pg_advisory_xact_lock_shared($1)", LOCK_KEY)
        if not self.available():
            self.missed_change = True
            return None
        try:
            keys = await self.keys(conn)
            await self.forget_missed_changes(keys)
            generation = await self.redis.get(keys.marker)
        except _ADD_ERRORS as exc:
            self.missed_change = True
            self.failed("add", exc)
            return None
        # No build: the rebuild that the next read makes includes this transaction's changes.
        return None if generation is None else _text(generation)

    async def add(self, generation: str | None, deltas: Iterable[Delta], now: datetime | None = None) -> None:
        """Add committed changes to every board of ``generation`` (what ``hold`` returned) they
        belong to, unless a rebuild replaced it meanwhile (it includes them). Never raises: Redis
        only remembers."""
        totals: dict[tuple[str, str, int], int] = defaultdict(int)
        for delta in deltas:
            if delta.amount == 0:
                continue
            for period in ("all", "week", "month"):
                board = board_name(period, delta.day)
                for source in (delta.source, ALL_SOURCES):
                    totals[(board, source, delta.member_uid)] += delta.amount
        changes = [(key, amount) for key, amount in totals.items() if amount != 0]
        if generation is None or not changes or self._keys is None:
            return
        if not self.available():
            self.missed_change = True
            return
        now = now or datetime.now(UTC)
        keys = self._keys
        calls = []
        for (board, source, member_uid), amount in changes:
            board_keys = keys.board(generation, board, source)
            board_key_names = (board_keys.members, board_keys.scores, board_keys.counts)
            calls.append(
                (
                    (keys.marker, *board_key_names, keys.registry(generation)),
                    (generation, member_uid, amount, board_ttl_seconds(board, now)),
                )
            )
        try:
            for reply in await _INCREMENT.run_each(self.redis, calls):
                if isinstance(reply, Exception):
                    raise reply
        except _ADD_ERRORS as exc:
            self.missed_change = True
            self.failed("add", exc)


def _end_session(conn: Connection) -> None:
    # A connection PostgreSQL closed went back to the pool by itself: nothing is left to end.
    with contextlib.suppress(asyncpg.InterfaceError):
        conn.terminate()


# --- rebuild --------------------------------------------------------------------------------


class RebuildReport(msgspec.Struct, frozen=True):
    generation: int
    boards: int
    entries: int


async def rebuild(services: Services, *, only_if_missing: bool = False) -> RebuildReport | None:
    """Recreate every current board exactly from PostgreSQL; return what was built.

    With ``only_if_missing`` (the automatic rebuild on read) it does nothing if another process
    built the boards while this one waited for the lock.
    """
    boards = services.shared(Leaderboards)
    client = services.redis
    async with services.pool.acquire() as conn:
        keys = await boards.keys(conn)
        await conn.execute("select pg_advisory_lock($1)", LOCK_KEY)
        try:
            if only_if_missing and await client.exists(keys.marker):
                return None
            report = await _build(conn, client, keys)
            boards.missed_change = False
            return report
        finally:
            try:
                await conn.execute("select pg_advisory_unlock($1)", LOCK_KEY)
            except BaseException:  # the session must not keep the lock: end it
                _end_session(conn)
                raise


async def _build(conn: Connection, client: RedisClient, keys: KeySpace) -> RebuildReport:
    now = datetime.now(UTC)
    today = now.date()
    number = int(await client.incr(keys.generation_counter))
    # Never the name of an earlier build, even after Redis lost the counter: a writer that read
    # an earlier build's marker must not find it standing again (Leaderboards.add).
    generation = f"{number}-{secrets.token_hex(4)}"
    registry = keys.registry(generation)
    counts: dict[tuple[str, str], Counter[int]] = defaultdict(Counter)
    entries = 0
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            pipe = client.pipeline(transaction=False)
            pending = 0
            week_start, month_start = rules.period_start("week", today), rules.period_start("month", today)
            async for row in conn.cursor(
                store.LEADERBOARD_SCORES, week_start, month_start, prefetch=_REBUILD_BATCH_ROWS
            ):
                board, source, score = row["board"], row["source"], row["score"]
                pipe.zadd(keys.board(generation, board, source).members, {str(row["member_uid"]): score})
                counts[(board, source)][score] += 1
                entries += 1
                pending += 1
                if pending >= _REBUILD_BATCH_ROWS:
                    await pipe.execute()
                    pipe, pending = client.pipeline(transaction=False), 0
            await pipe.execute()
        pipe = client.pipeline(transaction=False)
        for (board, source), score_counts in counts.items():
            board_keys = keys.board(generation, board, source)
            pipe.hset(board_keys.counts, mapping={_score_text(s): n for s, n in score_counts.items()})
            pipe.zadd(board_keys.scores, {_score_text(s): s for s in score_counts})
            pipe.sadd(registry, board_keys.members, board_keys.scores, board_keys.counts)
            if ttl := board_ttl_seconds(board, now):
                for key in (board_keys.members, board_keys.scores, board_keys.counts):
                    pipe.expire(key, ttl)
        await pipe.execute()
        previous = await client.get(keys.marker)
        await client.set(keys.marker, generation)
    except BaseException:
        await _drop_generation(client, keys.registry(generation))
        raise
    if previous is not None and _text(previous) != generation:
        await _drop_generation(client, keys.registry(_text(previous)))
    log.info("leaderboards rebuilt", extra={"generation": generation, "boards": len(counts), "entries": entries})
    return RebuildReport(number, len(counts), entries)


async def _drop_generation(client: RedisClient, registry: str) -> None:
    with contextlib.suppress(*REDIS_ERRORS):
        keys = list(await client.smembers(registry))
        for start in range(0, len(keys), 500):
            await client.unlink(*keys[start : start + 500])
        await client.unlink(registry)


# --- reads ----------------------------------------------------------------------------------


async def _generation(services: Services) -> tuple[KeySpace, str]:
    """The key space and the complete build's generation, building it first if Redis lost it."""
    boards = services.shared(Leaderboards)
    if not boards.available():
        raise errors.LeaderboardUnavailable("leaderboards are unavailable while Redis does not answer")
    keys = await boards.keys(services.pool)
    try:
        await boards.forget_missed_changes(keys)
        generation = await services.redis.get(keys.marker)
        if generation is None:
            await rebuild(services, only_if_missing=True)
            generation = await services.redis.get(keys.marker)
    except REDIS_ERRORS as exc:
        boards.failed("read", exc)
        raise errors.LeaderboardUnavailable("leaderboards are unavailable while Redis does not answer") from None
    if generation is None:  # pragma: no cover - flushed again during the rebuild
        raise errors.LeaderboardUnavailable("leaderboards are being rebuilt; retry")
    return keys, _text(generation)


async def top(
    services: Services, period: str, source: str | None, limit: int, today: date | None = None
) -> Leaderboard:
    """The members who gained the most reputation in the current period, with dense ranks."""
    today = today or services.clock().astimezone(UTC).date()
    board = board_name(period, today)
    keys, generation = await _generation(services)
    board_keys = keys.board(generation, board, source or ALL_SOURCES)
    try:
        rows = await services.redis.zrevrange(board_keys.members, 0, limit - 1, withscores=True)
    except REDIS_ERRORS as exc:
        services.shared(Leaderboards).failed("read", exc)
        raise errors.LeaderboardUnavailable("leaderboards are unavailable while Redis does not answer") from None
    uids = [int(row[0]) for row in rows]
    names = await store.select_member_ids(services.pool, uids)
    scores = [int(row[1]) for row in rows]
    entries = [
        LeaderboardEntry(rank, names[uid], score)
        for uid, score, rank in zip(uids, scores, dense_ranks(scores), strict=True)
        if uid in names
    ]
    return Leaderboard(
        period=period,  # type: ignore[arg-type]
        period_key=rules.period_key(period, today),
        source=source,
        entries=entries,
    )


async def position(
    services: Services, member_id: str, period: str, source: str | None, today: date | None = None
) -> LeaderboardPosition:
    """A member's dense rank and reputation gained on one board (rank None: nothing gained)."""
    today = today or services.clock().astimezone(UTC).date()
    member_uid = await select_member_uid(services.pool, member_id)
    if member_uid is None:
        raise errors.MemberNotFound(f"no member {member_id!r}")
    keys, generation = await _generation(services)
    board_keys = keys.board(generation, board_name(period, today), source or ALL_SOURCES)
    try:
        score = await services.redis.zscore(board_keys.members, str(member_uid))
        above = None if score is None else await services.redis.zcount(board_keys.scores, f"({score}", "+inf")
    except REDIS_ERRORS as exc:
        services.shared(Leaderboards).failed("read", exc)
        raise errors.LeaderboardUnavailable("leaderboards are unavailable while Redis does not answer") from None
    return LeaderboardPosition(
        member_id=member_id,
        period=period,  # type: ignore[arg-type]
        period_key=rules.period_key(period, today),
        source=source,
        rank=None if above is None else above + 1,
        reputation=0 if score is None else int(score),
    )
