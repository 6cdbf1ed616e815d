"""Measuring one scenario on one side (an install's running service and its database): the
warm-up, the measured load with CPU and memory sampling, konvert's own view of the same requests,
the WAL and checkpoints around it, the write checks, and the median of --repeat runs."""

from __future__ import annotations

import argparse
import asyncio
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from harness import checks, events, load, profile, stats, webhooks
from harness.cli_args import HALF_LOAD_SCENARIOS, HTTP_SCRIPTS, PGBENCH_SCENARIOS, PROFILED_SCENARIOS, WRITE_SCENARIOS
from harness.jobs import parse_counts, per_second
from harness.seed import ProgramFacts
from harness.service import (
    CLI_TIMEOUT_SECONDS,
    BackgroundCli,
    Sampler,
    ServerMetrics,
    balance_read_sources,
    server_latency,
    wait_for_quiet,
)
from harness.side import Side

# How long to wait before reading the workers' counts on /metrics: konvert records them at once,
# but older commits measured as a baseline (89afc5e) add them once a second.
METRICS_LAG_S = 1.5

# balance_half, mixed_half: how close to half of peak the paced run must land before it is measured.
HALF_LOAD_TOLERANCE = 0.1
HALF_LOAD_CALIBRATIONS_MAX = 3


@dataclass
class _Before:
    """What is read just before a measured load, to take differences after it."""

    quiet: dict[str, float]
    marks: checks.Marks | None
    redis_hits: tuple[int, int]
    log_offset: int
    metrics: ServerMetrics
    backlog: int | None
    wal: tuple[int, ...] | None
    checkpoints: tuple[int, bool] | None
    spy: tuple[object, Path] | None = None


