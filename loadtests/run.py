#!/usr/bin/env python
"""konvert's load-test harness: one command, one machine, every figure a ratio against a baseline
measured in the same run. See loadtests/README.md.

    python loadtests/run.py --quick                     # 2,000 members, 3 s per scenario, < 2 minutes
    python loadtests/run.py                             # 100,000 members, 20 s per scenario
    python loadtests/run.py --members-scaling           # purchases and balance reads at 10k and 1M members
    python loadtests/run.py --quick --workers 1,2,3 --scenarios baselines,purchases,balance_uniform

It creates its own database on the local PostgreSQL server (dropped at the end unless --keep),
uses Redis logical database 14 (flushed), seeds members with a purchase history in SQL, starts
``konvert serve`` with production settings, measures the baselines (pgbench's raw transaction,
the service's no-op endpoint) and the workloads with wrk, checks that nothing was lost or doubled
and that ``konvert audit`` passes, prints a table and writes the results as JSON.

Exit status: 0 when nothing was lost and the audit passed (and, with --fail-on-targets, every
target was met); 1 otherwise; 2 when the tools or servers it needs are missing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import secrets
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import checks, load, profile, report, seed  # noqa: E402
from konvert.observability import TALLY_FLUSH_SECONDS  # noqa: E402
from harness.service import (  # noqa: E402
    CLI_TIMEOUT_SECONDS,
    BackgroundCli,
    Sampler,
    Server,
    balance_read_sources,
    http_json,
    konvert_env,
    run_cli,
    server_latency,
    wait_for_quiet,
)

DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/14"

SCENARIOS = ("noop", "noop_routed", "pgbench", "balance_uniform", "balance_hot", "balance_warm", "balance_half", "purchases",
             "redemptions", "mixed", "purchases_jobs", "jobs")
GROUPS = {
    "all": SCENARIOS,
    "baselines": ("noop", "noop_routed", "pgbench"),
    "balance": ("balance_uniform", "balance_hot", "balance_warm", "balance_half"),
}
SCALING_SCENARIOS = ("noop", "noop_routed", "pgbench", "balance_uniform", "balance_hot", "balance_warm", "purchases")
SCALING_SIZES = (10_000, 1_000_000)
HTTP_SCRIPTS = {
    "noop": "noop",
    "noop_routed": "noop_routed",
    "balance_uniform": "balance",
    "balance_hot": "balance",
    "balance_warm": "balance",
    "balance_half": "balance",
    "purchases": "purchases",
    "redemptions": "redemptions",
    "mixed": "mixed",
    # Purchases while `konvert jobs run` vests a backlog beside them.
    "purchases_jobs": "purchases",
}
WRITE_SCENARIOS = ("purchases", "redemptions", "mixed", "purchases_jobs")
PROFILED_SCENARIOS = ("purchases", "balance_uniform", "balance_hot")
# Each worker adds its counts to /metrics every TALLY_FLUSH_SECONDS: wait that long, and a
# little more, before reading them.
METRICS_LAG_S = TALLY_FLUSH_SECONDS + 0.5

# Redemption contention: these members get a balance large enough for every redemption of a run.
CONTENTION_BALANCE_POINTS = 10_000_000
# balance_half: how close to half of peak the paced run must land before it is measured.
HALF_LOAD_TOLERANCE = 0.1
HALF_LOAD_CALIBRATIONS_MAX = 3


# --- arguments ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="loadtests/run.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2,000 members, 3 s per scenario, 1 s warm-up")
    parser.add_argument("--members", type=int, help="members to seed (default 100,000; --quick 2,000)")
    parser.add_argument("--duration", type=float, help="seconds per measured scenario (default 20; --quick 3)")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds before each scenario (default 3; --quick 1)")
    parser.add_argument("--connections", type=int, default=32, help="HTTP connections = pgbench clients (default 32)")
    parser.add_argument("--workers", default="2", help="konvert serve --workers; a list such as 1,2,3 compares them")
    parser.add_argument("--wrk-threads", type=int, default=2,
                        help="wrk threads (default 2: one thread limits the no-op endpoint on 2 cores)")  # fmt: skip
    parser.add_argument("--pgbench-threads", type=int, default=2, help="pgbench -j (default 2)")
    parser.add_argument(
        "--scenarios", default="all",
        help=f"comma-separated: all, baselines, balance, {', '.join(SCENARIOS)} (default all)",
    )  # fmt: skip
    parser.add_argument(
        "--members-scaling", action="store_true",
        help="run baselines, purchases and balance reads at 10,000 and at 1,000,000 members (growing one database)",
    )  # fmt: skip
    parser.add_argument("--scaling-sizes", default=",".join(map(str, SCALING_SIZES)), help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=1,
                        help="measure each scenario this many times and report the median run (default 1)")  # fmt: skip
    parser.add_argument("--history", type=int, default=3, help="seeded purchases per member (default 3, min 2)")
    parser.add_argument("--history-every-days", type=int, default=30,
                        help="days between a member's seeded purchases after the first (default 30; "
                             "3 with --history 100: frequent shoppers, 100 purchases in the tier window)")  # fmt: skip
    parser.add_argument("--hot-members-percent", type=float, default=1.0, help="balance_hot: the hot members (1%%)")
    parser.add_argument("--hot-share", type=float, default=0.9, help="balance_hot: share of reads on them (0.9)")
    parser.add_argument("--contention-members", type=int, default=8, help="redemptions: members they hit (8)")
    parser.add_argument("--pg-url", default=os.environ.get("KONVERT_BENCH_PG_URL", DEFAULT_PG_URL),
                        help="a PostgreSQL server where the harness may create a database")  # fmt: skip
    parser.add_argument("--redis-url", default=os.environ.get("KONVERT_BENCH_REDIS_URL", DEFAULT_REDIS_URL),
                        help="a Redis database the harness may flush (default db 14)")  # fmt: skip
    parser.add_argument("--db-pool-max", type=int, help="KONVERT_DB_POOL_MAX for the service (default: konvert's)")
    parser.add_argument("--set", action="append", default=[], metavar="KONVERT_X=VALUE", dest="settings",
                        help="a konvert setting for the service, e.g. KONVERT_WRITE_BATCH_SIZE_MAX=64 (repeatable)")  # fmt: skip
    parser.add_argument("--program-file", help="KONVERT_PROGRAM_FILE for the service (default: the example program)")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy a worker during purchases and the balance reads (needs py-spy; slows them)")  # fmt: skip
    parser.add_argument("--profile-native", action="store_true", help="with --profile: include C frames")
    parser.add_argument(
        "--quiet-wait", type=float,
        help="before each measurement wait up to this many seconds for other work on the machine to\n"
        "drop below --quiet-threshold (default 60; --quick 0)",
    )  # fmt: skip
    parser.add_argument("--quiet-threshold", type=float, default=15.0,
                        help="%% of one core that other processes may use (default 15)")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the benchmark database afterwards")
    parser.add_argument("--output", type=Path, help="the JSON result (default loadtests/results/<timestamp>.json)")
    parser.add_argument("--fail-on-targets", action="store_true", help="exit 1 when a target is not met")
    args = parser.parse_args(argv)

    args.members = args.members or (2_000 if args.quick else 100_000)
    args.duration = args.duration or (3.0 if args.quick else 20.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 3.0)
    args.quiet_wait = args.quiet_wait if args.quiet_wait is not None else (0.0 if args.quick else 60.0)
    args.worker_counts = [int(w) for w in str(args.workers).split(",") if w.strip()]
    names: list[str] = []
    for item in (s.strip() for s in args.scenarios.split(",") if s.strip()):
        expanded = GROUPS.get(item, (item,))
        for name in expanded:
            if name not in SCENARIOS:
                parser.error(f"unknown scenario {name!r}; choose from all, baselines, balance, {', '.join(SCENARIOS)}")
            if name not in names:
                names.append(name)
    if args.members_scaling:
        names = [n for n in names if n in SCALING_SCENARIOS] if args.scenarios != "all" else list(SCALING_SCENARIOS)
        args.sizes = sorted(int(s) for s in args.scaling_sizes.split(","))
    else:
        args.sizes = [args.members]
    args.scenario_names = [n for n in SCENARIOS if n in names]  # always in the canonical order
    if args.history < 2:
        parser.error("--history must be at least 2")
    if args.history_every_days < 1:
        parser.error("--history-every-days must be at least 1")
    if min(args.sizes) < max(args.contention_members, 2):
        parser.error("--members must be at least --contention-members")
    return args


# --- the run -------------------------------------------------------------------------------------


def _database_url(server_url: str, name: str) -> str:
    return urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))


async def _admin(server_url: str, statement: str) -> None:
    conn = await asyncpg.connect(server_url, timeout=10)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def _query(database_url: str, query: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


@contextlib.contextmanager
def _redis(redis_url: str) -> Iterator[Any]:
    """A redis-py client of the harness's Redis database, closed afterwards."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


