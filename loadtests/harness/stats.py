"""What the harness reads around a measurement: PostgreSQL's WAL and checkpoint counters, Redis's
keyspace counters and memory, the machine, and which konvert source a result measured."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import platform
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from harness import load


def database_url(server_url: str, name: str) -> str:
    return urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))


async def admin(server_url: str, statement: str) -> None:
    conn = await asyncpg.connect(server_url, timeout=10)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def query(url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


def fetchval(url: str, sql: str, *args: object) -> Any:
    """The first column of the first row of one statement, on a connection of its own."""
    rows = asyncio.run(query(url, sql, *args))
    return rows[0][0] if rows else None


def execute(url: str, sql: str) -> None:
    asyncio.run(admin(url, sql))


# --- Redis -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def redis_client(redis_url: str) -> Iterator[Any]:
    """A redis-py client of the harness's Redis database (or of every master of a Redis Cluster,
    for a ``redis+cluster://`` URL), closed afterwards."""
    import redis
    from redis.cluster import ClusterNode, RedisCluster

    from konvert.redis_client import parse_redis_url

    target = parse_redis_url(redis_url)
    if target.kind == "cluster":
        nodes = [ClusterNode(host, port) for host, port in target.nodes]
        client: Any = RedisCluster(startup_nodes=nodes, username=target.username, password=target.password)
    elif target.kind == "sentinel":
        raise SystemExit("loadtests: --redis-url takes one Redis server or a Redis Cluster, not a Sentinel")
    else:
        client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


def _per_server(client: Any, section: str) -> list[dict[str, Any]]:
    """INFO ``section`` of the server, or of each master of a cluster."""
    from redis.cluster import RedisCluster

    if isinstance(client, RedisCluster):
        return list(client.info(section, target_nodes=RedisCluster.PRIMARIES).values())
    return [client.info(section)]


def redis_stats(redis_url: str) -> tuple[int, int]:
    with redis_client(redis_url) as client:
        infos = _per_server(client, "stats")
        return sum(int(i["keyspace_hits"]) for i in infos), sum(int(i["keyspace_misses"]) for i in infos)


def redis_memory(redis_url: str) -> tuple[int, int]:
    """Keys in the harness's database, and the memory Redis (every master) uses in all."""
    from redis.cluster import RedisCluster

    with redis_client(redis_url) as client:
        # (a cluster client adds up the masters' key counts)
        keys = (
            client.dbsize(target_nodes=RedisCluster.PRIMARIES) if isinstance(client, RedisCluster) else client.dbsize()
        )
        return int(keys), sum(int(i["used_memory"]) for i in _per_server(client, "memory"))


def flush_redis(redis_url: str) -> None:
    with redis_client(redis_url) as client:
        client.flushdb()  # on a cluster: every master


# --- PostgreSQL's WAL and checkpoints ---------------------------------------------------------------

# Bytes from the WAL insert position (exact, at once); records and full-page images from the
# server's counters, which backends report at most once a second while busy and up to 10 s after
# they go idle: per request they are approximate, the part of one run that arrives late roughly
# offsetting the part of the warm-up that arrives early.
_WAL_STATS = """
    select wal_records, wal_fpi, pg_current_wal_insert_lsn() - '0/0'::pg_lsn,
           (select xact_commit + xact_rollback from pg_stat_database where datname = current_database())
    from pg_stat_wal
"""


def wal_stats(url: str) -> tuple[int, int, int, int] | None:
    """The server's WAL counters (records, full-page images, bytes; PostgreSQL 14+) and the
    database's transactions (as late as the records), or None."""
    try:
        (row,) = asyncio.run(query(url, _WAL_STATS))
    except asyncpg.PostgresError:
        return None
    return int(row[0]), int(row[1]), int(row[2]), int(row[3])


# Checkpoints started (PostgreSQL counts one when it starts) and whether one is running (the
# checkpointer waits elsewhere than in its main loop, or not at all, while it writes one). A
# checkpoint that starts during a write scenario, or runs through it, makes the first change to
# every page write the whole page to the WAL: more WAL and CPU per request, and a longer tail.
_CHECKPOINTS = (
    """select checkpoints_timed + checkpoints_req,
              (select coalesce(wait_event, 'busy') from pg_stat_activity where backend_type = 'checkpointer')
       from pg_stat_bgwriter""",
    # PostgreSQL 17 moved the counters to their own view.
    """select num_timed + num_requested,
              (select coalesce(wait_event, 'busy') from pg_stat_activity where backend_type = 'checkpointer')
       from pg_stat_checkpointer""",
)


