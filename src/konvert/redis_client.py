"""The one Redis client of a process: one server, a Redis Cluster, or a server Sentinel names.

``KONVERT_REDIS_URL`` chooses it by scheme:

- ``redis://``, ``rediss://``, ``unix://``: one server (redis-py's ``Redis``);
- ``redis+cluster://[user:password@]host:port[,host:port...]`` (``rediss+cluster://`` with TLS):
  a Redis Cluster, found from any of the nodes named (redis-py's ``RedisCluster``);
- ``redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]`` (``rediss+sentinel``
  with TLS): the master that these Sentinels name for ``service`` (redis-py's ``Sentinel``).

konvert's keys are laid out for a cluster on every kind: every command and script that touches
several keys names keys of one hash tag (one slot). The one read that spans members, the balance
cache's batched lookups, is ``get_many``: an MGET on one server, and on a cluster a pipeline of
GETs, which redis-py sends to each master in one round trip.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TypeAlias
from urllib.parse import unquote, urlsplit

import redis.asyncio as redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

if TYPE_CHECKING:
    RedisClient: TypeAlias = redis.Redis | RedisCluster
else:
    # Litestar's dependency model (msgspec) reads the Services' field types and takes no union of
    # two classes: at run time the field is untyped.
    RedisClient = Any
# What a Redis call can fail with when Redis (or part of a cluster) cannot answer. A cluster
# client raises some of its own outside RedisError (no master covers a slot, no node answers).
REDIS_ERRORS: tuple[type[Exception], ...] = (RedisError, RedisClusterException, OSError)

_CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}
_SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}
# Connections per cluster node a process may open (created as needed). redis-py's default (100)
# fails a command beyond it rather than wait, and a busy process fills more caches than that at once.
_CLUSTER_CONNECTIONS_PER_NODE_MAX = 10_000


class RedisTarget(NamedTuple):
    """What a KONVERT_REDIS_URL names."""

    kind: Literal["server", "cluster", "sentinel"]
    nodes: tuple[tuple[str, int], ...] = ()
    username: str | None = None
    password: str | None = None
    tls: bool = False
    service: str = ""
    db: int = 0


def parse_redis_url(url: str) -> RedisTarget:
    """The target of a Redis URL; ValueError saying what is wrong with it."""
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme in ("redis", "rediss", "unix"):
        return RedisTarget("server")
    if scheme not in _CLUSTER_SCHEMES and scheme not in _SENTINEL_SCHEMES:
        raise ValueError(
            "must start with redis://, rediss://, unix://, redis+cluster://, rediss+cluster://, "
            "redis+sentinel:// or rediss+sentinel://"
        )
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    sentinel = scheme in _SENTINEL_SCHEMES
    nodes = tuple(_host_port(text, 26379 if sentinel else 6379) for text in hosts.split(","))
    target = RedisTarget(
        "sentinel" if sentinel else "cluster",
        nodes,
        unquote(username) or None,
        unquote(password) or None,
        _SENTINEL_SCHEMES.get(scheme, False) or _CLUSTER_SCHEMES.get(scheme, False),
    )
    path = [unquote(segment) for segment in parts.path.split("/") if segment]
    if not sentinel:
        if path not in ([], ["0"]) or parts.query:
            raise ValueError("a cluster has database 0 only, and takes no options in the URL")
        return target
    if not 1 <= len(path) <= 2 or (len(path) == 2 and not path[1].isdigit()) or parts.query:
        raise ValueError("a Sentinel URL names the service, and optionally the database: /mymaster/0")
    return target._replace(service=path[0], db=int(path[1]) if len(path) == 2 else 0)


def _host_port(text: str, default_port: int) -> tuple[str, int]:
    host, _, port = text.rpartition(":") if text.rpartition(":")[2].isdigit() else (text, "", "")
    host = host.removeprefix("[").removesuffix("]")
    if not host or (port and not 1 <= int(port) <= 65535):
        raise ValueError(f"{text!r} is not host:port")
    return host, int(port) if port else default_port


def create_redis(url: str, timeout_seconds: float) -> RedisClient:
    """The client for a KONVERT_REDIS_URL. No call retries: konvert falls back to PostgreSQL, and a
    retry would only add its wait to the request."""
    target = parse_redis_url(url)
    options: dict[str, Any] = {
        "socket_timeout": timeout_seconds,
        "socket_connect_timeout": timeout_seconds,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
    }
    if target.kind == "server":
        return redis.Redis.from_url(url, **options)
    options |= {"username": target.username, "password": target.password, "ssl": target.tls}
    if target.kind == "cluster":
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
            max_connections=_CLUSTER_CONNECTIONS_PER_NODE_MAX,
            **options,
        )
    sentinel = Sentinel(
        list(target.nodes),
        sentinel_kwargs={"socket_timeout": timeout_seconds, "socket_connect_timeout": timeout_seconds},
        db=target.db,
        **options,
    )
    master: redis.Redis = sentinel.master_for(target.service)
    return master


async def close(client: RedisClient) -> None:
    """Close the client's connections, and those to the Sentinels that named its master."""
    pool = getattr(client, "connection_pool", None)
    await client.aclose()
    if isinstance(pool, SentinelConnectionPool):
        for sentinel in pool.sentinel_manager.sentinels:
            await sentinel.aclose()


async def get_many(client: RedisClient, keys: Sequence[str]) -> list[Any]:
    """The values of ``keys`` (None where missing), in one round trip per server."""
    if isinstance(client, RedisCluster):
        # MGET takes the keys of one slot only; the pipeline groups the GETs by master instead.
        async with client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.get(key)
            return await pipe.execute()
    return await client.mget(keys)


class Script:
    """A Lua script, run by its digest (no script body on the wire, no SCRIPT EXISTS first)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()  # Redis names scripts so

    async def run_each(self, client: RedisClient, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]) -> list[Any]:
        """The script once per (keys, args), in one pipeline; each reply or the error it got. A
        server that lost its scripts (a restart, a failover, SCRIPT FLUSH) is given it, and the
        calls it refused are run again."""
        replies = await self._evalsha_each(client, calls)
        forgotten = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if forgotten:
            await client.script_load(self.text)  # on a cluster: every master
            again = await self._evalsha_each(client, [calls[i] for i in forgotten])
            for i, reply in zip(forgotten, again, strict=True):
                replies[i] = reply
        return replies

    async def _evalsha_each(
        self, client: RedisClient, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]
    ) -> list[Any]:
        async with client.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                pipe.evalsha(self.sha, len(keys), *keys, *args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies


async def ping(client: RedisClient) -> bool:
    """Whether Redis answers: on a cluster, every master."""
    if isinstance(client, RedisCluster):
        return bool(await client.ping(target_nodes=RedisCluster.PRIMARIES))
    return bool(await client.ping())


async def memory_use(client: RedisClient) -> tuple[int, int]:
    """(used, maxmemory) bytes of the server, or of the cluster's fullest master (0: no limit)."""
    if isinstance(client, RedisCluster):
        per_node: dict[str, dict[str, Any]] = await client.info("memory", target_nodes=RedisCluster.PRIMARIES)
        infos = list(per_node.values())
    else:
        infos = [await client.info("memory")]
    shares = [(int(info["used_memory"]), int(info.get("maxmemory", 0))) for info in infos]
    return max(shares, key=lambda pair: pair[0] / pair[1] if pair[1] else 0.0)