class Measurer:
    """Runs scenarios against a side's service (wrk) or database (pgbench)."""

    def __init__(
        self, args: argparse.Namespace, facts: ProgramFacts, currency: str, artifacts: Path, say: Callable[[str], None]
    ) -> None:
        self.args = args
        self.facts = facts
        self.currency = currency
        self.artifacts = artifacts
        self.say = say
        self.pgbench_members = 0
        self._receiver: events.Receiver | None = None
        # Per side: the file of portal session cookies portal_overview's requests use.
        self.portal_sessions: dict[str, Path] = {}

    def receiver(self) -> events.Receiver:
        """The run's webhook receiver, started on first use."""
        if self._receiver is None:
            self._receiver = events.Receiver(self.artifacts / "webhook-receiver.log")
        return self._receiver

    def close(self) -> None:
        if self._receiver is not None:
            self._receiver.stop()
            self._receiver = None

    # -- wrk --------------------------------------------------------------------------------------

    def wrk_env(self, side: Side, scenario: str, members: int, tag: str, delay_ms: float = 0) -> dict[str, str]:
        hot = scenario == "balance_hot"
        shop = webhooks.wrk_env(side.shop, tag, self.currency) if scenario == "webhooks" and side.shop else {}
        return shop | {
            "KONVERT_BENCH_MEMBERS": str(members),
            "KONVERT_BENCH_TAG": tag,
            "KONVERT_BENCH_API_KEY": side.api_key,
            "KONVERT_BENCH_PARTNER": self.facts.partner,
            "KONVERT_BENCH_CURRENCY": self.currency,
            # An hour ago: inside the return window (the points are pending), never in the future.
            "KONVERT_BENCH_OCCURRED_AT": (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "KONVERT_BENCH_HOT_MEMBERS": str(
                max(1, math.ceil(members * self.args.hot_members_percent / 100)) if hot else 0
            ),
            "KONVERT_BENCH_HOT_SHARE": str(self.args.hot_share),
            "KONVERT_BENCH_CONTENTION_MEMBERS": str(self.args.contention_members),
            "KONVERT_BENCH_DELAY_MS": f"{delay_ms:.3f}",
            "KONVERT_BENCH_SEED": str(secrets.randbelow(1_000_000)),
            "KONVERT_BENCH_PORTAL_SESSIONS": str(self.portal_sessions.get(side.name, "")),
        }

    def wrk(
        self, side: Side, scenario: str, members: int, duration: float, tag: str, delay_ms: float = 0
    ) -> load.WrkRun:
        assert side.server is not None
        return load.run_wrk(
            HTTP_SCRIPTS[scenario],
            side.server.base_url,
            duration_s=duration,
            connections=self.args.connections,
            threads=self.args.wrk_threads,
            env=self.wrk_env(side, scenario, members, tag, delay_ms),
        )

    def run_http(
        self,
        side: Side,
        scenario: str,
        members: int,
        workers: int,
        delay_ms: float = 0,
        warmup: bool = True,
        first: bool = True,
        idle: tuple[int, ...] = (),
    ) -> dict:
        """Warm up, then measure one wrk scenario with memory and CPU sampling (and a profile).
        ``idle``: processes of another side's service, counted apart as idle_service."""
        assert side.server is not None
        if warmup and self.args.warmup > 0:
            self.wrk(side, scenario, members, self.args.warmup, f"w{secrets.token_hex(3)}", delay_ms)
            asyncio.run(_analyze(side.database_url))
        tag = f"t{secrets.token_hex(4)}"
        time.sleep(METRICS_LAG_S)  # the warm-up's requests reach /metrics before "before" is taken
        before = self._before(side, scenario, members, workers, profiled=delay_ms == 0 and first)
        jobs = None
        webhook = self._attach_webhook(side) if scenario == "purchases_webhook" else None
        try:
            with Sampler(side.server, side.database_name) as sampler:
                for pid in idle:
                    sampler.label(pid, "idle_service")
                if webhook is not None:
                    sampler.label(self.receiver().process.pid, "receiver")
                started = time.monotonic()
                if before.backlog is not None:
                    jobs = BackgroundCli(side.konvert, side.env(), "jobs", "run")
                    sampler.label(jobs.process.pid, "jobs")
                run = self.wrk(side, scenario, members, self.args.duration, tag, delay_ms)
                load_seconds = time.monotonic() - started
        except BaseException:
            if jobs is not None:  # the load failed: the jobs must not go on under what follows
                jobs.process.kill()
            raise
        finally:
            if webhook is not None and webhook["endpoint"]:
                webhook |= events.webhook_beside(side, self.receiver(), webhook.pop("received_before"))
                events.detach_endpoint(side)
        result = run.as_dict()
        if webhook is not None:
            result["webhook"] = webhook
        if jobs is not None:
            result["jobs_beside"] = self._jobs_beside(side, jobs, started, load_seconds, before.backlog or 0)
        result |= self._after(side, run, before, sampler)
        result["cpu_ms_per_request"] = stats.cpu_ms_per_request(result)
        if before.marks is not None:
            result["writes"] = asyncio.run(self._check(side, run, tag, before.marks))
        if before.spy is not None:
            result["profile"] = self._profile_result(before.spy)
        _note_kudos_404(result)
        return result

    def _attach_webhook(self, side: Side) -> dict:
        """purchases_webhook: the receiver registered as an endpoint; what it received and what
        is left pending are filled in (the dict) once the load ends."""
        receiver = self.receiver()
        if not events.attach_endpoint(side, receiver):
            side.say("  this install has no webhooks: purchases without an endpoint")
            return {"endpoint": False}
        return {"endpoint": True, "received_before": receiver.received()}

    def _before(self, side: Side, scenario: str, members: int, workers: int, profiled: bool) -> _Before:
        assert side.server is not None
        quiet = self.wait_quiet(side)
        writes = scenario in WRITE_SCENARIOS
        marks = asyncio.run(checks.marks_at(side.database_url)) if writes else None
        redis_hits = stats.redis_stats(side.redis_url)
        log_offset = side.server.log_path.stat().st_size
        spy = None
        if self.args.profile and scenario in PROFILED_SCENARIOS and profiled:
            spy = self._start_profile(side, f"{scenario}-{members}m-{workers}w{side.file_suffix}")
        return _Before(
            quiet=quiet,
            marks=marks,
            redis_hits=redis_hits,
            log_offset=log_offset,
            metrics=side.server.metrics(),
            backlog=asyncio.run(_vesting_backlog(side.database_url)) if scenario == "purchases_jobs" else None,
            wal=stats.wal_stats(side.database_url) if writes else None,
            checkpoints=stats.checkpoints(side.database_url),
            spy=spy,
        )

    def _after(self, side: Side, run: load.WrkRun, before: _Before, sampler: Sampler) -> dict:
        """The figures taken as differences from ``before``."""
        assert side.server is not None
        # The same requests as konvert timed them (request in to response out, in the worker):
        # what the client sees beyond that is queueing in the kernel and the scheduler.
        time.sleep(METRICS_LAG_S)
        metrics_after = side.server.metrics()
        result: dict = {}
        if before.wal is not None:
            result["wal_per_request"] = stats.wal_per_request(
                before.wal, stats.wal_stats(side.database_url), run.requests
            )
        result["checkpoints"] = stats.checkpoints_during(before.checkpoints, stats.checkpoints(side.database_url))
        result["server_latency"] = server_latency(before.metrics, metrics_after)
        if sources := balance_read_sources(before.metrics, metrics_after):
            result["balance_read_sources"] = sources
        result["usage"] = sampler.usage.as_dict() | before.quiet
        hits_after = stats.redis_stats(side.redis_url)
        hits, misses = hits_after[0] - before.redis_hits[0], hits_after[1] - before.redis_hits[1]
        result["redis_keyspace_hit_ratio"] = round(hits / (hits + misses), 3) if hits + misses else None
        result["server_log"] = _server_log_since(side, before.log_offset)
        if run.logged_responses != run.requests:
            result["note"] = f"response log has {run.logged_responses} lines for {run.requests} responses"
        return result

    def _start_profile(self, side: Side, name: str) -> tuple[object, Path] | None:
        if not profile.available():
            self.say("warning: --profile needs py-spy (pip install py-spy); not profiling")
            return None
        output = self.artifacts / f"profile-{name}.txt"
        return profile.start(_profiled_pid(side), self.args.duration - 1, output, self.args.profile_native), output

    def _profile_result(self, spy: tuple[object, Path]) -> dict:
        process, output = spy
        stderr = profile.finish(process, self.args.duration)  # type: ignore[arg-type]
        if output.exists():
            return profile.summarize(output) | {"raw_stacks": str(output)}
        return {"error": stderr.strip()[-500:]}

    def wait_quiet(self, side: Side) -> dict[str, float]:
        """Let other work on a shared machine settle before measuring; say how long that took."""
        if self.args.quiet_wait <= 0:
            return {}
        started = time.monotonic()
        foreign = wait_for_quiet(side.database_name, self.args.quiet_wait, self.args.quiet_threshold)
        waited = time.monotonic() - started
        if foreign >= self.args.quiet_threshold:
            self.say(f"  other processes still use {foreign:.0f}% of a core after {waited:.0f} s; measuring anyway")
        return {"quiet_wait_s": round(waited, 1), "foreign_cpu_before_percent": round(foreign, 1)}

    def _jobs_beside(self, side: Side, jobs: BackgroundCli, started: float, load_seconds: float, backlog: int) -> dict:
        """How ``konvert jobs run`` fared beside the load: what it vested, and when it finished
        (from its start to its exit, interpreter start-up and the other jobs' turns included)."""
        if not jobs.finished.wait(CLI_TIMEOUT_SECONDS):
            jobs.process.kill()
            jobs.finished.wait()
        seconds = jobs.ended_at - started
        counts = parse_counts(jobs.out)
        vested = counts.get("vested_lots", 0)
        if jobs.process.returncode != 0:
            side.say(f"  warning: konvert jobs run exited {jobs.process.returncode}: {jobs.err.strip()[-300:]}")
        side.say(f"  konvert jobs run beside it: vested {vested:,} of a backlog of {backlog:,} lots in {seconds:.1f} s")
        return {
            "backlog_lots": backlog,
            "vested_lots": vested,
            "seconds": round(seconds, 2),
            "lots_per_second": per_second(vested, seconds),
            "finished_during_load": seconds <= load_seconds,
            "exit_code": jobs.process.returncode,
            "counts": counts,
        }

    async def _check(self, side: Side, run: load.WrkRun, tag: str, marks: checks.Marks) -> dict:
        conn = await asyncpg.connect(side.database_url)
        try:
            return await checks.check_writes(conn, run, tag, self.facts.partner, marks)
        finally:
            await conn.close()

    # -- pgbench ----------------------------------------------------------------------------------

    def prepare_pgbench(self, side: Side, members: int) -> None:
        if self.pgbench_members == members:
            return

        async def create() -> None:
            conn = await asyncpg.connect(side.database_url)
            try:
                await conn.execute(load.PGBENCH_TABLES)
                await conn.execute("insert into bench_balances (member) select generate_series(1, $1::bigint)", members)
                await conn.execute("vacuum analyze bench_balances, bench_ledger")
            finally:
                await conn.close()

        asyncio.run(create())
        self.pgbench_members = members

    def pgbench_own_sql_variables(self, side: Side, members: int) -> dict[str, str]:
        """purchase.sql's variables: the seeded members, a tag of its own (its purchase ids are
        none of a wrk run's) and the program's partner, windows and tiers."""

        async def issued_account() -> int:
            conn = await asyncpg.connect(side.database_url)
            try:
                return await conn.fetchval(
                    "select account_id from system_accounts where asset = 'points' and name = $1",
                    f"issued:{self.facts.partner}",
                )
            finally:
                await conn.close()

        facts = self.facts
        return {
            "members": str(members),
            "tag": f"sql{secrets.token_hex(4)}",
            "n": "0",
            "partner": facts.partner,
            "issued": str(asyncio.run(issued_account())),
            "return_window_days": str(facts.return_window_days),
            "expire_after_days": str(-1 if facts.expire_after_days is None else facts.expire_after_days),
            "tier_window_days": str(facts.tier_window_days),
            "tier_names": "{" + ",".join(_array_element(name) for name in facts.tier_names) + "}",
            "tier_thresholds": "{" + ",".join(str(points) for points in facts.tier_thresholds) + "}",
        }

    def run_pgbench(self, side: Side, members: int, scenario: str = "pgbench") -> dict:
        """pgbench's raw transaction, or (pgbench_own_sql) konvert's own statements for a purchase,
        in the side's seeded database."""
        if scenario == "pgbench_own_sql":
            script, variables = load.PGBENCH_PURCHASE_SCRIPT, self.pgbench_own_sql_variables(side, members)
        else:
            self.prepare_pgbench(side, members)
            script, variables = load.PGBENCH_SCRIPT, {"members": str(members)}
        quiet = self.wait_quiet(side)
        wal_before = stats.wal_stats(side.database_url)
        checkpoints_before = stats.checkpoints(side.database_url)
        with Sampler(None, side.database_name) as sampler:
            run = load.run_pgbench(
                side.database_url,
                variables=variables,
                duration_s=self.args.duration,
                clients=self.args.connections,
                threads=self.args.pgbench_threads,
                script=script,
            )
        result = run.as_dict() | {"usage": sampler.usage.as_dict() | quiet}
        time.sleep(1)  # pgbench's backends report their WAL counters as they exit
        result["wal_per_request"] = stats.wal_per_request(
            wal_before, stats.wal_stats(side.database_url), run.transactions
        )
        result["checkpoints"] = stats.checkpoints_during(checkpoints_before, stats.checkpoints(side.database_url))
        result["cpu_ms_per_request"] = stats.cpu_ms_per_request(result)
        return result

    # -- a scenario, repeated ---------------------------------------------------------------------

    def half_load_pause(self, side: Side, scenario: str, members: int, peak_rps: float) -> float:
        """The pause per request and connection that brings ``scenario``'s load to half of the peak."""
        target = peak_rps / 2
        period_ms = self.args.connections * 1000 / target
        latency_ms = 1.0
        calibration_s = max(2.0, min(5.0, self.args.duration / 4))
        delay_ms = max(0.0, period_ms - latency_ms)
        for attempt in range(HALF_LOAD_CALIBRATIONS_MAX):
            run = self.wrk(side, scenario, members, calibration_s, f"c{secrets.token_hex(3)}", delay_ms)
            achieved = run.throughput
            if achieved <= 0:
                break
            latency_ms = max(0.0, self.args.connections * 1000 / achieved - delay_ms)
            if abs(achieved / target - 1) <= HALF_LOAD_TOLERANCE and attempt > 0:
                break
            delay_ms = max(0.0, period_ms - latency_ms)
        return delay_ms

    def peak_for_half_load(self, side: Side, scenario: str, members: int, measured: dict) -> float:
        """A half-load scenario's peak: its full-load scenario's throughput on the same side
        (balance_uniform for balance_half, mixed for mixed_half), or a short run of it."""
        full = HALF_LOAD_SCENARIOS[scenario]
        peak = measured.get(full, {}).get("throughput_rps")
        if not peak:
            peak = self.wrk(
                side, full, members, max(3.0, self.args.duration / 2), f"p{secrets.token_hex(3)}"
            ).throughput
        return peak

    def measure(
        self,
        side: Side,
        scenario: str,
        members: int,
        workers: int,
        peak_rps: float | None = None,
        idle: tuple[int, ...] = (),
    ) -> dict:
        """Run a scenario --repeat times; the median run by throughput is the result."""
        half = scenario in HALF_LOAD_SCENARIOS and peak_rps
        delay_ms = self.half_load_pause(side, scenario, members, peak_rps) if half and peak_rps else 0.0
        runs = []
        warmed: dict = {}
        for attempt in range(self.args.repeat):
            first = attempt == 0
            if scenario in PGBENCH_SCENARIOS:
                runs.append(self.run_pgbench(side, members, scenario))
            elif scenario == "balance_uniform":
                # Uniform reads warm the balance cache as they go, so a repetition would start where
                # the previous one left off: each starts from an empty cache and its own warm-up.
                stats.flush_redis(side.redis_url)
                runs.append(self.run_http(side, scenario, members, workers, delay_ms=delay_ms, first=first, idle=idle))
            elif scenario == "portal_overview":
                if first:
                    # Like balance_warm, which it is compared with: every balance cached. Then the
                    # sessions (Redis holds them too), right before the load.
                    warmed = side.warm_cache()
                    into = self.artifacts / f"{side.name}-portal-sessions.txt"
                    self.portal_sessions[side.name] = side.open_portal_sessions(members, into)
                runs.append(
                    self.run_http(side, scenario, members, workers, warmup=first, first=first, idle=idle)
                    | {"cache_warm": warmed}
                )
            elif scenario == "balance_warm":
                # Uniform reads once every balance is cached (`konvert cache warm` into the flushed
                # cache, beside the running service): what a read costs at any number of members
                # when Redis holds them all, where balance_uniform measures the cold cache.
                if first:
                    stats.flush_redis(side.redis_url)
                    warmed = side.warm_cache()
                runs.append(
                    self.run_http(side, scenario, members, workers, warmup=first, first=first, idle=idle)
                    | {"cache_warm": warmed}
                )
            else:
                runs.append(
                    self.run_http(
                        side, scenario, members, workers, delay_ms=delay_ms, warmup=first, first=first, idle=idle
                    )
                )
        result = median_run(runs)
        if half and peak_rps:
            result["target_rps"] = round(peak_rps / 2, 1)
            result["pause_ms_per_request"] = round(delay_ms, 2)
            result["load_fraction_of_peak"] = round(result["throughput_rps"] / peak_rps, 3)
        return result


def _array_element(text: str) -> str:
    """``text`` quoted as an element of a PostgreSQL array literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def median_run(runs: list[dict]) -> dict:
    """The median run by throughput, with every repetition summarized beside it."""
    ordered = sorted(runs, key=lambda r: r["throughput_rps"])
    result = dict(ordered[(len(ordered) - 1) // 2])
    if len(runs) > 1:
        result["repetitions"] = [
            {
                "throughput_rps": r["throughput_rps"],
                "p99_ms": r["latency_ms"]["p99"],
                "foreign_cpu_percent": r["usage"]["cpu_percent_by_group"].get("foreign"),
                "writes_ok": r["writes"]["ok"] if "writes" in r else None,
            }
            for r in runs
        ]
        # Every repetition's writes are checked, not only the median's.
        if any("writes" in r for r in runs):
            result["writes_all_repetitions_ok"] = all(r["writes"]["ok"] for r in runs if "writes" in r)
    return result


def _note_kudos_404(result: dict) -> None:
    kudos = result["by_kind"].get("kudos")
    if kudos and kudos["by_status"].get("404"):
        note = f"POST /v1/kudos answered 404 {kudos['by_status']['404']} times (route not there yet); counted apart"
        result["note"] = "; ".join(filter(None, [result.get("note"), note]))
        result["kudos_route_missing"] = True


def _profiled_pid(side: Side) -> int:
    assert side.server is not None
    workers = [pid for pid in side.server.worker_pids() if stats.is_worker(pid)]
    return workers[0] if workers else side.server.process.pid


def _server_log_since(side: Side, offset: int) -> dict[str, object]:
    assert side.server is not None
    with side.server.log_path.open("rb") as log:
        log.seek(offset)
        lines = log.read().decode("utf-8", errors="replace").splitlines()
    errors = [line for line in lines if '"level":"error"' in line or "Traceback" in line]
    warnings = [line for line in lines if '"level":"warning"' in line]
    return {"lines": len(lines), "errors": len(errors), "warnings": len(warnings), "samples": (errors + warnings)[:3]}


async def _vesting_backlog(url: str) -> int:
    """purchases_jobs: every pending lot made due now, as after a jobs outage or a return window
    ending for a busy day's purchases at once; how many that is."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("update lots set vests_at = now() where state = 'pending' and vests_at > now()")
        return await conn.fetchval("select count(*) from lots where state = 'pending'")
    finally:
        await conn.close()


async def _analyze(database_url: str) -> None:
    """Give the planner statistics of the tables as the warm-up left them. Tables the seed leaves
    empty (kudos, say) are otherwise planned as a few pages for the whole run: the server's cached
    plans then scan them whole, as no database that autovacuum keeps would."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("analyze")
    finally:
        await conn.close()