def checkpoints(url: str) -> tuple[int, bool] | None:
    """Checkpoints started so far, and whether one is running now; None if not readable."""
    for sql in _CHECKPOINTS:
        try:
            (row,) = asyncio.run(query(url, sql))
        except (asyncpg.UndefinedColumnError, asyncpg.UndefinedTableError):
            continue
        except asyncpg.PostgresError:
            return None
        return int(row[0]), row[1] not in (None, "CheckpointerMain")
    return None


def checkpoints_during(before: tuple[int, bool] | None, after: tuple[int, bool] | None) -> dict | None:
    if before is None or after is None:
        return None
    return {"started": after[0] - before[0], "running_at_start": before[1], "running_at_end": after[1]}


def wal_per_request(
    before: tuple[int, ...] | None, after: tuple[int, ...] | None, requests: int
) -> dict[str, float] | None:
    """WAL written per request (or pgbench transaction): every write's durable cost, and full-page
    images, which grow with how many distinct pages the writes touch between checkpoints; and the
    database's transactions per request, which say how well writes share them (group commit: a
    purchase batch is two)."""
    if before is None or after is None or not requests:
        return None
    records, fpi, size, *transactions = (a - b for a, b in zip(after, before, strict=True))
    per_request = {
        "records": round(records / requests, 2),
        "full_page_images": round(fpi / requests, 3),
        "bytes": round(size / requests),
    }
    if transactions:
        per_request["transactions"] = round(transactions[0] / requests, 3)
    return per_request


# --- CPU, processes, the machine --------------------------------------------------------------------


def cpu_ms_per_request(result: dict) -> dict[str, float]:
    """CPU milliseconds each part of the machine spent per request (or pgbench transaction).

    Unlike throughput, this barely moves when other work shares the machine, and it says what a
    request costs: on 2 cores, throughput is at most 2000 ms / (the sum of these) per second.
    """
    rps = result["throughput_rps"]
    groups = result["usage"].get("cpu_percent_by_group", {})
    if not rps:
        return {}
    parts = {g: groups.get(g, 0.0) for g in ("konvert", "postgres", "redis", "loadgen", "softirq")}
    if groups.get("jobs"):  # purchases_jobs: `konvert jobs run` beside the service
        parts["jobs"] = groups["jobs"]
    per_request = {g: round(pct * 10 / rps, 4) for g, pct in parts.items()}
    per_request["total_without_loadgen"] = round(sum(v for g, v in per_request.items() if g != "loadgen"), 4)
    return per_request


def is_worker(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return b"resource_tracker" not in cmdline


def source_digest(package: Path) -> dict[str, object]:
    """A digest of a konvert package's source and its migrations (``sql/`` two levels up, where a
    checkout or an editable install keeps them), so a result names the code it measured (the
    working tree may hold uncommitted work). The same code digests alike wherever it lies."""
    roots = [root for root in (package, package.parent.parent / "sql") if root.is_dir()]
    digest = hashlib.sha256()
    newest = 0.0
    files = 0
    for root in roots:
        for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".sql", ".toml") and p.is_file()):
            digest.update(str(path.relative_to(root.parent)).encode() + b"\0" + path.read_bytes() + b"\0")
            newest = max(newest, path.stat().st_mtime)
            files += 1
    return {
        "sha256": digest.hexdigest()[:16],
        "files": files,
        "newest_change": datetime.fromtimestamp(newest, UTC).isoformat(timespec="seconds") if newest else None,
    }


# The server settings that move the figures most: the buffer cache, durability, and how often
# checkpoints force full-page images into the WAL (at 1,000,000 members, most of a purchase's WAL).
POSTGRES_SETTINGS_REPORTED = (
    "shared_buffers",
    "synchronous_commit",
    "max_wal_size",
    "checkpoint_timeout",
    "wal_compression",
)
_POSTGRES_SETTINGS = "select name, current_setting(name) as setting from pg_settings where name = any($1::text[])"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def machine_info(pg_url: str, konvert_version: str | None) -> dict[str, object]:
    try:
        mem_total_kib = int(Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1])
    except (OSError, ValueError, IndexError):
        mem_total_kib = 0
    try:
        postgres = asyncio.run(query(pg_url, "select version()"))[0][0]
        rows = asyncio.run(query(pg_url, _POSTGRES_SETTINGS, list(POSTGRES_SETTINGS_REPORTED)))
        postgres_settings = {row["name"]: row["setting"] for row in rows}
    except Exception as exc:  # noqa: BLE001 - informational only
        postgres, postgres_settings = f"unknown ({exc})", {}
    return {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": round(mem_total_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgres": postgres,
        "postgres_settings": postgres_settings,
        "wrk": load.tool_version("wrk") if load.tool_path("wrk") else None,
        "pgbench": load.tool_version("pgbench") if load.tool_path("pgbench") else None,
        "konvert": konvert_version,
    }