def _redis_stats(redis_url: str) -> tuple[int, int]:
    with _redis(redis_url) as client:
        stats = client.info("stats")
        return int(stats["keyspace_hits"]), int(stats["keyspace_misses"])


def _redis_memory(redis_url: str) -> tuple[int, int]:
    """Keys in the harness's database, and the memory Redis uses in all."""
    with _redis(redis_url) as client:
        return int(client.dbsize()), int(client.info("memory")["used_memory"])


# Bytes from the WAL insert position (exact, at once); records and full-page images from the
# server's counters, which backends report at most once a second while busy and up to 10 s after
# they go idle: per request they are approximate, the part of one run that arrives late roughly
# offsetting the part of the warm-up that arrives early.
_WAL_STATS = """
    select wal_records, wal_fpi, pg_current_wal_insert_lsn() - '0/0'::pg_lsn,
           (select xact_commit + xact_rollback from pg_stat_database where datname = current_database())
    from pg_stat_wal
"""


def _wal_stats(database_url: str) -> tuple[int, int, int, int] | None:
    """The server's WAL counters (records, full-page images, bytes; PostgreSQL 14+) and the
    database's transactions (as late as the records), or None."""
    try:
        (row,) = asyncio.run(_query(database_url, _WAL_STATS))
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


def _checkpoints(database_url: str) -> tuple[int, bool] | None:
    """Checkpoints started so far, and whether one is running now; None if not readable."""
    for query in _CHECKPOINTS:
        try:
            (row,) = asyncio.run(_query(database_url, query))
        except (asyncpg.UndefinedColumnError, asyncpg.UndefinedTableError):
            continue
        except asyncpg.PostgresError:
            return None
        return int(row[0]), row[1] not in (None, "CheckpointerMain")
    return None


