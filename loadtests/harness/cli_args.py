"""run.py's options, the scenarios they choose from, and what the chosen ones need."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/14"
# --redis-cluster without a URL: the harness starts a cluster of its own (harness/cluster.py).
LOCAL_CLUSTER = "local"
LOADTESTS = Path(__file__).resolve().parent.parent
# Exported baseline commits and their virtualenvs, one directory per commit id (gitignored).
DEFAULT_BASELINE_CACHE = LOADTESTS / "results" / "baselines"

SCENARIOS = (
    "noop",
    "pgbench",
    "pgbench_own_sql",
    "balance_uniform",
    "balance_hot",
    "balance_warm",
    "balance_half",
    "portal_overview",
    "purchases",
    "webhooks",
    "redemptions",
    "redemptions_uniform",
    "kudos",
    "kudos_hot",
    "mixed",
    "mixed_half",
    "purchases_jobs",
    "purchases_webhook",
    "jobs",
    "publish",
)
GROUPS = {
    "all": SCENARIOS,
    "baselines": ("noop", "pgbench", "pgbench_own_sql"),
    "balance": ("balance_uniform", "balance_hot", "balance_warm", "balance_half"),
    # The checkout day and its parts alone, for mixed_vs_blend and the CPU per write.
    "checkout": (
        "balance_uniform",
        "purchases",
        "redemptions",
        "redemptions_uniform",
        "kudos",
        "kudos_hot",
        "mixed",
        "mixed_half",
    ),
}
# Measured with pgbench in the current side's database, before the services start: the raw
# two-statement transaction, and konvert's own statements for a purchase (one transaction each).
PGBENCH_SCENARIOS = ("pgbench", "pgbench_own_sql")
SCALING_SCENARIOS = (
    "noop",
    "pgbench",
    "pgbench_own_sql",
    "balance_uniform",
    "balance_hot",
    "balance_warm",
    "purchases",
    "mixed",
)
SCALING_SIZES = (10_000, 1_000_000)
HTTP_SCRIPTS = {
    "noop": "noop",
    "balance_uniform": "balance",
    "balance_hot": "balance",
    "balance_warm": "balance",
    "balance_half": "balance",
    # The member portal's overview page, in sessions opened before the run.
    "portal_overview": "portal",
    "purchases": "purchases",
    # Signed Shopify orders/paid deliveries: the same purchases, arriving as webhooks.
    "webhooks": "webhooks",
    # Redemptions of 1 point on --contention-members members (row-lock contention) / on any member.
    "redemptions": "redemptions",
    "redemptions_uniform": "redemptions_uniform",
    # Kudos between uniformly picked members / to --contention-members authors from any giver.
    "kudos": "kudos",
    "kudos_hot": "kudos_hot",
    "mixed": "mixed",
    # The checkout day paced to half of mixed's throughput, for the p99 at half load.
    "mixed_half": "mixed",
    # Purchases while `konvert jobs run` vests a backlog beside them.
    "purchases_jobs": "purchases",
    # Purchases while the service delivers their events to a webhook endpoint (a local receiver).
    "purchases_webhook": "purchases",
}
WRITE_SCENARIOS = (
    "purchases",
    "webhooks",
    "redemptions",
    "redemptions_uniform",
    "kudos",
    "kudos_hot",
    "mixed",
    "mixed_half",
    "purchases_jobs",
    "purchases_webhook",
)
PROFILED_SCENARIOS = (
    "purchases",
    "webhooks",
    "balance_uniform",
    "balance_hot",
    "balance_warm",
    "portal_overview",
    "redemptions",
    "redemptions_uniform",
    "kudos",
    "kudos_hot",
    "mixed",
)
# Paced to half of another scenario's throughput in the same run: scenario -> the one at full load.
HALF_LOAD_SCENARIOS = {"balance_half": "balance_uniform", "mixed_half": "mixed"}


def parse_args(argv: list[str] | None = None, description: str = "") -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="loadtests/run.py", description=description, formatter_class=argparse.RawTextHelpFormatter
    )
    _add_load_options(parser)
    _add_service_options(parser)
    _add_baseline_options(parser)
    _add_run_options(parser)
    args = parser.parse_args(argv)
    _resolve(parser, args)
    return args


def _add_load_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="2,000 members, 3 s per scenario, 1 s warm-up")
    parser.add_argument("--members", type=int, help="members to seed (default 100,000; --quick 2,000)")
    parser.add_argument("--duration", type=float, help="seconds per measured scenario (default 20; --quick 3)")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds before each scenario (default 3; --quick 1)")
    parser.add_argument("--connections", type=int, default=32, help="HTTP connections = pgbench clients (default 32)")
    parser.add_argument("--workers", default="2", help="konvert serve --workers; a list such as 1,2,3 compares them")
    parser.add_argument(
        "--wrk-threads",
        type=int,
        default=2,
        help="wrk threads (default 2: one thread limits the no-op endpoint on 2 cores)",
    )
    parser.add_argument("--pgbench-threads", type=int, default=2, help="pgbench -j (default 2)")
    parser.add_argument(
        "--scenarios",
        default="all",
        help=f"comma-separated: all, baselines, balance, checkout, {', '.join(SCENARIOS)} (default all)",
    )
    parser.add_argument(
        "--members-scaling",
        action="store_true",
        help="run baselines, purchases and balance reads at 10,000 and at 1,000,000 members (growing one database)",
    )
    parser.add_argument("--scaling-sizes", default=",".join(map(str, SCALING_SIZES)), help=argparse.SUPPRESS)
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measure each scenario this many times and report the median run (default 1)",
    )
    parser.add_argument("--history", type=int, default=3, help="seeded purchases per member (default 3, min 2)")
    parser.add_argument(
        "--history-every-days",
        type=int,
        default=30,
        help="days between a member's seeded purchases after the first (default 30; "
        "3 with --history 100: frequent shoppers, 100 purchases in the tier window)",
    )
    parser.add_argument("--hot-members-percent", type=float, default=1.0, help="balance_hot: the hot members (1%%)")
    parser.add_argument("--hot-share", type=float, default=0.9, help="balance_hot: share of reads on them (0.9)")
    parser.add_argument("--contention-members", type=int, default=8, help="redemptions: members they hit (8)")


def _add_service_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("KONVERT_BENCH_PG_URL", DEFAULT_PG_URL),
        help="a PostgreSQL server where the harness may create a database",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("KONVERT_BENCH_REDIS_URL", DEFAULT_REDIS_URL),
        help="a Redis database the harness may flush (default db 14), or a Redis Cluster\n"
        "(redis+cluster://host:port,...) whose every master it may flush",
    )
    parser.add_argument(
        "--redis-cluster",
        nargs="?",
        const=LOCAL_CLUSTER,
        metavar="URL",
        help="also run every scenario with the current install on a Redis Cluster, side by side with\n"
        "--redis-url: the one URL names (redis+cluster://host:port,...; flushed), or without URL three\n"
        "masters the harness starts on free local ports (redis-server, redis-cli) and removes at\n"
        "the end; the report adds <scenario>_cluster_vs_single (cluster / --redis-url)",
    )
    parser.add_argument("--db-pool-max", type=int, help="KONVERT_DB_POOL_MAX for the service (default: konvert's)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KONVERT_X=VALUE",
        dest="settings",
        help="a konvert setting for the service, e.g. KONVERT_WRITE_BATCH_SIZE_MAX=64 (repeatable)",
    )
    parser.add_argument("--program-file", help="KONVERT_PROGRAM_FILE for the service (default: the example program)")
    parser.add_argument(
        "--current-python",
        metavar="PYTHON",
        help="the Python whose konvert is measured as the current install (default: this interpreter,\n"
        "i.e. this checkout's); every CLI call and the server run as 'PYTHON -m konvert'",
    )


def _add_baseline_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--baseline-ref",
        metavar="REF",
        help="also measure konvert at this git commit, side by side in the same run: exported with\n"
        "'git archive' into --baseline-cache, installed in its own virtualenv (reused per commit id),\n"
        "its own database seeded alike; each scenario runs on the baseline, then on the current\n"
        "install, and the report adds <scenario>_vs_baseline (current / baseline)",
    )
    parser.add_argument(
        "--baseline-cache",
        type=Path,
        default=DEFAULT_BASELINE_CACHE,
        metavar="DIR",
        help="where baseline exports and their virtualenvs are kept (default loadtests/results/baselines)",
    )


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy a worker during purchases, webhooks and the balance reads (needs py-spy; slows them)",
    )
    parser.add_argument("--profile-native", action="store_true", help="with --profile: include C frames")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        help="before each measurement wait up to this many seconds for other work on the machine to\n"
        "drop below --quiet-threshold (default 60; --quick 0)",
    )
    parser.add_argument(
        "--quiet-threshold", type=float, default=15.0, help="%% of one core that other processes may use (default 15)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the benchmark database(s) afterwards")
    parser.add_argument("--output", type=Path, help="the JSON result (default loadtests/results/<timestamp>.json)")
    parser.add_argument("--fail-on-targets", action="store_true", help="exit 1 when a target is not met")
    parser.add_argument(
        "--soak",
        type=float,
        metavar="MINUTES",
        help="instead of the scenarios: the mixed load for MINUTES on a PostgreSQL and a Redis of the\n"
        "soak's own, with a fault every --fault-every seconds (default members 2,000)",
    )
    parser.add_argument("--fault-every", type=float, default=60.0, help="--soak: seconds between faults (60)")


def _resolve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Defaults that depend on --quick, the scenario names in canonical order, the sizes."""
    args.members = args.members or (2_000 if args.quick or args.soak else 100_000)
    args.duration = args.duration or (3.0 if args.quick else 20.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 3.0)
    args.quiet_wait = args.quiet_wait if args.quiet_wait is not None else (0.0 if args.quick else 60.0)
    args.worker_counts = [int(w) for w in str(args.workers).split(",") if w.strip()]
    try:
        names = expand_scenarios(args.scenarios)
    except ValueError as exc:
        parser.error(str(exc))
    if args.members_scaling:
        names = [n for n in names if n in SCALING_SCENARIOS] if args.scenarios != "all" else list(SCALING_SCENARIOS)
        args.sizes = sorted(int(s) for s in args.scaling_sizes.split(","))
    else:
        args.sizes = [args.members]
    args.scenario_names = [n for n in SCENARIOS if n in names]  # always in the canonical order
    if args.soak is not None:
        if args.soak <= 0 or args.fault_every <= 0:
            parser.error("--soak and --fault-every must be positive")
        args.scenario_names = ["mixed"]
    if args.history < 2:
        parser.error("--history must be at least 2")
    if args.history_every_days < 1:
        parser.error("--history-every-days must be at least 1")
    if min(args.sizes) < max(args.contention_members, 2):
        parser.error("--members must be at least --contention-members")


