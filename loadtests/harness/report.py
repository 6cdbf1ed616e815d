"""The targets of the load-test issue, as code, and the table run.py prints.

Every target is a ratio or a bound measured in one run on one machine, so the figures mean the
same on a laptop and on a server: "as fast as raw PostgreSQL here", not "N requests per second".
"""

from __future__ import annotations

from dataclasses import dataclass

# Durable purchase postings per second, against pgbench replaying konvert's own statements for a
# purchase, one transaction per purchase, at the same client count (loadtests/pgbench/purchase.sql,
# issue 24): what the service adds over its own database work. Batching purchases into one
# transaction (group commit) should make the service the faster.
PURCHASES_VS_PGBENCH_OWN_SQL_MIN = 1.0
# Balance reads (uniform over all members, cold or hot-skewed) against the service's own no-op
# endpoint.
BALANCE_VS_NOOP_MIN = 0.7
# p99 of balance reads at half of the peak balance-read throughput.
BALANCE_HALF_LOAD_P99_MAX_MS = 5.0
# Throughput with the large member count within this fraction of the small one.
MEMBERS_SCALING_TOLERANCE = 0.15
# konvert's own, beyond the issue's: one process's vesting and expiry settle lots at least as
# fast as the service posts purchases (each makes a lot), so they never fall behind.
JOBS_VS_PURCHASES_MIN = 1.0
# Signed Shopify orders/paid deliveries per second (verified, recorded in the inbox, posted as
# purchases) against plain POST /v1/purchases in the same run (issue 20).
WEBHOOKS_VS_PURCHASES_MIN = 0.8
# Events out (konvert.events): purchases while the service delivers their events to a webhook
# endpoint, against purchases without one, in the same run ...
PURCHASES_WEBHOOK_VS_PURCHASES_MIN = 0.9
# ... and the events one `konvert events publish` publishes per second (to the stream, fanned out
# and delivered to one endpoint) against the purchases the service posts per second.
PUBLISH_VS_PURCHASES_MIN = 2.0
# The checkout day (the mixed scenario: loadtests/wrk/mixed.lua's weights, below) at least this
# share of the blend of its parts measured alone in the same run: 1 / sum(weight / throughput) ...
MIXED_VS_BLEND_MIN = 0.8
MIXED_WEIGHTS = {"balance_uniform": 0.70, "purchases": 0.20, "redemptions_uniform": 0.05, "kudos": 0.05}
# ... with its p99 at full load and at half of its throughput (mixed_half) at most these.
MIXED_P99_MAX_MS = 25.0
MIXED_HALF_LOAD_P99_MAX_MS = 5.0
# A redemption and a kudos cost at most this many times a purchase's CPU (konvert's processes and
# PostgreSQL's backends, per request), over any member and on a few hot ones.
WRITE_CPU_VS_PURCHASE_MAX = 1.5
# Memory stays bounded: no service process above this, and the service's RSS at the end of the
# last scenario no more than this factor above its RSS at the end of the first one.
PEAK_RSS_PER_PROCESS_MAX_MIB = 512
RSS_GROWTH_MAX = 1.5
# The redesign's acceptance figures (every request through the web framework, /health/live too;
# one Redis client; a new ledger core): purchases per second at least this share of the commit
# before it, measured side by side in the same run (run.py --baseline-ref 89afc5e) ...
ACCEPTANCE_BASELINE_COMMIT = "89afc5e"
PURCHASES_VS_BASELINE_MIN = 0.9
# ... and uniform balance reads with every balance cached (balance_warm) at least this share of
# the no-op, both of the current install.
BALANCE_WARM_VS_NOOP_MIN = 0.7
# The member portal's overview page (a session read from Redis, the balance, the pending lots,
# a template rendered) at least this share of cached balance reads, in the same run.
PORTAL_OVERVIEW_VS_BALANCE_WARM_MIN = 0.3


@dataclass(frozen=True)
class Target:
    name: str
    value: float | None
    goal: str
    met: bool | None
    unit: str = ""
    note: str = ""

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "value": self.value,
            "goal": self.goal,
            "met": self.met,
            "unit": self.unit,
            "note": self.note,
        }


