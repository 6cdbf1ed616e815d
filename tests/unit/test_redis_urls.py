"""The fast Redis path and redis-py must read one URL as the same database and socket."""

from __future__ import annotations

import pytest
from redis.connection import parse_url

from konvert.errors import ConfigurationError
from konvert.fastredis import MultiplexedRedis

URLS = [
    "redis://cache:6379",
    "redis://cache:6379/0",
    "redis://cache:6379/5",
    "redis://cache:6379/2/",
    "redis://cache:6379/%32",
    "redis://cache:6379/x",
    "redis://cache:6379/5?db=7",
    "unix:///run/redis/redis.sock",
    "unix:///run/redis/redis.sock?db=3",
    "unix:///run/redis%20dir/redis.sock?db=3&socket_timeout=1",
]


@pytest.mark.parametrize("url", URLS)
def test_the_fast_path_reads_a_url_as_redis_py_does(url: str) -> None:
    fast, expected = MultiplexedRedis(url, timeout_seconds=1.0), parse_url(url)

    assert fast._db == expected.get("db", 0)
    assert fast._unix_path == expected.get("path")


def test_a_db_that_is_no_number_is_refused_with_the_setting_named() -> None:
    with pytest.raises(ConfigurationError, match="KONVERT_REDIS_URL"):
        MultiplexedRedis("redis://cache:6379?db=x", timeout_seconds=1.0)
