"""The targets of the load-test issue, as code, and the table run.py prints.

Every target is a ratio or a bound measured in one run on one machine, so the figures mean the
same on a laptop and on a server: "as fast as raw PostgreSQL here", not "N requests per second".
"""

from __future__ import annotations

from dataclasses import dataclass

# Durable purchase postings per second, against pgbench's raw two-statement transaction at the
# same client count (loadtests/pgbench/ledger.sql).
PURCHASES_VS_PGBENCH_MIN = 1.0
# Balance reads (uniform over all members) against the service's own no-op endpoint.
BALANCE_VS_NOOP_MIN = 0.7
# p99 of balance reads at half of the peak balance-read throughput.
BALANCE_HALF_LOAD_P99_MAX_MS = 5.0
# Throughput with the large member count within this fraction of the small one.
MEMBERS_SCALING_TOLERANCE = 0.15
# konvert's own, beyond the issue's: one process's vesting and expiry settle lots at least as
# fast as the service posts purchases (each makes a lot), so they never fall behind.
JOBS_VS_PURCHASES_MIN = 1.0
# Memory stays bounded: no service process above this, and the service's RSS at the end of the
# last scenario no more than this factor above its RSS at the end of the first one.
PEAK_RSS_PER_PROCESS_MAX_MIB = 512
RSS_GROWTH_MAX = 1.5


@dataclass(frozen=True)
class Target:
    name: str
    value: float | None
    goal: str
    met: bool | None
    unit: str = ""
    note: str = ""

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "value": self.value, "goal": self.goal, "met": self.met, "unit": self.unit,
                "note": self.note}  # fmt: skip


def _rps(config: dict, scenario: str) -> float | None:
    result = config["scenarios"].get(scenario)
    return result["throughput_rps"] if result and result.get("throughput_rps") else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def config_ratios(config: dict) -> dict[str, float | None]:
    return {
        "purchases_vs_pgbench": _ratio(_rps(config, "purchases"), _rps(config, "pgbench")),
        "balance_uniform_vs_noop": _ratio(_rps(config, "balance_uniform"), _rps(config, "noop")),
        "balance_hot_vs_noop": _ratio(_rps(config, "balance_hot"), _rps(config, "noop")),
        "balance_warm_vs_noop": _ratio(_rps(config, "balance_warm"), _rps(config, "noop")),
        # Against the no-op as the framework routes it: how the ratios read before konvert
        # answered /health/live (and plain balance reads) without the framework.
        "balance_hot_vs_noop_routed": _ratio(_rps(config, "balance_hot"), _rps(config, "noop_routed")),
        "balance_uniform_vs_noop_routed": _ratio(_rps(config, "balance_uniform"), _rps(config, "noop_routed")),
        "mixed_vs_noop": _ratio(_rps(config, "mixed"), _rps(config, "noop")),
        "redemptions_vs_pgbench": _ratio(_rps(config, "redemptions"), _rps(config, "pgbench")),
        # Purchases while `konvert jobs run` vests a backlog beside them, against purchases alone.
        "purchases_jobs_vs_purchases": _ratio(_rps(config, "purchases_jobs"), _rps(config, "purchases")),
        # Lots the jobs settle per second against the purchases (each makes a lot) posted per
        # second: at 1.0x one process's jobs keep up with purchases at full load.
        "vesting_vs_purchases": _ratio(_job_rate(config, "vesting"), _rps(config, "purchases")),
        "expiry_vs_purchases": _ratio(_job_rate(config, "expiry"), _rps(config, "purchases")),
    }


def _job_rate(config: dict, job: str) -> float | None:
    timing = (config.get("jobs") or {}).get(job)
    return timing["per_second"] if timing and timing.get("settled") else None


