#!/usr/bin/env python
"""konvert's load-test harness: one command, one machine, every figure a ratio against a baseline
measured in the same run. See loadtests/README.md.

    python loadtests/run.py --quick                     # 2,000 members, 3 s per scenario, < 2 minutes
    python loadtests/run.py                             # 100,000 members, 20 s per scenario
    python loadtests/run.py --members-scaling           # purchases and balance reads at 10k and 1M members
    python loadtests/run.py --quick --workers 1,2,3 --scenarios baselines,purchases,balance_uniform
    python loadtests/run.py --quick --baseline-ref 89afc5e --scenarios noop,balance_warm,purchases
    python loadtests/run.py --soak 3                    # mixed load with a fault every minute

It creates its own database on the local PostgreSQL server (dropped at the end unless --keep),
uses Redis logical database 14 (flushed), seeds members with a purchase history in SQL, starts
``konvert serve`` with production settings, measures the baselines (pgbench's raw transaction,
pgbench replaying konvert's own purchase statements, the service's no-op endpoint) and the
workloads with wrk, checks that nothing was lost or doubled and that ``konvert audit`` passes,
prints a table and writes the results as JSON. With
--baseline-ref it does all of that for an older commit's install too, side by side, scenario by
scenario, and reports the current install against it.

Exit status: 0 when nothing was lost and the audit passed (and, with --fail-on-targets, every
target was met); 1 otherwise; 2 when the tools or servers it needs are missing, or the baseline
cannot be installed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import baseline, cluster, report, soak, stats  # noqa: E402
from harness.cli_args import LOCAL_CLUSTER, bad_settings, missing_tools, missing_tools_hint, parse_args  # noqa: E402
from harness.runner import Run  # noqa: E402
from harness.side import Install, current_install  # noqa: E402


def _servers_problem(pg_url: str, redis_url: str) -> str | None:
    try:
        asyncio.run(stats.query(pg_url, "select 1"))
        stats.redis_stats(redis_url)
    except Exception as exc:  # noqa: BLE001 - say which server is missing, then stop
        return f"loadtests: PostgreSQL ({pg_url}) and Redis ({redis_url}) must answer: {exc}"
    return None


def _installs(args: argparse.Namespace, say: Callable[[str], None], cluster_url: str | None) -> list[Install]:
    """The installs to measure: a baseline commit's first (built or reused), then the current one,
    then the current one on the Redis Cluster."""
    current = current_install(args.current_python)
    installs = [current]
    if args.baseline_ref:
        built = baseline.prepare(args.baseline_ref, args.baseline_cache, say)
        installs.insert(0, Install("baseline", built.python, built.commit))
    if cluster_url:
        installs.append(Install("cluster", current.python, redis_url=cluster_url))
    return installs


@contextlib.contextmanager
def _redis_cluster(args: argparse.Namespace) -> Iterator[str | None]:
    """The Redis Cluster URL of --redis-cluster: the one given, or a local cluster's while it runs."""
    if args.redis_cluster != LOCAL_CLUSTER:
        yield args.redis_cluster
        return
    with cluster.local_cluster() as url:
        print(f"loadtests: started a local Redis Cluster: {url}", flush=True)
        yield url


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, description=__doc__.split("\n\n")[0])
    if bad := bad_settings(args):
        print(f"loadtests: --set takes KONVERT_NAME=VALUE, not {', '.join(map(repr, bad))}", file=sys.stderr)
        return 2
    if missing := missing_tools(args):
        print(missing_tools_hint(missing), file=sys.stderr)
        return 2
    if args.soak is not None:  # on servers of its own
        return soak.main(args)
    if problem := _servers_problem(args.pg_url, args.redis_url):
        print(problem, file=sys.stderr)
        return 2
    with _redis_cluster(args) as cluster_url:
        if cluster_url and (problem := _servers_problem(args.pg_url, cluster_url)):
            print(problem, file=sys.stderr)
            return 2
        return _run(args, cluster_url)


def _run(args: argparse.Namespace, cluster_url: str | None) -> int:
    try:
        installs = _installs(args, lambda message: print(f"loadtests: {message}", flush=True), cluster_url)
        run = Run(args, installs)
    except baseline.BaselineError as exc:
        print(f"loadtests: no baseline: {exc}", file=sys.stderr)
        return 2
    run.say(
        f"konvert load test: {', '.join(f'{m:,}' for m in args.sizes)} members, workers {args.worker_counts}, "
        f"{args.connections} connections, {args.duration:g} s per scenario; scenarios {', '.join(args.scenario_names)}"
        + (f"; against baseline {run.baseline.install.commit[:12]}" if run.baseline else "")  # type: ignore[index]
        + (f"; and on the Redis Cluster {cluster_url}" if cluster_url else "")
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