def expand_scenarios(text: str) -> list[str]:
    """Scenario names and groups, comma-separated, as names in the order given (no repeats)."""
    names: list[str] = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        for name in GROUPS.get(item, (item,)):
            if name not in SCENARIOS:
                choices = ", ".join((*GROUPS, *SCENARIOS))
                raise ValueError(f"unknown scenario {name!r}; choose from {choices}")
            if name not in names:
                names.append(name)
    return names


def bad_settings(args: argparse.Namespace) -> list[str]:
    return [s for s in args.settings if not (s.startswith("KONVERT_") and "=" in s)]


def missing_tools(args: argparse.Namespace) -> list[str]:
    needed = []
    if any(s in HTTP_SCRIPTS for s in args.scenario_names):
        needed.append("wrk")
    if any(s in PGBENCH_SCENARIOS for s in args.scenario_names):
        needed.append("pgbench")
    if args.baseline_ref:
        needed += ["git", "tar"]
    if args.redis_cluster == LOCAL_CLUSTER:
        needed += ["redis-server", "redis-cli"]
    return [tool for tool in needed if shutil.which(tool) is None]


def missing_tools_hint(missing: list[str]) -> str:
    debian = [
        name
        for tool, name in (
            ("wrk", "wrk"),
            ("pgbench", "postgresql-contrib"),
            ("git", "git"),
            ("tar", "tar"),
            ("redis-server", "redis-server"),
            ("redis-cli", "redis-tools"),
        )
        if tool in missing
    ]
    return f"loadtests: needs {' and '.join(missing)} (Debian: apt-get install {' '.join(debian)})"