def targets(configs: list[dict]) -> list[Target]:
    """The issue's targets, from the reference configuration (the first) and the scaling pair."""
    found: list[Target] = []
    if not configs:
        return found
    label = lambda c: f"{c['members']:,} members, {c['workers']} worker(s)"  # noqa: E731
    for config in configs:
        ratios = config["ratios"]
        if ratios["purchases_vs_pgbench"] is not None:
            value = ratios["purchases_vs_pgbench"]
            found.append(Target(f"purchases / pgbench ({label(config)})", value, f">= {PURCHASES_VS_PGBENCH_MIN}x",
                                value >= PURCHASES_VS_PGBENCH_MIN, "x"))  # fmt: skip
        if ratios["balance_uniform_vs_noop"] is not None:
            value = ratios["balance_uniform_vs_noop"]
            found.append(Target(f"balance reads, uniform / no-op ({label(config)})", value, f">= {BALANCE_VS_NOOP_MIN}x",
                                value >= BALANCE_VS_NOOP_MIN, "x"))  # fmt: skip
        if ratios["balance_hot_vs_noop"] is not None:
            value = ratios["balance_hot_vs_noop"]
            found.append(Target(f"balance reads, hot skew / no-op ({label(config)})", value,
                                f">= {BALANCE_VS_NOOP_MIN}x", value >= BALANCE_VS_NOOP_MIN, "x"))  # fmt: skip
        if ratios.get("balance_warm_vs_noop") is not None:
            value = ratios["balance_warm_vs_noop"]
            found.append(Target(f"balance reads, uniform, every balance cached / no-op ({label(config)})", value,
                                f">= {BALANCE_VS_NOOP_MIN}x", value >= BALANCE_VS_NOOP_MIN, "x"))  # fmt: skip
        for job in ("vesting", "expiry"):
            value = ratios.get(f"{job}_vs_purchases")
            if value is not None:
                found.append(Target(f"{job} lots / purchases per second ({label(config)})", value,
                                    f">= {JOBS_VS_PURCHASES_MIN}x", value >= JOBS_VS_PURCHASES_MIN, "x",
                                    "konvert's own target: the jobs keep up with purchases"))  # fmt: skip
        half = config["scenarios"].get("balance_half")
        if half:
            value = half["latency_ms"]["p99"]
            found.append(Target(
                f"balance p99 at half peak load ({label(config)})", value, f"<= {BALANCE_HALF_LOAD_P99_MAX_MS} ms",
                value <= BALANCE_HALF_LOAD_P99_MAX_MS, "ms",
                f"ran at {half['load_fraction_of_peak']:.2f} of peak ({half['throughput_rps']:.0f} req/s)"
                + _server_p99(half),
            ))  # fmt: skip
        memory = config.get("memory")
        if memory:
            value = memory["peak_rss_per_process_mib"]
            growth = memory.get("rss_growth")
            met = value <= PEAK_RSS_PER_PROCESS_MAX_MIB and (growth is None or growth <= RSS_GROWTH_MAX)
            found.append(Target(
                f"peak RSS per process ({label(config)})", value, f"<= {PEAK_RSS_PER_PROCESS_MAX_MIB} MiB, "
                f"growth <= {RSS_GROWTH_MAX}x", met, "MiB",
                f"service total peak {memory['peak_rss_mib']} MiB; end/first-scenario RSS {growth}x",
            ))  # fmt: skip
    by_size: dict[int, dict[int, dict]] = {}
    for config in configs:
        by_size.setdefault(config["workers"], {})[config["members"]] = config
    for workers, sizes in by_size.items():
        if len(sizes) < 2:
            continue
        small, large = sizes[min(sizes)], sizes[max(sizes)]
        for scenario in ("purchases", "balance_uniform", "balance_hot", "balance_warm"):
            ratio = _ratio(_rps(large, scenario), _rps(small, scenario))
            if ratio is not None:
                found.append(Target(
                    f"{scenario} {large['members']:,} / {small['members']:,} members ({workers} worker(s))", ratio,
                    f">= {1 - MEMBERS_SCALING_TOLERANCE:.2f}x", ratio >= 1 - MEMBERS_SCALING_TOLERANCE, "x",
                ))  # fmt: skip
    return found


def _server_p99(scenario: dict) -> str:
    """What konvert itself measured, beside the client's figure: tells time spent serving from
    time spent waiting for a CPU or in the kernel's queues."""
    server = scenario.get("server_latency") or {}
    if not server.get("requests"):
        return ""
    p99 = server.get("p99_le_ms")
    return f"; inside konvert p99 {'<= ' + format(p99, 'g') + ' ms' if p99 is not None else '> 2.5 s'}"


def _le(server: dict | None) -> str:
    if not server or not server.get("requests"):
        return "-"
    p99 = server.get("p99_le_ms")
    return f"<={p99:g}" if p99 is not None else ">2500"


def checkpoint_note(scenario: dict) -> str:
    """Why a write scenario's WAL and tail may be out of line: a PostgreSQL checkpoint started
    or ran during it (then the first change to each page writes the whole page to the WAL)."""
    checkpoints = scenario.get("checkpoints")
    if not checkpoints or "wal_per_request" not in scenario:
        return ""
    if checkpoints["started"]:
        what = f"{checkpoints['started']} PostgreSQL checkpoint(s) started during it"
    elif checkpoints["running_at_start"]:
        what = "a PostgreSQL checkpoint was running when it started"
    else:
        return ""
    fpi = (scenario.get("wal_per_request") or {}).get("full_page_images")
    return what + (f" ({fpi} full-page images per request)" if fpi is not None else "")


