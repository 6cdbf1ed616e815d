"""Liveness, readiness and metrics: the routes an orchestrator and Prometheus call, without a key."""

from __future__ import annotations

import asyncio

import msgspec
from litestar import Response, get
from litestar.openapi.datastructures import ResponseSpec

from konvert import redis_client
from konvert.observability import render_metrics
from konvert.services import Svc

PUBLIC = {"public": True}
# Answered without PostgreSQL or Redis: never 503.
IN_PROCESS = {**PUBLIC, "no_backend": True}


class Liveness(msgspec.Struct, frozen=True):
    status: str


class Check(msgspec.Struct, frozen=True, omit_defaults=True):
    ok: bool
    error: str | None = None


class Readiness(msgspec.Struct, frozen=True):
    status: str
    postgres: Check
    redis: Check


_LIVE = Liveness("ok")


@get("/health/live", opt=IN_PROCESS, tags=["operations"])
async def live() -> Liveness:
    """The process is up and serving requests (the cheapest request konvert serves)."""
    return _LIVE


async def _check(probe: object, timeout_seconds: float) -> Check:
    try:
        await asyncio.wait_for(probe, timeout_seconds)  # type: ignore[arg-type]
        return Check(ok=True)
    except TimeoutError:
        return Check(ok=False, error=f"no answer within {timeout_seconds}s")
    except Exception as exc:  # noqa: BLE001 - any failure means not ready; say which.
        return Check(ok=False, error=type(exc).__name__)


@get(
    "/health/ready",
    opt=PUBLIC,
    tags=["operations"],
    responses={
        503: ResponseSpec(Readiness, description="PostgreSQL or Redis does not answer", generate_examples=False)
    },
)
async def ready(services: Svc) -> Response[Readiness]:
    """PostgreSQL and Redis (every master of a Redis Cluster) answer within the health timeout.
    503 otherwise.

    The service still serves reads and writes without Redis (from PostgreSQL), but reports
    not-ready so that operators notice.
    """
    timeout = services.settings.health_timeout_seconds
    postgres, redis = await asyncio.gather(
        _check(services.pool.fetchval("select 1"), timeout), _check(redis_client.ping(services.redis), timeout)
    )
    ok = postgres.ok and redis.ok
    return Response(Readiness("ok" if ok else "unavailable", postgres, redis), status_code=200 if ok else 503)


@get("/metrics", opt=IN_PROCESS, tags=["operations"], media_type="text/plain; version=0.0.4")
async def metrics() -> bytes:
    """Prometheus metrics: request counts and latencies by route and status."""
    return render_metrics()


ROUTES = [live, ready, metrics]