def _at_least(name: str, value: float | None, minimum: float, note: str = "") -> Target:
    """A ratio target: met when the value is at least the minimum; undecided without a value."""
    met = None if value is None else value >= minimum
    return Target(name, value, f">= {minimum}x", met, "x", note)


def _at_most(name: str, value: float | None, maximum: float, note: str = "") -> Target:
    """A ratio target: met when the value is at most the maximum; undecided without a value."""
    met = None if value is None else value <= maximum
    return Target(name, value, f"<= {maximum}x", met, "x", note)


def _rps(config: dict, scenario: str) -> float | None:
    result = config["scenarios"].get(scenario)
    return result["throughput_rps"] if result and result.get("throughput_rps") else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def config_ratios(config: dict) -> dict[str, float | None]:
    ratios = {
        # Against pgbench's raw two-statement transaction (loadtests/pgbench/ledger.sql): no target.
        "purchases_vs_pgbench": _ratio(_rps(config, "purchases"), _rps(config, "pgbench")),
        "purchases_vs_pgbench_own_sql": _ratio(_rps(config, "purchases"), _rps(config, "pgbench_own_sql")),
        "webhooks_vs_purchases": _ratio(_rps(config, "webhooks"), _rps(config, "purchases")),
        "balance_uniform_vs_noop": _ratio(_rps(config, "balance_uniform"), _rps(config, "noop")),
        "balance_hot_vs_noop": _ratio(_rps(config, "balance_hot"), _rps(config, "noop")),
        "balance_warm_vs_noop": _ratio(_rps(config, "balance_warm"), _rps(config, "noop")),
        "mixed_vs_noop": _ratio(_rps(config, "mixed"), _rps(config, "noop")),
        # Member portal overview pages against cached balance reads: rendering stays cheap.
        "portal_overview_vs_balance_warm": _ratio(_rps(config, "portal_overview"), _rps(config, "balance_warm")),
        "redemptions_vs_pgbench": _ratio(_rps(config, "redemptions"), _rps(config, "pgbench")),
        # Purchases while `konvert jobs run` vests a backlog beside them, against purchases alone.
        "purchases_jobs_vs_purchases": _ratio(_rps(config, "purchases_jobs"), _rps(config, "purchases")),
        # Lots the jobs settle per second against the purchases (each makes a lot) posted per
        # second: at 1.0x one process's jobs keep up with purchases at full load.
        "vesting_vs_purchases": _ratio(_job_rate(config, "vesting"), _rps(config, "purchases")),
        "expiry_vs_purchases": _ratio(_job_rate(config, "expiry"), _rps(config, "purchases")),
        # Purchases with the service delivering their events to an endpoint, against without one.
        "purchases_webhook_vs_purchases": _ratio(_rps(config, "purchases_webhook"), _rps(config, "purchases")),
        # Events one publisher process publishes per second against purchases posted per second.
        "publish_vs_purchases": _ratio(_publish_rate(config), _rps(config, "purchases")),
    }
    ratios |= checkout_ratios(config)
    if config.get("baseline"):
        ratios |= baseline_ratios(config, config["baseline"])
    if config.get("cluster"):
        ratios |= cluster_ratios(config, config["cluster"])
    return ratios


def checkout_ratios(config: dict) -> dict[str, float | None]:
    """The checkout day against the blend of its parts, and what a redemption and a kudos cost
    against a purchase: CPU per request of konvert and PostgreSQL, uniform over members and hot."""
    purchase = _service_cpu(config, "purchases")
    return {
        "mixed_vs_blend": _ratio(_rps(config, "mixed"), blend_rps(config)),
        "redemption_cpu_vs_purchase": _ratio(_service_cpu(config, "redemptions_uniform"), purchase),
        "redemption_hot_cpu_vs_purchase": _ratio(_service_cpu(config, "redemptions"), purchase),
        "kudos_cpu_vs_purchase": _ratio(_service_cpu(config, "kudos"), purchase),
        "kudos_hot_cpu_vs_purchase": _ratio(_service_cpu(config, "kudos_hot"), purchase),
    }


def blend_rps(config: dict) -> float | None:
    """What the checkout day would do if each request cost what it costs alone: the weighted
    harmonic mean of its parts' throughputs in this run (None unless every part ran)."""
    rates = {scenario: _rps(config, scenario) for scenario in MIXED_WEIGHTS}
    if not all(rates.values()):
        return None
    return round(1 / sum(weight / rates[scenario] for scenario, weight in MIXED_WEIGHTS.items()), 1)  # type: ignore[operator]