def jobs_beside_line(config: dict) -> str:
    """What purchases_jobs shows: the vesting backlog worked beside the load, and the purchases'
    p99 beside it against their p99 alone."""
    beside = config["scenarios"].get("purchases_jobs")
    if not beside or "jobs_beside" not in beside:
        return ""
    jobs = beside["jobs_beside"]
    line = (f"purchases_jobs: `konvert jobs run` vested {jobs['vested_lots']:,} of {jobs['backlog_lots']:,} due lots "
            f"in {jobs['seconds']:.1f} s ({jobs['lots_per_second']:,.0f}/s) "
            f"{'within' if jobs['finished_during_load'] else 'beyond'} the load; "
            f"purchase p99 {beside['latency_ms']['p99']:.1f} ms beside it")  # fmt: skip
    alone = config["scenarios"].get("purchases")
    if alone:
        line += f", {alone['latency_ms']['p99']:.1f} ms alone"
    return line


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _cpu(usage: dict) -> str:
    groups = usage.get("cpu_percent_by_group", {})
    if not groups:
        return "-"
    parts = [groups.get(g, 0.0) for g in ("konvert", "postgres", "redis", "loadgen", "foreign")]
    return "/".join(f"{p:.0f}" for p in parts) + f"/{usage.get('machine_cpu_percent', 0):.0f}"


# A scenario is flagged as noisy when other work on the machine took more than this (% of a core).
FOREIGN_CPU_WARN_PERCENT = 10.0


def print_report(result: dict) -> None:
    for config in result["configs"]:
        print()
        print(
            f"== {config['members']:,} members · {config['workers']} worker(s) · "
            f"{result['settings']['connections']} connections · {result['settings']['duration_s']} s per scenario"
        )
        header = (f"{'scenario':<16} {'req/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'srv p99':>8} {'non-2xx':>8} "
                  f"{'5xx':>5} {'sock err':>8} {'peak RSS':>9}  CPU % konvert/pg/redis/loadgen/foreign/all")  # fmt: skip
        print(header)
        print("-" * len(header))
        for name, s in config["scenarios"].items():
            errors = s.get("errors", {})
            usage = s.get("usage", {})
            print(
                f"{name:<16} {_fmt(s['throughput_rps']):>9} {_fmt(s['latency_ms']['p50'], 2):>8} "
                f"{_fmt(s['latency_ms']['p95'], 2):>8} {_fmt(s['latency_ms']['p99'], 2):>8} "
                f"{_le(s.get('server_latency')):>8} "
                f"{errors.get('non_2xx', errors.get('failed_transactions', 0)):>8} {errors.get('5xx', 0):>5} "
                f"{sum(errors.get('socket', {}).values()):>8} "
                f"{(_fmt(usage.get('peak_rss_mib'), 0) + ' MiB') if usage.get('peak_rss_mib') else '-':>9}  "
                f"{_cpu(usage)}"
            )
        notes = [f"{name}: {s['note']}" for name, s in config["scenarios"].items() if s.get("note")]
        for name, s in config["scenarios"].items():
            foreign = s.get("usage", {}).get("cpu_percent_by_group", {}).get("foreign", 0.0)
            if foreign > FOREIGN_CPU_WARN_PERCENT:
                notes.append(f"{name}: other processes on the machine took {foreign:.0f}% of a core: noisy figures")
            if note := checkpoint_note(s):
                notes.append(f"{name}: {note}")
        for note in notes:
            print(f"  note: {note}")
        if line := jobs_beside_line(config):
            print(f"  {line}")
        for name, timing in (config.get("jobs") or {}).items():
            print(f"  jobs: {name} settled {timing['settled']:,} in {timing['seconds']:.1f} s "
                  f"({timing['per_second']:,.0f}/s, one process)")  # fmt: skip
        ratios = {k: v for k, v in config["ratios"].items() if v is not None}
        if ratios:
            print("  ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
        correctness = config.get("correctness", {})
        print(f"  nothing lost: {'yes' if correctness.get('nothing_lost') else 'NO'}; "
              f"audit: {'passed' if correctness.get('audit_passed') else 'FAILED'}")  # fmt: skip
    print()
    print(f"{'target':<62} {'value':>10} {'goal':>28}  status")
    for target in result["targets"]:
        status = {True: "met", False: "NOT MET", None: "-"}[target["met"]]
        value = "-" if target["value"] is None else f"{target['value']:.2f}{target['unit'] and ' ' + target['unit']}"
        print(f"{target['name']:<62} {value:>10} {target['goal']:>28}  {status}")
        if target["note"]:
            print(f"{'':<4}{target['note']}")
    print()
    print(f"nothing lost: {'yes' if result['nothing_lost'] else 'NO'}; audit: "
          f"{'passed' if result['audit_passed'] else 'FAILED'}")  # fmt: skip
