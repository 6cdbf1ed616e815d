"""End-to-end tests run ``konvert serve`` in processes of their own, which write to the run's
Redis under the run's prefix; the run's Redis client (its teardown deletes that prefix's keys) is
held here for every one of them, including tests that ask for the Redis URL alone."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis


@pytest.fixture(scope="session", autouse=True)
async def _the_run_leaves_no_redis_keys(redis_client: redis.Redis) -> AsyncIterator[None]:
    yield