def _service_cpu(config: dict, scenario: str) -> float | None:
    """konvert's and PostgreSQL's CPU milliseconds per request of a scenario."""
    result = config["scenarios"].get(scenario)
    cpu = result.get("cpu_ms_per_request") if result else None
    return cpu["konvert"] + cpu["postgres"] if cpu and result.get("requests") else None


def cluster_ratios(config: dict, on_cluster: dict) -> dict[str, float | None]:
    """The current install on the Redis Cluster against on --redis-url, side by side: throughput
    of every scenario both ran, cluster / single."""
    return {
        f"{scenario}_cluster_vs_single": _ratio(_rps(on_cluster, scenario), _rps(config, scenario))
        for scenario in config["scenarios"]
        if scenario in on_cluster["scenarios"] and scenario != "pgbench"
    }


def baseline_ratios(config: dict, baseline: dict) -> dict[str, float | None]:
    """The current install against the baseline, measured side by side: throughput of every
    scenario both ran (pgbench ran once, for both) and each job's rate, current / baseline."""
    ratios = {
        f"{scenario}_vs_baseline": _ratio(_rps(config, scenario), _rps(baseline, scenario))
        for scenario in config["scenarios"]
        if scenario in baseline["scenarios"] and scenario != "pgbench"
    }
    for job in config.get("jobs") or {}:
        ratios[f"{job}_vs_baseline"] = _ratio(_job_rate(config, job), _job_rate(baseline, job))
    return ratios


def _publish_rate(config: dict) -> float | None:
    publish = config.get("publish")
    return publish["events_per_second"] if publish and publish.get("events") else None


def _job_rate(config: dict, job: str) -> float | None:
    timing = (config.get("jobs") or {}).get(job)
    return timing["per_second"] if timing and timing.get("settled") else None


def targets(configs: list[dict]) -> list[Target]:
    """The issue's targets, from each configuration and the scaling pair, and the redesign's
    acceptance figures."""
    found: list[Target] = []
    for config in configs:
        label = f"{config['members']:,} members, {config['workers']} worker(s)"
        found += _acceptance_targets(config, label)
        found += _ratio_targets(config, label)
        if half := config["scenarios"].get("balance_half"):
            value = half["latency_ms"]["p99"]
            found.append(
                Target(
                    f"balance p99 at half peak load ({label})",
                    value,
                    f"<= {BALANCE_HALF_LOAD_P99_MAX_MS} ms",
                    value <= BALANCE_HALF_LOAD_P99_MAX_MS,
                    "ms",
                    f"ran at {half['load_fraction_of_peak']:.2f} of peak ({half['throughput_rps']:.0f} req/s)"
                    + _server_p99(half),
                )
            )
        if memory := config.get("memory"):
            value = memory["peak_rss_per_process_mib"]
            growth = memory.get("rss_growth")
            met = value <= PEAK_RSS_PER_PROCESS_MAX_MIB and (growth is None or growth <= RSS_GROWTH_MAX)
            found.append(
                Target(
                    f"peak RSS per process ({label})",
                    value,
                    f"<= {PEAK_RSS_PER_PROCESS_MAX_MIB} MiB, growth <= {RSS_GROWTH_MAX}x",
                    met,
                    "MiB",
                    f"service total peak {memory['peak_rss_mib']} MiB; end/first-scenario RSS {growth}x",
                )
            )
    return found + _scaling_targets(configs)


def _acceptance_targets(config: dict, label: str) -> list[Target]:
    """The redesign's two figures, shown whether or not this run measured them."""
    ratios = config["ratios"]
    baseline = config.get("baseline")
    commit = baseline["commit"][:12] if baseline and baseline.get("commit") else ACCEPTANCE_BASELINE_COMMIT
    purchases = ratios.get("purchases_vs_baseline")
    warm = ratios.get("balance_warm_vs_noop")
    return [
        _at_least(
            f"purchases / baseline {commit} ({label})",
            purchases,
            PURCHASES_VS_BASELINE_MIN,
            _purchases_vs_baseline_note(baseline, purchases),
        ),
        _at_least(
            f"balance reads, every balance cached / no-op ({label})",
            warm,
            BALANCE_WARM_VS_NOOP_MIN,
            "the redesign's acceptance figure" if warm is not None else "needs the noop and balance_warm",
        ),
    ]


