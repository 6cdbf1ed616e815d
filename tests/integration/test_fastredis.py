"""The multiplexed Redis connection of the balance read path, against a real Redis."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from konvert import embedded
from konvert.fastredis import MultiplexedRedis, RedisUnavailable


@pytest.fixture
async def fast(redis_url, redis_client):
    client = MultiplexedRedis(redis_url, timeout_seconds=1.0)
    yield client
    client.close()


async def test_replies_match_their_commands_under_concurrency(fast, redis_client):
    prefix = uuid.uuid4().hex
    async with redis_client.pipeline(transaction=False) as pipe:
        for i in range(200):
            pipe.hset(f"{prefix}:{i}", "b", f"value-{i}")
        await pipe.execute()

    replies = await asyncio.gather(*(fast.execute(b"HGET", f"{prefix}:{i}", b"b") for i in range(200)))

    assert replies == [f"value-{i}".encode() for i in range(200)]
    assert await fast.execute(b"HGET", f"{prefix}:missing", b"b") is None


async def test_an_error_reply_fails_only_its_command(fast):
    bad, good = await asyncio.gather(fast.execute(b"NOSUCHCOMMAND"), fast.execute(b"PING"), return_exceptions=True)
    assert isinstance(bad, RedisUnavailable)
    assert good == b"PONG"


async def test_many_commands_go_out_together_and_each_gets_its_own_reply(fast, redis_client):
    prefix = uuid.uuid4().hex
    await redis_client.hset(f"{prefix}:0", "b", "zero")

    replies = await fast.execute_many(
        [
            (b"HGET", f"{prefix}:0", b"b"),
            (b"NOSUCHCOMMAND",),
            (b"HSET", f"{prefix}:1", b"b", b"one"),
            (b"PING",),
        ]
    )

    assert replies[0] == b"zero"
    assert isinstance(replies[1], RedisUnavailable)  # an error is that command's reply, not raised
    assert replies[2:] == [1, b"PONG"]
    assert await redis_client.hget(f"{prefix}:1", "b") == b"one"
    assert await fast.execute_many([]) == []


async def test_many_commands_cancelled_leave_the_connection_in_step(fast):
    blocked = asyncio.ensure_future(
        fast.execute_many([(b"BLPOP", f"empty:{uuid.uuid4().hex}", b"0.2"), (b"PING",)])
    )
    await asyncio.sleep(0.05)
    blocked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocked

    # The replies still owed to the cancelled commands are consumed, not taken for these.
    assert await fast.execute_many([(b"ECHO", b"after")]) == [b"after"]
    assert await fast.execute(b"ECHO", b"again") == b"again"


async def test_it_selects_the_database_of_the_url(redis_url, redis_client):
    key = f"db-check:{uuid.uuid4().hex}"
    await redis_client.set(key, b"here")
    client = MultiplexedRedis(redis_url, timeout_seconds=1.0)
    try:
        assert await client.execute(b"GET", key) == b"here"
    finally:
        client.close()


async def test_unreachable_redis_fails_fast():
    client = MultiplexedRedis("redis://127.0.0.1:1/0", timeout_seconds=0.5)
    with pytest.raises(RedisUnavailable):
        await client.execute(b"PING")


async def test_a_timeout_fails_the_waiting_commands_and_the_next_one_reconnects(fast, redis_url):
    # BLPOP on an empty list blocks server-side longer than the client waits.
    blocked = asyncio.ensure_future(fast.execute(b"BLPOP", f"empty:{uuid.uuid4().hex}", b"5"))
    queued = asyncio.ensure_future(fast.execute(b"PING"))
    results = await asyncio.gather(blocked, queued, return_exceptions=True)
    assert all(isinstance(r, RedisUnavailable) for r in results)
    assert await fast.execute(b"PING") == b"PONG"


async def test_each_command_gets_its_whole_timeout_from_when_it_was_sent(redis_url):
    # One timer per connection keeps the deadlines: it is first set for the PING's, which is
    # answered at once; the BLPOP sent later must still get its own 0.5 s.
    client = MultiplexedRedis(redis_url, timeout_seconds=1.0)
    try:
        assert await client.execute(b"PING") == b"PONG"
        await asyncio.sleep(0.6)
        # Redis answers nil 0.6 s later (up to ~0.1 s more: its cron ticks at 10 Hz), past the
        # PING's deadline and well within the BLPOP's own.
        assert await client.execute(b"BLPOP", f"empty:{uuid.uuid4().hex}", b"0.6") is None
    finally:
        client.close()


async def test_a_command_sent_after_others_were_answered_still_times_out(redis_url):
    # The timer set for the PING's deadline finds the BLPOP waiting, not yet late, and must be
    # set again for the BLPOP's.
    client = MultiplexedRedis(redis_url, timeout_seconds=0.5)
    try:
        assert await client.execute(b"PING") == b"PONG"
        await asyncio.sleep(0.3)
        with pytest.raises(RedisUnavailable, match="no reply within"):
            await client.execute(b"BLPOP", f"empty:{uuid.uuid4().hex}", b"5")
        assert await client.execute(b"PING") == b"PONG"  # reconnected
    finally:
        client.close()


async def test_a_command_on_a_lost_connection_fails_at_once(fast):
    assert await fast.execute(b"PING") == b"PONG"
    protocol = fast._protocol
    protocol.connection_lost(None)
    # Nothing sent on it would be answered, and no deadline would be kept for it either.
    reply = protocol.expect()
    assert reply.done() and isinstance(reply.exception(), RedisUnavailable)
    assert await fast.execute(b"PING") == b"PONG"  # the next command connects again


@pytest.mark.parametrize("query", ["?db=3", "?db=3&socket_timeout=1"])
async def test_a_unix_socket_url_selects_the_database_of_its_query(tmp_path, query):
    # The pooled client (redis-py) reads ?db= too: both clients of one URL must share a database,
    # or an erasure's DEL would miss the balance the fast path cached.
    from redis.asyncio import Redis

    url = embedded.start_redis(tmp_path) + query
    pooled = Redis.from_url(url)
    fast = MultiplexedRedis(url, timeout_seconds=1.0)
    try:
        await pooled.set("where", b"db3")
        assert await fast.execute(b"GET", "where") == b"db3"
        await fast.execute(b"SET", "back", b"from the fast path")
        assert await pooled.get("back") == b"from the fast path"
    finally:
        fast.close()
        await pooled.aclose()
