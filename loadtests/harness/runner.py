"""One invocation of the harness: its sides (the current install, and a baseline commit's with
--baseline-ref), their databases seeded alike, and the configurations (member counts x worker
counts) run against them, scenario by scenario, the baseline first each time."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path

from harness import report, seed, stats
from harness.cli_args import HALF_LOAD_SCENARIOS, HTTP_SCRIPTS, LOADTESTS, PGBENCH_SCENARIOS
from harness.events import run_publish
from harness.jobs import run_jobs
from harness.measure import Measurer
from harness.side import Install, PortalMissing, Side


class Run:
    """One invocation: its sides, their seeded members, and the configurations run against them."""

    def __init__(self, args: argparse.Namespace, installs: list[Install]) -> None:
        from konvert.program import load_program

        self.args = args
        self.started_at = datetime.now(UTC)
        stamp = self.started_at.strftime("%Y%m%dT%H%M%SZ")
        self.output: Path = args.output or LOADTESTS / "results" / f"{stamp}.json"
        self.artifacts = self.output.with_name(self.output.stem + "-artifacts")
        self.artifacts.mkdir(parents=True, exist_ok=True)
        self.program = load_program(args.program_file or "")
        self.facts = seed.program_facts(self.program)
        if problem := seed.history_problem(self.facts, args.history, args.history_every_days):
            raise SystemExit(f"--history {args.history} --history-every-days {args.history_every_days}: {problem}")
        # Every scenario runs on each side in this order: the baseline first, then the current.
        self.sides = [Side(install, args, self.artifacts, self.say, labelled=len(installs) > 1) for install in installs]
        self.current = next(side for side in self.sides if side.name == "current")
        self.baseline = next((side for side in self.sides if side.name == "baseline"), None)
        self.cluster = next((side for side in self.sides if side.name == "cluster"), None)
        self.measurer = Measurer(args, self.facts, self._currency(), self.artifacts, self.say)
        self.configs: list[dict] = []

    def _currency(self) -> str:
        rates = self.program.earning.rates
        usable = [r.currency for r in rates if r.partner in (None, self.facts.partner)]
        if not usable:
            raise SystemExit(f"the program has no earning rate for partner {self.facts.partner}")
        return "EUR" if "EUR" in usable else usable[0]

    def _adjustment_reason(self) -> str | None:
        codes = self.program.adjustments.reason_codes
        return codes[0] if codes else None

    def say(self, message: str) -> None:
        elapsed = (datetime.now(UTC) - self.started_at).total_seconds()
        print(f"[{elapsed:6.1f}s] {message}", flush=True)

    # -- one configuration ------------------------------------------------------------------------

    def run_config(self, members: int, workers: int, scenarios: list[str]) -> dict:
        """Every chosen scenario at one member count and worker count, on every side. Returns the
        current side's configuration, with the baseline's under ``baseline``."""
        now = datetime.now(UTC)  # one seeding moment for every side: their databases hold the same rows
        for side in self.sides:
            side.seed_to(members, self.facts, now)
        configs = {side.name: {"members": members, "workers": workers, "scenarios": {}} for side in self.sides}
        for scenario in (s for s in PGBENCH_SCENARIOS if s in scenarios):
            # Before the services start, so their idle pools do not share the machine with pgbench;
            # once, in the current side's database: it measures PostgreSQL, not an install.
            self.say(f"{scenario}: {self.args.connections} clients, {self.args.duration:g} s")
            configs["current"]["scenarios"][scenario] = self.measurer.measure(self.current, scenario, members, workers)
        order: list[str] = []
        http = [s for s in scenarios if s in HTTP_SCRIPTS]
        if http:
            self._run_http(http, members, workers, configs, order)
        for side in self.sides:
            self._finish(side, configs[side.name], scenarios)
        return self._combine(configs, order)

    def _run_http(
        self, http: list[str], members: int, workers: int, configs: dict[str, dict], order: list[str]
    ) -> None:
        """The wrk scenarios with every side's service running, alternating sides per scenario."""
        try:
            for side in self.sides:
                side.start_server(workers, f"{members}m-{workers}w", self._adjustment_reason())
                if "webhooks" in http:
                    side.connect_shop(self.facts.partner)
            for scenario in http:
                for side in self.sides:
                    if scenario == "webhooks" and side.shop is None:
                        continue
                    measured = configs[side.name]["scenarios"]
                    try:
                        measured[scenario] = self._measure_http(side, scenario, members, workers, measured)
                    except PortalMissing as missing:
                        if side is self.current:
                            raise
                        side.say(f"  skipped: {missing}")
                        continue
                    order.append(f"{side.name}:{scenario}")
        finally:
            for side in self.sides:
                side.stop_server()
        for side in self.sides:
            configs[side.name]["memory"] = memory_summary(configs[side.name]["scenarios"])

    def _measure_http(self, side: Side, scenario: str, members: int, workers: int, measured: dict) -> dict:
        if self.baseline is not None:
            # One Redis for both sides: the other side's cached balances are not this side's.
            stats.flush_redis(side.redis_url)
        side.say(f"{scenario}: {self.args.connections} connections, {self.args.duration:g} s")
        half = scenario in HALF_LOAD_SCENARIOS
        peak = self.measurer.peak_for_half_load(side, scenario, members, measured) if half else None
        idle = tuple(
            pid
            for other in self.sides
            if other is not side and other.server is not None
            for pid in other.server.all_pids()
        )
        result = self.measurer.measure(side, scenario, members, workers, peak, idle)
        side.say(
            f"  {result['throughput_rps']:,.0f} req/s, p99 {result['latency_ms']['p99']:.1f} ms, "
            f"non-2xx {result['errors']['non_2xx']}"
            + (f", writes ok: {result['writes']['ok']}" if "writes" in result else "")
        )
        return result

    def _finish(self, side: Side, config: dict, scenarios: list[str]) -> None:
        """After the services stopped: publishing every event the run announced, the jobs (they
        leave every lot expired, so after the write checks), then the audit."""
        write_checks = [
            s.get("writes_all_repetitions_ok", s["writes"]["ok"]) for s in config["scenarios"].values() if "writes" in s
        ]
        if "publish" in scenarios:
            config["publish"] = run_publish(side, self.measurer.receiver())
        if "jobs" in scenarios:
            if self.baseline is not None:
                stats.flush_redis(side.redis_url)
            config["jobs"], config["jobs_cli"], config["jobs_usage"] = run_jobs(side)
        config["correctness"] = {"nothing_lost": all(write_checks), "audit_passed": side.audit()}

    def _combine(self, configs: dict[str, dict], order: list[str]) -> dict:
        current = configs["current"]
        if self.baseline is not None:
            baseline = configs["baseline"]
            # pgbench ran once, in the current side's database: the baseline's ratios use it too.
            pgbench = {s: current["scenarios"][s] for s in PGBENCH_SCENARIOS if s in current["scenarios"]}
            baseline["ratios"] = report.config_ratios(baseline | {"scenarios": pgbench | baseline["scenarios"]})
            baseline["commit"] = self.baseline.install.commit
            current["baseline"] = baseline
        if self.cluster is not None:
            on_cluster = configs["cluster"]
            on_cluster["ratios"] = report.config_ratios(on_cluster)
            on_cluster["redis_url"] = self.cluster.redis_url
            current["cluster"] = on_cluster
        if len(self.sides) > 1:
            current["measured_order"] = order
        current["ratios"] = report.config_ratios(current)
        return current

    # -- the whole run ----------------------------------------------------------------------------

    def execute(self) -> dict:
        created: list[Side] = []
        try:
            for side in self.sides:
                side.create_database()
                created.append(side)
            for members in self.args.sizes:
                for workers in self.args.worker_counts:
                    self.configs.append(self.run_config(members, workers, self.args.scenario_names))
        finally:
            self.measurer.close()
            for side in self.sides:
                side.stop_server()
            for side in created:
                if not self.args.keep:
                    side.drop_database()
                else:
                    side.say(f"kept database {side.database_name} ({side.database_url})")
        return self.result()

    def result(self) -> dict:
        found = report.targets(self.configs)
        every = [*self.configs, *(c[side] for c in self.configs for side in ("baseline", "cluster") if side in c)]
        result = {
            "harness": "konvert loadtests/run.py",
            "started_at": self.started_at.isoformat(timespec="seconds"),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": stats.machine_info(self.args.pg_url, self.current.source.get("konvert_version")),
            "source": self.current.source,
            "settings": self.settings(),
            "seed_seconds": self.current.seed_seconds,
            "configs": self.configs,
            "targets": [t.as_dict() for t in found],
            "nothing_lost": all(c["correctness"]["nothing_lost"] for c in every),
            "audit_passed": all(c["correctness"]["audit_passed"] for c in every),
            "targets_met": all(t.met for t in found if t.met is not None),
        }
        if (baseline := self.baseline) is not None:
            result["baseline"] = {
                "ref": self.args.baseline_ref,
                "commit": baseline.install.commit,
                "source": baseline.source,
                "seed_seconds": baseline.seed_seconds,
            }
        return result

    def settings(self) -> dict[str, object]:
        args = self.args
        return {
            "members": args.sizes if args.members_scaling else args.members,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "connections": args.connections,
            "workers": args.worker_counts,
            "wrk_threads": args.wrk_threads,
            "pgbench_threads": args.pgbench_threads,
            "scenarios": args.scenario_names,
            "quick": args.quick,
            "repeat": args.repeat,
            "history_purchases_per_member": args.history,
            "history_every_days": args.history_every_days,
            "hot_members_percent": args.hot_members_percent,
            "hot_share": args.hot_share,
            "contention_members": args.contention_members,
            "db_pool_max": args.db_pool_max,
            "service_settings": args.settings,
            "program_file": args.program_file or "(example program)",
            "profile": args.profile,
            "quiet_wait_s": args.quiet_wait,
            "quiet_threshold_percent": args.quiet_threshold,
            "baseline_ref": args.baseline_ref,
            "redis_url": args.redis_url,
            "redis_cluster": self.cluster.redis_url if self.cluster else None,
            "current_python": self.current.install.python,
        }


def memory_summary(scenarios: dict[str, dict]) -> dict | None:
    """The service's memory over the scenarios that ran with it: its peaks, and its RSS after the
    last scenario against after the first (growth)."""
    usages = [s["usage"] for s in scenarios.values() if "usage" in s and s["usage"].get("peak_rss_mib")]
    if not usages:
        return None
    first, last = usages[0]["rss_end_mib"], usages[-1]["rss_end_mib"]
    return {
        "peak_rss_mib": max(u["peak_rss_mib"] for u in usages),
        "peak_rss_per_process_mib": max(u["peak_rss_per_process_mib"] for u in usages),
        "rss_after_first_scenario_mib": first,
        "rss_after_last_scenario_mib": last,
        "rss_growth": round(last / first, 3) if first and last else None,
    }