def _checkpoints_during(before: tuple[int, bool] | None, after: tuple[int, bool] | None) -> dict | None:
    if before is None or after is None:
        return None
    return {"started": after[0] - before[0], "running_at_start": before[1], "running_at_end": after[1]}


def _wal_per_request(before: tuple[int, ...] | None, after: tuple[int, ...] | None,
                     requests: int) -> dict[str, float] | None:  # fmt: skip
    """WAL written per request (or pgbench transaction): every write's durable cost, and full-page
    images, which grow with how many distinct pages the writes touch between checkpoints; and the
    database's transactions per request, which say how well writes share them (group commit: a
    purchase batch is two)."""
    if before is None or after is None or not requests:
        return None
    records, fpi, size, *transactions = (a - b for a, b in zip(after, before, strict=True))
    per_request = {"records": round(records / requests, 2), "full_page_images": round(fpi / requests, 3),
                   "bytes": round(size / requests)}  # fmt: skip
    if transactions:
        per_request["transactions"] = round(transactions[0] / requests, 3)
    return per_request


def _flush_redis(redis_url: str) -> None:
    with _redis(redis_url) as client:
        client.flushdb()


class Run:
    """One invocation: a database, its seeded members, and the configurations run against it."""

    def __init__(self, args: argparse.Namespace) -> None:
        from konvert.program import load_program

        self.args = args
        self.started_at = datetime.now(UTC)
        stamp = self.started_at.strftime("%Y%m%dT%H%M%SZ")
        self.output = args.output or HERE / "results" / f"{stamp}.json"
        self.artifacts = self.output.with_name(self.output.stem + "-artifacts")
        self.artifacts.mkdir(parents=True, exist_ok=True)
        self.database_name = f"konvert_bench_{secrets.token_hex(4)}"
        self.database_url = _database_url(args.pg_url, self.database_name)
        self.program = load_program(args.program_file or "")
        self.facts = seed.program_facts(self.program)
        if problem := seed.history_problem(self.facts, args.history, args.history_every_days):
            raise SystemExit(f"--history {args.history} --history-every-days {args.history_every_days}: {problem}")
        self.currency = self._currency()
        self.seeded_members = 0
        self.seed_seconds: dict[str, float] = {}
        self.pgbench_members = 0
        self.api_key = ""
        self.server: Server | None = None
        self.configs: list[dict] = []
        self.source = source_digest()

    def _currency(self) -> str:
        rates = self.program.earning.rates
        usable = [r.currency for r in rates if r.partner in (None, self.facts.partner)]
        if not usable:
            raise SystemExit(f"the program has no earning rate for partner {self.facts.partner}")
        return "EUR" if "EUR" in usable else usable[0]

    def env(self) -> dict[str, str]:
        variables = {
            "KONVERT_DATABASE_URL": self.database_url,
            "KONVERT_REDIS_URL": self.args.redis_url,
            "KONVERT_LOG_LEVEL": "warning",
            "KONVERT_JOBS_INTERVAL_SECONDS": "0",
        }
        if self.args.db_pool_max:
            variables["KONVERT_DB_POOL_MAX"] = str(self.args.db_pool_max)
        if self.args.program_file:
            variables["KONVERT_PROGRAM_FILE"] = str(Path(self.args.program_file).resolve())
        for setting in self.args.settings:
            name, _, value = setting.partition("=")
            variables[name] = value
        return konvert_env(**variables)

    def say(self, message: str) -> None:
        elapsed = (datetime.now(UTC) - self.started_at).total_seconds()
        print(f"[{elapsed:6.1f}s] {message}", flush=True)

    # -- setup ----------------------------------------------------------------------------------

    def create_database(self) -> None:
        asyncio.run(_admin(self.args.pg_url, f"create database {self.database_name}"))
        _flush_redis(self.args.redis_url)
        migrated = run_cli(self.env(), "migrate")
        if migrated.returncode != 0:
            raise RuntimeError(f"konvert migrate failed:\n{migrated.stderr}")
        created = run_cli(self.env(), "keys", "create", "--name", "loadtests", "--scope", "admin")
        if created.returncode != 0:
            raise RuntimeError(f"konvert keys create failed:\n{created.stderr}")
        self.api_key = created.stdout.strip()
        self.say(f"created database {self.database_name} and an admin key")

    def drop_database(self) -> None:
        asyncio.run(_admin(self.args.pg_url, f"drop database if exists {self.database_name} with (force)"))
        # The balances it cached (with balance_warm, every member's: ~0.8 KB each) go with it.
        _flush_redis(self.args.redis_url)

    def seed_to(self, members: int) -> None:
        if members <= self.seeded_members:
            return
        self.say(f"seeding members {self.seeded_members + 1:,}..{members:,} ({self.args.history} purchases each)")
        seconds = asyncio.run(
            seed.seed_members(self.database_url, self.seeded_members + 1, members, self.args.history, self.facts,
                              datetime.now(UTC), self.args.history_every_days)
        )  # fmt: skip
        self.seed_seconds[str(members)] = round(seconds, 1)
        self.seeded_members = members
        self.say(f"seeded in {seconds:.1f} s")

    def prepare_pgbench(self, members: int) -> None:
        if self.pgbench_members == members:
            return

        async def create() -> None:
            conn = await asyncpg.connect(self.database_url)
            try:
                await conn.execute(load.PGBENCH_TABLES)
                await conn.execute(
                    "insert into bench_balances (member) select generate_series(1, $1::bigint)", members
                )
                await conn.execute("vacuum analyze bench_balances, bench_ledger")
            finally:
                await conn.close()

        asyncio.run(create())
        self.pgbench_members = members

    def start_server(self, workers: int, label: str) -> Server:
        server = Server(self.env(), workers, self.artifacts / f"server-{label}.log")
        try:
            server.wait_ready()
        except Exception:
            server.stop()
            raise
        self.server = server
        self._fund_contention_members(server)
        return server

    def _fund_contention_members(self, server: Server) -> None:
        """Give the contention members enough points for every redemption (idempotent per member)."""
        if "redemptions" not in self.args.scenario_names:
            return
        reason = self.program.adjustments.reason_codes[0] if self.program.adjustments.reason_codes else None
        if reason is None:
            self.say("warning: the program has no adjustment reason codes; contention members keep their seeded points")
            return
        for member in range(1, self.args.contention_members + 1):
            status, body = http_json(
                "POST",
                f"{server.base_url}/v1/members/m{member}/adjustments",
                self.api_key,
                {"adjustment_id": f"loadtests-contention-m{member}", "points": CONTENTION_BALANCE_POINTS,
                 "reason_code": reason, "note": "load test: balance for redemption contention"},
            )  # fmt: skip
            if status not in (200, 201):
                raise RuntimeError(f"funding contention member m{member} failed: {status} {body}")

    # -- scenarios ------------------------------------------------------------------------------

    def wrk_env(self, scenario: str, members: int, tag: str, delay_ms: float = 0) -> dict[str, str]:
        hot = scenario == "balance_hot"
        return {
            "KONVERT_BENCH_MEMBERS": str(members),
            "KONVERT_BENCH_TAG": tag,
            "KONVERT_BENCH_API_KEY": self.api_key,
            "KONVERT_BENCH_PARTNER": self.facts.partner,
            "KONVERT_BENCH_CURRENCY": self.currency,
            # An hour ago: inside the return window (the points are pending), never in the future.
            "KONVERT_BENCH_OCCURRED_AT": (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "KONVERT_BENCH_HOT_MEMBERS": str(max(1, math.ceil(members * self.args.hot_members_percent / 100)) if hot else 0),
            "KONVERT_BENCH_HOT_SHARE": str(self.args.hot_share),
            "KONVERT_BENCH_CONTENTION_MEMBERS": str(self.args.contention_members),
            "KONVERT_BENCH_DELAY_MS": f"{delay_ms:.3f}",
            "KONVERT_BENCH_SEED": str(secrets.randbelow(1_000_000)),
        }

    def _wrk(self, scenario: str, members: int, duration: float, tag: str, delay_ms: float = 0) -> load.WrkRun:
        assert self.server is not None
        return load.run_wrk(
            HTTP_SCRIPTS[scenario],
            self.server.base_url,
            duration_s=duration,
            connections=self.args.connections,
            threads=self.args.wrk_threads,
            env=self.wrk_env(scenario, members, tag, delay_ms),
        )

    def run_http(self, scenario: str, members: int, workers: int, delay_ms: float = 0,
                 warmup: bool = True, first: bool = True) -> dict:  # fmt: skip
        """Warm up, then measure one wrk scenario with memory and CPU sampling (and a profile)."""
        assert self.server is not None
        duration = self.args.duration
        if warmup and self.args.warmup > 0:
            self._wrk(scenario, members, self.args.warmup, f"w{secrets.token_hex(3)}", delay_ms)
        tag = f"t{secrets.token_hex(4)}"
        time.sleep(METRICS_LAG_S)  # the warm-up's requests reach /metrics before "before" is taken
        quiet = self.wait_quiet()
        marks = asyncio.run(self._marks()) if scenario in WRITE_SCENARIOS else None
        hits_before = _redis_stats(self.args.redis_url)
        log_offset = self.server.log_path.stat().st_size
        spy = None
        if self.args.profile and scenario in PROFILED_SCENARIOS and delay_ms == 0 and first:
            if profile.available():
                spy_output = self.artifacts / f"profile-{scenario}-{members}m-{workers}w.txt"
                spy = (profile.start(self._profiled_pid(), duration - 1, spy_output, self.args.profile_native), spy_output)
            else:
                self.say("warning: --profile needs py-spy (pip install py-spy); not profiling")
        metrics_before = self.server.metrics()
        backlog = asyncio.run(self._vesting_backlog()) if scenario == "purchases_jobs" else None
        wal_before = _wal_stats(self.database_url) if scenario in WRITE_SCENARIOS else None
        checkpoints_before = _checkpoints(self.database_url)
        jobs = None
        try:
            with Sampler(self.server, self.database_name) as sampler:
                started = time.monotonic()
                if backlog is not None:
                    jobs = BackgroundCli(self.env(), "jobs", "run")
                    sampler.label(jobs.process.pid, "jobs")
                run = self._wrk(scenario, members, duration, tag, delay_ms)
                load_seconds = time.monotonic() - started
        except BaseException:
            if jobs is not None:  # the load failed: the jobs must not go on under what follows
                jobs.process.kill()
            raise
        result = run.as_dict()
        if jobs is not None:
            result["jobs_beside"] = self._jobs_beside(jobs, started, load_seconds, backlog)
        # The same requests as konvert timed them (request in to response out, in the worker):
        # what the client sees beyond that is queueing in the kernel and the scheduler.
        time.sleep(METRICS_LAG_S)
        metrics_after = self.server.metrics()
        if wal_before is not None:
            result["wal_per_request"] = _wal_per_request(wal_before, _wal_stats(self.database_url), run.requests)
        result["checkpoints"] = _checkpoints_during(checkpoints_before, _checkpoints(self.database_url))
        result["server_latency"] = server_latency(metrics_before, metrics_after)
        if sources := balance_read_sources(metrics_before, metrics_after):
            result["balance_read_sources"] = sources
        result["usage"] = sampler.usage.as_dict() | quiet
        result["cpu_ms_per_request"] = _cpu_ms_per_request(result)
        hits_after = _redis_stats(self.args.redis_url)
        hits, misses = hits_after[0] - hits_before[0], hits_after[1] - hits_before[1]
        result["redis_keyspace_hit_ratio"] = round(hits / (hits + misses), 3) if hits + misses else None
        result["server_log"] = self._server_log_since(log_offset)
        if run.logged_responses != run.requests:
            result["note"] = f"response log has {run.logged_responses} lines for {run.requests} responses"
        if marks is not None:
            result["writes"] = asyncio.run(self._check(run, tag, marks))
        if spy is not None:
            stderr = profile.finish(spy[0], duration)
            if spy[1].exists():
                result["profile"] = profile.summarize(spy[1]) | {"raw_stacks": str(spy[1])}
            else:
                result["profile"] = {"error": stderr.strip()[-500:]}
        kudos = result["by_kind"].get("kudos")
        if kudos and kudos["by_status"].get("404"):
            note = f"POST /v1/kudos answered 404 {kudos['by_status']['404']} times (route not there yet); counted apart"
            result["note"] = "; ".join(filter(None, [result.get("note"), note]))
            result["kudos_route_missing"] = True
        return result

    def wait_quiet(self) -> dict[str, float]:
        """Let other work on a shared machine settle before measuring; say how long that took."""
        if self.args.quiet_wait <= 0:
            return {}
        started = time.monotonic()
        foreign = wait_for_quiet(self.database_name, self.args.quiet_wait, self.args.quiet_threshold)
        waited = time.monotonic() - started
        if foreign >= self.args.quiet_threshold:
            self.say(f"  other processes still use {foreign:.0f}% of a core after {waited:.0f} s; measuring anyway")
        return {"quiet_wait_s": round(waited, 1), "foreign_cpu_before_percent": round(foreign, 1)}

    def _profiled_pid(self) -> int:
        assert self.server is not None
        workers = [pid for pid in self.server.worker_pids() if _is_worker(pid)]
        return workers[0] if workers else self.server.process.pid

    async def _vesting_backlog(self) -> int:
        """purchases_jobs: every pending lot made due now, as after a jobs outage or a return
        window ending for a busy day's purchases at once; how many that is."""
        conn = await asyncpg.connect(self.database_url)
        try:
            await conn.execute("update lots set vests_at = now() where state = 'pending' and vests_at > now()")
            return await conn.fetchval("select count(*) from lots where state = 'pending'")
        finally:
            await conn.close()

    def _jobs_beside(self, jobs: BackgroundCli, started: float, load_seconds: float, backlog: int) -> dict:
        """How ``konvert jobs run`` fared beside the load: what it vested, and when it finished
        (from its start to its exit, interpreter start-up and the other jobs' turns included)."""
        if not jobs.finished.wait(CLI_TIMEOUT_SECONDS):
            jobs.process.kill()
            jobs.finished.wait()
        seconds = jobs.ended_at - started
        counts = dict(line.split(": ", 1) for line in jobs.out.splitlines() if ": " in line)
        vested = int(counts.get("vested_lots", 0))
        if jobs.process.returncode != 0:
            self.say(f"  warning: konvert jobs run exited {jobs.process.returncode}: {jobs.err.strip()[-300:]}")
        self.say(f"  konvert jobs run beside it: vested {vested:,} of a backlog of {backlog:,} lots in {seconds:.1f} s")
        return {"backlog_lots": backlog, "vested_lots": vested, "seconds": round(seconds, 2),
                "lots_per_second": round(vested / seconds, 1) if seconds else 0.0,
                "finished_during_load": seconds <= load_seconds, "exit_code": jobs.process.returncode,
                "counts": {k: int(v) for k, v in counts.items() if v.strip().isdigit()}}  # fmt: skip

    async def _marks(self) -> checks.Marks:
        conn = await asyncpg.connect(self.database_url)
        try:
            return await checks.marks(conn)
        finally:
            await conn.close()

    async def _check(self, run: load.WrkRun, tag: str, marks: checks.Marks) -> dict:
        conn = await asyncpg.connect(self.database_url)
        try:
            return await checks.check_writes(conn, run, tag, self.facts.partner, marks)
        finally:
            await conn.close()

    def _server_log_since(self, offset: int) -> dict[str, object]:
        assert self.server is not None
        with self.server.log_path.open("rb") as log:
            log.seek(offset)
            lines = log.read().decode("utf-8", errors="replace").splitlines()
        errors = [line for line in lines if '"level":"error"' in line or "Traceback" in line]
        warnings = [line for line in lines if '"level":"warning"' in line]
        return {"lines": len(lines), "errors": len(errors), "warnings": len(warnings),
                "samples": (errors + warnings)[:3]}  # fmt: skip

    def run_pgbench(self, members: int) -> dict:
        self.prepare_pgbench(members)
        quiet = self.wait_quiet()
        wal_before = _wal_stats(self.database_url)
        checkpoints_before = _checkpoints(self.database_url)
        with Sampler(None, self.database_name) as sampler:
            run = load.run_pgbench(
                self.database_url, members=members, duration_s=self.args.duration, clients=self.args.connections,
                threads=self.args.pgbench_threads,
            )  # fmt: skip
        result = run.as_dict() | {"usage": sampler.usage.as_dict() | quiet}
        time.sleep(1)  # pgbench's backends report their WAL counters as they exit
        result["wal_per_request"] = _wal_per_request(wal_before, _wal_stats(self.database_url), run.transactions)
        result["checkpoints"] = _checkpoints_during(checkpoints_before, _checkpoints(self.database_url))
        result["cpu_ms_per_request"] = _cpu_ms_per_request(result)
        return result

    def half_load_pause(self, members: int, peak_rps: float) -> float:
        """The pause per request and connection that brings balance reads to half of the peak."""
        target = peak_rps / 2
        period_ms = self.args.connections * 1000 / target
        latency_ms = 1.0
        calibration_s = max(2.0, min(5.0, self.args.duration / 4))
        delay_ms = max(0.0, period_ms - latency_ms)
        for attempt in range(HALF_LOAD_CALIBRATIONS_MAX):
            run = self._wrk("balance_half", members, calibration_s, f"c{secrets.token_hex(3)}", delay_ms)
            achieved = run.throughput
            if achieved <= 0:
                break
            latency_ms = max(0.0, self.args.connections * 1000 / achieved - delay_ms)
            if abs(achieved / target - 1) <= HALF_LOAD_TOLERANCE and attempt > 0:
                break
            delay_ms = max(0.0, period_ms - latency_ms)
        return delay_ms

    def measure(self, scenario: str, members: int, workers: int, peak_rps: float | None = None) -> dict:
        """Run a scenario --repeat times; the median run by throughput is the result."""
        delay_ms = self.half_load_pause(members, peak_rps) if scenario == "balance_half" and peak_rps else 0.0
        runs = []
        for attempt in range(self.args.repeat):
            if scenario == "pgbench":
                runs.append(self.run_pgbench(members))
            elif scenario == "balance_uniform":
                # Uniform reads warm the balance cache as they go, so a repetition would start where
                # the previous one left off: each starts from an empty cache and its own warm-up.
                _flush_redis(self.args.redis_url)
                runs.append(self.run_http(scenario, members, workers, delay_ms=delay_ms, first=attempt == 0))
            elif scenario == "balance_warm":
                # Uniform reads once every balance is cached (`konvert cache warm` into the flushed
                # cache, beside the running service): what a read costs at any number of members
                # when Redis holds them all, where balance_uniform measures the cold cache.
                if attempt == 0:
                    _flush_redis(self.args.redis_url)
                    warmed = self.warm_cache()
                runs.append(self.run_http(scenario, members, workers, warmup=attempt == 0, first=attempt == 0)
                            | {"cache_warm": warmed})  # fmt: skip
            else:
                runs.append(self.run_http(scenario, members, workers, delay_ms=delay_ms, warmup=attempt == 0,
                                          first=attempt == 0))  # fmt: skip
        ordered = sorted(runs, key=lambda r: r["throughput_rps"])
        result = dict(ordered[(len(ordered) - 1) // 2])
        if len(runs) > 1:
            result["repetitions"] = [
                {"throughput_rps": r["throughput_rps"], "p99_ms": r["latency_ms"]["p99"],
                 "foreign_cpu_percent": r["usage"]["cpu_percent_by_group"].get("foreign"),
                 "writes_ok": r["writes"]["ok"] if "writes" in r else None}
                for r in runs
            ]  # fmt: skip
            # Every repetition's writes are checked, not only the median's.
            if any("writes" in r for r in runs):
                result["writes_all_repetitions_ok"] = all(r["writes"]["ok"] for r in runs if "writes" in r)
        if scenario == "balance_half" and peak_rps:
            result["target_rps"] = round(peak_rps / 2, 1)
            result["pause_ms_per_request"] = round(delay_ms, 2)
            result["load_fraction_of_peak"] = round(result["throughput_rps"] / peak_rps, 3)
        return result

    def run_config(self, members: int, workers: int, scenarios: list[str]) -> dict:
        label = f"{members}m-{workers}w"
        self.seed_to(members)
        config: dict = {"members": members, "workers": workers, "scenarios": {}}
        if "pgbench" in scenarios:
            # Before the service starts, so its idle pool does not share the machine with pgbench.
            self.say(f"pgbench: {self.args.connections} clients, {self.args.duration:g} s")
            config["scenarios"]["pgbench"] = self.measure("pgbench", members, workers)
        http = [s for s in scenarios if s in HTTP_SCRIPTS]
        if not http:
            if "jobs" in scenarios:
                config["jobs"], config["jobs_usage"] = self.run_jobs()
            config["correctness"] = {"nothing_lost": True, "audit_passed": self.audit()}
            return config
        self.say(f"starting konvert serve --workers {workers}")
        server = self.start_server(workers, label)
        rss_after_first = None
        try:
            for scenario in http:
                self.say(f"{scenario}: {self.args.connections} connections, {self.args.duration:g} s")
                peak = None
                if scenario == "balance_half":
                    peak = config["scenarios"].get("balance_uniform", {}).get("throughput_rps")
                    if not peak:
                        peak = self._wrk("balance_uniform", members, max(3.0, self.args.duration / 2),
                                         f"p{secrets.token_hex(3)}").throughput  # fmt: skip
                result = self.measure(scenario, members, workers, peak)
                config["scenarios"][scenario] = result
                if rss_after_first is None:
                    rss_after_first = result["usage"]["rss_end_mib"]
                self.say(
                    f"  {result['throughput_rps']:,.0f} req/s, p99 {result['latency_ms']['p99']:.1f} ms, "
                    f"non-2xx {result['errors']['non_2xx']}"
                    + (f", writes ok: {result['writes']['ok']}" if "writes" in result else "")
                )
        finally:
            server.stop()
            self.server = None
        usages = [s["usage"] for s in config["scenarios"].values() if "usage" in s and s["usage"].get("peak_rss_mib")]
        last_rss = usages[-1]["rss_end_mib"] if usages else None
        config["memory"] = {
            "peak_rss_mib": max(u["peak_rss_mib"] for u in usages),
            "peak_rss_per_process_mib": max(u["peak_rss_per_process_mib"] for u in usages),
            "rss_after_first_scenario_mib": rss_after_first,
            "rss_after_last_scenario_mib": last_rss,
            "rss_growth": round(last_rss / rss_after_first, 3) if rss_after_first and last_rss else None,
        } if usages else None  # fmt: skip
        write_checks = [
            s.get("writes_all_repetitions_ok", s["writes"]["ok"]) for s in config["scenarios"].values() if "writes" in s
        ]
        if "jobs" in scenarios:
            config["jobs"], config["jobs_usage"] = self.run_jobs()
        config["correctness"] = {
            "nothing_lost": all(write_checks),
            "audit_passed": self.audit(),
        }
        return config

    def warm_cache(self) -> dict:
        """``konvert cache warm``: how long it took, and what the cached balances take in Redis."""
        self.say("konvert cache warm")
        keys_before, used_before = _redis_memory(self.args.redis_url)
        started = time.monotonic()
        warmed = run_cli(self.env(), "cache", "warm")
        seconds = time.monotonic() - started
        if warmed.returncode != 0:
            raise SystemExit(f"konvert cache warm failed: {(warmed.stdout + warmed.stderr).strip()[-500:]}")
        keys, used = _redis_memory(self.args.redis_url)
        added, grown = keys - keys_before, used - used_before
        self.say(f"  {warmed.stdout.strip()}; Redis grew by {grown / 2**20:,.1f} MiB for {added:,} keys")
        return {"seconds": round(seconds, 1), "output": warmed.stdout.strip(), "redis_keys_added": added,
                "redis_memory_added_mib": round(grown / 2**20, 1),
                "bytes_per_key": round(grown / added) if added else None}  # fmt: skip

    def run_jobs(self) -> tuple[dict, dict]:
        """The background jobs, each until nothing is left due (harness/jobs.py), once: they
        leave every lot expired, so this comes after the write checks and before the audit.
        Returns each job's timing, and the machine's usage while they ran."""
        from harness.jobs import time_jobs

        self.say("jobs: vesting, tiers, expiry, each until nothing is due")
        with Sampler(None, self.database_name) as sampler:
            timings = asyncio.run(time_jobs(self.env()))
        for name, timing in timings.items():
            self.say(f"  {name}: {timing['settled']:,} in {timing['seconds']:.1f} s, {timing['per_second']:,.0f}/s")
        return timings, sampler.usage.as_dict()

    def audit(self) -> bool:
        self.say("konvert audit")
        started = time.monotonic()
        audited = run_cli(self.env(), "audit")
        self.audit_output = (audited.stdout + audited.stderr).strip()
        self.say(f"  {self.audit_output.splitlines()[-1] if self.audit_output else audited.returncode} "
                 f"({time.monotonic() - started:.1f} s)")  # fmt: skip
        return audited.returncode == 0

    # -- the whole run --------------------------------------------------------------------------

    def execute(self) -> dict:
        self.create_database()
        try:
            for members in self.args.sizes:
                for workers in self.args.worker_counts:
                    config = self.run_config(members, workers, self.args.scenario_names)
                    config["ratios"] = report.config_ratios(config)
                    self.configs.append(config)
        finally:
            if self.server is not None:
                self.server.stop()
            if not self.args.keep:
                self.drop_database()
            else:
                self.say(f"kept database {self.database_name} ({self.database_url})")
        return self.result()

    def result(self) -> dict:
        found = report.targets(self.configs)
        return {
            "harness": "konvert loadtests/run.py",
            "started_at": self.started_at.isoformat(timespec="seconds"),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine_info(self.args.pg_url),
            "source": self.source,
            "settings": {
                "members": self.args.sizes if self.args.members_scaling else self.args.members,
                "duration_s": self.args.duration,
                "warmup_s": self.args.warmup,
                "connections": self.args.connections,
                "workers": self.args.worker_counts,
                "wrk_threads": self.args.wrk_threads,
                "pgbench_threads": self.args.pgbench_threads,
                "scenarios": self.args.scenario_names,
                "quick": self.args.quick,
                "repeat": self.args.repeat,
                "history_purchases_per_member": self.args.history,
                "history_every_days": self.args.history_every_days,
                "hot_members_percent": self.args.hot_members_percent,
                "hot_share": self.args.hot_share,
                "contention_members": self.args.contention_members,
                "db_pool_max": self.args.db_pool_max,
                "service_settings": self.args.settings,
                "program_file": self.args.program_file or "(example program)",
                "profile": self.args.profile,
                "quiet_wait_s": self.args.quiet_wait,
                "quiet_threshold_percent": self.args.quiet_threshold,
            },
            "seed_seconds": self.seed_seconds,
            "configs": self.configs,
            "targets": [t.as_dict() for t in found],
            "nothing_lost": all(c["correctness"]["nothing_lost"] for c in self.configs),
            "audit_passed": all(c["correctness"]["audit_passed"] for c in self.configs),
            "targets_met": all(t.met for t in found if t.met is not None),
        }


def _cpu_ms_per_request(result: dict) -> dict[str, float]:
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


def _is_worker(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return b"resource_tracker" not in cmdline


def source_digest() -> dict[str, object]:
    """A digest of konvert's source and migrations, so a result names the code it measured
    (the harness does not run git; the working tree may hold uncommitted work)."""
    import hashlib

    import konvert

    package = Path(konvert.__file__).resolve().parent
    roots = [package, package.parent.parent / "sql"]
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
    "shared_buffers", "synchronous_commit", "max_wal_size", "checkpoint_timeout", "wal_compression",
)  # fmt: skip
_POSTGRES_SETTINGS = "select name, current_setting(name) as setting from pg_settings where name = any($1::text[])"


def machine_info(pg_url: str) -> dict[str, object]:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_total_kib = int(Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1])
    except (OSError, ValueError, IndexError):
        mem_total_kib = 0
    try:
        postgres = asyncio.run(_query(pg_url, "select version()"))[0][0]
        rows = asyncio.run(_query(pg_url, _POSTGRES_SETTINGS, list(POSTGRES_SETTINGS_REPORTED)))
        postgres_settings = {row["name"]: row["setting"] for row in rows}
    except Exception as exc:  # noqa: BLE001 - informational only
        postgres, postgres_settings = f"unknown ({exc})", {}
    from konvert import __version__

    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": round(mem_total_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgres": postgres,
        "postgres_settings": postgres_settings,
        "wrk": load.tool_version("wrk") if load.tool_path("wrk") else None,
        "pgbench": load.tool_version("pgbench") if load.tool_path("pgbench") else None,
        "konvert": __version__,
    }


def bad_settings(args: argparse.Namespace) -> list[str]:
    return [s for s in args.settings if not (s.startswith("KONVERT_") and "=" in s)]


def missing_tools(args: argparse.Namespace) -> list[str]:
    needed = []
    if any(s in HTTP_SCRIPTS for s in args.scenario_names):
        needed.append("wrk")
    if "pgbench" in args.scenario_names:
        needed.append("pgbench")
    return [tool for tool in needed if load.tool_path(tool) is None]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if bad := bad_settings(args):
        print(f"loadtests: --set takes KONVERT_NAME=VALUE, not {', '.join(map(repr, bad))}", file=sys.stderr)
        return 2
    if missing := missing_tools(args):
        print(f"loadtests: needs {' and '.join(missing)} (Debian: apt-get install wrk postgresql-contrib)",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        asyncio.run(_query(args.pg_url, "select 1"))
        _redis_stats(args.redis_url)
    except Exception as exc:  # noqa: BLE001 - say which server is missing, then stop
        print(f"loadtests: PostgreSQL ({args.pg_url}) and Redis ({args.redis_url}) must answer: {exc}", file=sys.stderr)
        return 2
    run = Run(args)
    run.say(
        f"konvert load test: {', '.join(f'{m:,}' for m in args.sizes)} members, workers {args.worker_counts}, "
        f"{args.connections} connections, {args.duration:g} s per scenario; scenarios {', '.join(args.scenario_names)}"
    )
    result = run.execute()
    run.output.parent.mkdir(parents=True, exist_ok=True)
    run.output.write_text(json.dumps(result, indent=2) + "\n")
    report.print_report(result)
    print(f"\nresults: {run.output}\nartifacts (server logs, profiles): {run.artifacts}")
    ok = result["nothing_lost"] and result["audit_passed"]
    if args.fail_on_targets:
        ok = ok and result["targets_met"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
