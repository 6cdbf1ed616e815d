"""The background jobs at full speed, through the install's own ``konvert jobs run``.

Every purchase makes a lot that vesting makes available after the return window and expiry
takes back later (unless it was spent), and every member with a tier comes up for re-evaluation
once a day, so the jobs must keep up with what the service writes. The harness makes work due in
SQL on the benchmark database (the columns the jobs read: ``lots.vests_at`` of pending lots,
``lots.expires_at`` of lots not expired, ``members.tier_evaluated_at`` of tiered members) and
times the CLI, which runs every job until nothing is left due. It imports nothing of konvert, so
it measures any install, a baseline commit's too.

One CLI call runs all jobs, so each job gets its own timed runs with only its work made due:
first an untimed run settles whatever the scenarios left due, then a run with nothing due
(the CLI's fixed cost: start-up, connections, one empty batch per job), then vesting, tier
re-evaluation and expiry in turn, each repeated while its work is still due (a run works at most a
budget of rows per job). A job's rate is what it settled over its runs' wall time, start-up
included: a lower bound, comparable with purchases per second. Expiry leaves every lot expired,
so run.py runs this last, after the write checks, and once.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass

from harness import stats
from harness.service import CLI_TIMEOUT_SECONDS, Sampler
from harness.side import Side

# How often one job's CLI run is repeated while its work is still due (the CLI's own budget is
# 1,000,000 rows per job and run: a few runs cover several million lots).
RUNS_PER_JOB_MAX = 20


@dataclass(frozen=True)
class Job:
    name: str
    # The count ``konvert jobs run`` prints for it ("vested_lots: 12").
    output_key: str
    # Makes its work due now; then counts what is due.
    make_due: str
    due: str


JOBS = (
    Job(
        "vesting",
        "vested_lots",
        "update lots set vests_at = now() where state = 'pending'",
        "select count(*) from lots where state = 'pending' and vests_at <= now()",
    ),
    Job(
        "tiers",
        "tiers_reevaluated",
        "update members set tier_evaluated_at = null where tier is not null",
        "select count(*) from members where tier is not null and tier_evaluated_at is null",
    ),
    # Last: every lot, pending or available, spent in part or not at all, ends expired.
    Job(
        "expiry",
        "expired_lots",
        "update lots set expires_at = now() where state <> 'expired' and expires_at is not null",
        "select count(*) from lots where state <> 'expired' and expires_at <= now()",
    ),
)


def parse_counts(output: str) -> dict[str, int]:
    """``konvert jobs run``'s lines "name: count" as a dict (other lines are passed over)."""
    counts = {}
    for line in output.splitlines():
        name, sep, value = line.partition(": ")
        if sep and value.strip().isdigit():
            counts[name.strip()] = int(value)
    return counts


def per_second(settled: int, seconds: float) -> float:
    return round(settled / seconds, 1) if seconds > 0 else 0.0


def _jobs_run(side: Side, sampler: Sampler) -> tuple[float, dict[str, int]]:
    """One ``konvert jobs run`` of the side's install: its wall seconds and counts."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [*side.konvert, "jobs", "run"], env=side.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    sampler.label(process.pid, "jobs")
    try:
        out, err = process.communicate(timeout=CLI_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"konvert jobs run failed ({process.returncode}):\n{(out + err).strip()[-2000:]}")
    return seconds, parse_counts(out)


def _time_job(side: Side, job: Job, sampler: Sampler) -> dict:
    """Make one job's work due, then run the CLI until none is left (or it settles nothing)."""
    stats.execute(side.database_url, job.make_due)
    due_before = int(stats.fetchval(side.database_url, job.due))
    due_after, seconds, settled, runs = due_before, 0.0, 0, 0
    others: dict[str, int] = {}
    while due_after and runs < RUNS_PER_JOB_MAX:
        run_seconds, counts = _jobs_run(side, sampler)
        runs += 1
        seconds += run_seconds
        count = counts.get(job.output_key, 0)
        settled += count
        for name, value in counts.items():
            if name != job.output_key and value:
                others[name] = others.get(name, 0) + value
        due_after = int(stats.fetchval(side.database_url, job.due))
        if not count:
            break
    return {
        "settled": settled,
        "seconds": round(seconds, 2),
        "per_second": per_second(settled, seconds),
        "runs": runs,
        "due_before": due_before,
        "due_after": due_after,
        # Anything else the same runs did (should be nothing: only this job's work was due).
        "other_counts": others,
    }


def run_jobs(side: Side) -> tuple[dict, dict, dict]:
    """Every job timed on its own (see the module's docstring). Returns each job's timing, what
    the CLI runs as a whole did (the work already due, its fixed cost, the total), and the
    machine's usage while the timed runs ran."""
    side.say("jobs: `konvert jobs run` with vesting, tiers, then expiry made due in SQL")
    with Sampler(None, side.database_name) as sampler:
        _, already_due = _jobs_run(side, sampler)
        startup_seconds, idle_counts = _jobs_run(side, sampler)
        timings = {job.name: _time_job(side, job, sampler) for job in JOBS}
    for name, timing in timings.items():
        side.say(
            f"  {name}: {timing['settled']:,} in {timing['seconds']:.1f} s ({timing['runs']} run(s)), "
            f"{timing['per_second']:,.0f}/s; {timing['due_after']:,} still due"
        )
    cli = {
        "already_due": already_due,
        "startup_seconds": round(startup_seconds, 2),
        "idle_run_counts": {k: v for k, v in idle_counts.items() if v},
        "seconds_total": round(sum(t["seconds"] for t in timings.values()), 2),
        "settled_total": sum(t["settled"] for t in timings.values()),
    }
    return timings, cli, sampler.usage.as_dict()