def _purchases_vs_baseline_note(baseline: dict | None, ratio: float | None) -> str:
    if baseline is None:
        return f"the redesign's acceptance figure: run with --baseline-ref {ACCEPTANCE_BASELINE_COMMIT} and purchases"
    if ratio is None:
        return "needs the purchases scenario"
    commit = baseline.get("commit") or ""
    if not commit.startswith(ACCEPTANCE_BASELINE_COMMIT):
        return f"this run's baseline is {commit[:12]}, not {ACCEPTANCE_BASELINE_COMMIT}: not the acceptance figure"
    return "the redesign's acceptance figure, measured side by side in this run"


def _ratio_targets(config: dict, label: str) -> list[Target]:
    """The issue's ratio targets this configuration measured."""
    ratios = config["ratios"]
    wanted = [
        (
            f"purchases / pgbench replaying their SQL ({label})",
            "purchases_vs_pgbench_own_sql",
            PURCHASES_VS_PGBENCH_OWN_SQL_MIN,
            "the service's group commit against one transaction per purchase",
        ),
        (
            f"signed Shopify deliveries / purchases ({label})",
            "webhooks_vs_purchases",
            WEBHOOKS_VS_PURCHASES_MIN,
            "orders/paid deliveries posted as purchases, against POST /v1/purchases",
        ),
        (f"balance reads, uniform / no-op ({label})", "balance_uniform_vs_noop", BALANCE_VS_NOOP_MIN, ""),
        (f"balance reads, hot skew / no-op ({label})", "balance_hot_vs_noop", BALANCE_VS_NOOP_MIN, ""),
        (
            f"portal overview pages / cached balance reads ({label})",
            "portal_overview_vs_balance_warm",
            PORTAL_OVERVIEW_VS_BALANCE_WARM_MIN,
            "the member portal stays cheap to render",
        ),
    ] + [
        (
            f"{job} lots / purchases per second ({label})",
            f"{job}_vs_purchases",
            JOBS_VS_PURCHASES_MIN,
            "konvert's own target: the jobs keep up with purchases",
        )
        for job in ("vesting", "expiry")
    ]
    wanted += [
        (
            f"purchases delivering events to a webhook / without one ({label})",
            "purchases_webhook_vs_purchases",
            PURCHASES_WEBHOOK_VS_PURCHASES_MIN,
            "events out: announcing every change costs the ledger little",
        ),
        (
            f"events published / purchases per second ({label})",
            "publish_vs_purchases",
            PUBLISH_VS_PURCHASES_MIN,
            "events out: one `konvert events publish` keeps up with purchases",
        ),
    ]
    found = [
        _at_least(name, ratios[key], minimum, note)
        for name, key, minimum, note in wanted
        if ratios.get(key) is not None
    ]
    return found + _checkout_targets(config, label)


def _checkout_targets(config: dict, label: str) -> list[Target]:
    """The checkout day's targets this configuration measured: against the blend, its p99 at
    full and at half load, and redemptions' and kudos' CPU against a purchase's."""
    ratios, scenarios = config["ratios"], config["scenarios"]
    found = []
    if ratios.get("mixed_vs_blend") is not None:
        blend = blend_rps(config)
        note = f"blend of its parts alone: {blend:,.0f} req/s" if blend else ""
        found.append(
            _at_least(
                f"checkout day / blend of its parts ({label})", ratios["mixed_vs_blend"], MIXED_VS_BLEND_MIN, note
            )
        )
    for scenario, maximum, what in (
        ("mixed", MIXED_P99_MAX_MS, "at full load"),
        ("mixed_half", MIXED_HALF_LOAD_P99_MAX_MS, "at half of its peak"),
    ):
        if result := scenarios.get(scenario):
            value = result["latency_ms"]["p99"]
            found.append(
                Target(
                    f"checkout day p99 {what} ({label})",
                    value,
                    f"<= {maximum:g} ms",
                    value <= maximum,
                    "ms",
                    f"{result['throughput_rps']:.0f} req/s" + _server_p99(result),
                )
            )
    for key, what in (
        ("redemption_cpu_vs_purchase", "redemption, any member"),
        ("redemption_hot_cpu_vs_purchase", "redemption, few members"),
        ("kudos_cpu_vs_purchase", "kudos, any members"),
        ("kudos_hot_cpu_vs_purchase", "kudos, few authors"),
    ):
        if ratios.get(key) is not None:
            found.append(
                _at_most(
                    f"{what}: CPU / a purchase's ({label})",
                    ratios[key],
                    WRITE_CPU_VS_PURCHASE_MAX,
                    "konvert + PostgreSQL per request",
                )
            )
    return found


def _scaling_targets(configs: list[dict]) -> list[Target]:
    """Throughput at the large member count against the small one, per worker count."""
    by_size: dict[int, dict[int, dict]] = {}
    for config in configs:
        by_size.setdefault(config["workers"], {})[config["members"]] = config
    found = []
    for workers, sizes in by_size.items():
        if len(sizes) < 2:
            continue
        small, large = sizes[min(sizes)], sizes[max(sizes)]
        for scenario in ("purchases", "mixed", "balance_uniform", "balance_hot", "balance_warm"):
            ratio = _ratio(_rps(large, scenario), _rps(small, scenario))
            if ratio is not None:
                name = f"{scenario} {large['members']:,} / {small['members']:,} members ({workers} worker(s))"
                found.append(_at_least(name, ratio, round(1 - MEMBERS_SCALING_TOLERANCE, 2)))
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
    line = (
        f"purchases_jobs: `konvert jobs run` vested {jobs['vested_lots']:,} of {jobs['backlog_lots']:,} due lots "
        f"in {jobs['seconds']:.1f} s ({jobs['lots_per_second']:,.0f}/s) "
        f"{'within' if jobs['finished_during_load'] else 'beyond'} the load; "
        f"purchase p99 {beside['latency_ms']['p99']:.1f} ms beside it"
    )
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
        _print_config(config, result["settings"])
    print()
    width = max([62, *(len(target["name"]) for target in result["targets"])])
    print(f"{'target':<{width}} {'value':>10} {'goal':>28}  status")
    for target in result["targets"]:
        status = {True: "met", False: "NOT MET", None: "-"}[target["met"]]
        value = "-" if target["value"] is None else f"{target['value']:.2f}{target['unit'] and ' ' + target['unit']}"
        print(f"{target['name']:<{width}} {value:>10} {target['goal']:>28}  {status}")
        if target["note"]:
            print(f"{'':<4}{target['note']}")
    print()
    print(
        f"nothing lost: {'yes' if result['nothing_lost'] else 'NO'}; audit: "
        f"{'passed' if result['audit_passed'] else 'FAILED'}"
    )


def table_rows(config: dict) -> list[tuple[str, dict, float | None]]:
    """(row name, scenario, ratio) per row: with a baseline, each scenario's baseline row comes
    first, as it ran, and the current row carries current / baseline; with a Redis Cluster, its
    row comes last and carries cluster / single."""
    baseline, on_cluster = config.get("baseline"), config.get("cluster")
    ratios = config.get("ratios", {})
    rows = []
    for name, scenario in config["scenarios"].items():
        if baseline and name in baseline["scenarios"]:
            rows.append((f"{name} (baseline)", baseline["scenarios"][name], None))
        rows.append((name, scenario, ratios.get(f"{name}_vs_baseline")))
        if on_cluster and name in on_cluster["scenarios"]:
            rows.append((f"{name} (cluster)", on_cluster["scenarios"][name], ratios.get(f"{name}_cluster_vs_single")))
    return rows


def _print_config(config: dict, settings: dict) -> None:
    baseline, on_cluster = config.get("baseline"), config.get("cluster")
    print()
    print(
        f"== {config['members']:,} members · {config['workers']} worker(s) · "
        f"{settings['connections']} connections · {settings['duration_s']} s per scenario"
        + (f" · against baseline {baseline['commit'][:12]}, side by side" if baseline else "")
        + (" · on a Redis Cluster too, side by side" if on_cluster else "")
    )
    rows = table_rows(config)
    width = max([16, *(len(name) for name, _, _ in rows)])
    compared = bool(baseline or on_cluster)
    header = (
        f"{'scenario':<{width}} {'req/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'srv p99':>8} "
        f"{'non-2xx':>8} {'5xx':>5} {'sock err':>8} {'peak RSS':>9} "
        + (f"{'vs base' if not on_cluster else 'ratio':>8} " if compared else "")
        + " CPU % konvert/pg/redis/loadgen/foreign/all"
    )
    print(header)
    print("-" * len(header))
    for name, scenario, vs in rows:
        vs_column = f"{_fmt_ratio(vs):>8} " if compared else ""
        print(f"{_row(name, scenario, width)}{vs_column} {_cpu(scenario.get('usage', {}))}")
    sides = [("", config)]
    sides += [("[baseline] ", baseline)] if baseline else []
    sides += [("[cluster] ", on_cluster)] if on_cluster else []
    for label, side in sides:
        for line in _side_lines(side):
            print(f"  {label}{line}")
    for suffix, title, shown in (
        ("_vs_baseline", "current / baseline", baseline),
        ("_cluster_vs_single", "Redis Cluster / single Redis", on_cluster),
    ):
        if shown:
            vs = [f"{k.removesuffix(suffix)} {v:.2f}x" for k, v in config["ratios"].items() if k.endswith(suffix) and v]
            print(f"  {title}: " + (", ".join(vs) or "-"))


def _row(name: str, scenario: dict, width: int) -> str:
    errors = scenario.get("errors", {})
    usage = scenario.get("usage", {})
    latency = scenario["latency_ms"]
    return (
        f"{name:<{width}} {_fmt(scenario['throughput_rps']):>9} {_fmt(latency['p50'], 2):>8} "
        f"{_fmt(latency['p95'], 2):>8} {_fmt(latency['p99'], 2):>8} {_le(scenario.get('server_latency')):>8} "
        f"{errors.get('non_2xx', errors.get('failed_transactions', 0)):>8} {errors.get('5xx', 0):>5} "
        f"{sum(errors.get('socket', {}).values()):>8} "
        f"{(_fmt(usage.get('peak_rss_mib'), 0) + ' MiB') if usage.get('peak_rss_mib') else '-':>9} "
    )


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _side_lines(config: dict) -> list[str]:
    """The lines under the table for one side: notes, the jobs, the ratios, correctness."""
    lines = [f"note: {name}: {s['note']}" for name, s in config["scenarios"].items() if s.get("note")]
    for name, s in config["scenarios"].items():
        foreign = s.get("usage", {}).get("cpu_percent_by_group", {}).get("foreign", 0.0)
        if foreign > FOREIGN_CPU_WARN_PERCENT:
            lines.append(f"note: {name}: other processes on the machine took {foreign:.0f}% of a core: noisy figures")
        if note := checkpoint_note(s):
            lines.append(f"note: {name}: {note}")
    if line := jobs_beside_line(config):
        lines.append(line)
    lines += jobs_lines(config)
    ratios = {
        k: v
        for k, v in config.get("ratios", {}).items()
        if v is not None and not k.endswith(("_vs_baseline", "_cluster_vs_single"))
    }
    if ratios:
        lines.append("ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    correctness = config.get("correctness", {})
    lines.append(
        f"nothing lost: {'yes' if correctness.get('nothing_lost') else 'NO'}; "
        f"audit: {'passed' if correctness.get('audit_passed') else 'FAILED'}"
    )
    return lines


def jobs_lines(config: dict) -> list[str]:
    """The jobs scenario: each job's own timed `konvert jobs run` calls, and the CLI's fixed cost."""
    lines = [
        f"jobs: {name} settled {timing['settled']:,} in {timing['seconds']:.1f} s ({timing['per_second']:,.0f}/s, "
        f"{timing.get('runs', 1)} `konvert jobs run`)"
        for name, timing in (config.get("jobs") or {}).items()
    ]
    if cli := config.get("jobs_cli"):
        lines.append(
            f"jobs: a `konvert jobs run` with nothing due took {cli['startup_seconds']:.1f} s (in each "
            f"figure above); due before them: {_counts(cli['already_due'])}"
        )
    return lines


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in counts.items() if v) or "nothing"
