"""The background jobs at full speed: how fast one process vests, re-evaluates and expires.

Every purchase makes a lot that vesting makes available after the return window and expiry
takes back later (unless it was spent), and every member with a tier comes up for re-evaluation
once a day, so the jobs must keep up with what the service writes. This runs each job until
nothing is left due, as of a moment far enough ahead that everything the run seeded and wrote is
due: the jobs' own ``now`` parameter, the clock the tests move. It changes the database for
good (every lot ends expired), so run.py runs it last, after the write checks, and once.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timedelta

from konvert.ledger.service import vest_due_lots
from konvert.program import load_program
from konvert.redemption.service import expire_due_lots, reevaluate_tiers
from konvert.services import Services
from konvert.settings import load_settings

Job = Callable[[Services, datetime], Awaitable[int]]


async def time_jobs(env: Mapping[str, str]) -> dict[str, dict[str, float]]:
    """Each job, one after another in one process, as of the moment everything is due for it:
    what it settled (lots, or members for tiers), in how many seconds, and how many a second."""
    settings = load_settings(env)
    program = load_program(settings.program_file)
    services = await Services.open(settings, program)
    try:
        now = services.clock()
        points = program.points
        jobs: list[tuple[str, Job, datetime]] = [
            ("vesting", vest_due_lots, now + timedelta(days=points.return_window_days + 1)),
            # Stamped "evaluated" by the seed (or never, for members tiered by the run's purchases).
            ("tiers", reevaluate_tiers, now + timedelta(days=2)),
        ]
        if points.expire_after_days is not None:
            # After vesting: every lot, pending or available, spent in part or not at all.
            jobs.append(("expiry", expire_due_lots, now + timedelta(days=points.expire_after_days + 400)))
        timings = {}
        for name, job, at in jobs:
            started = time.perf_counter()
            settled = 0
            while count := await job(services, at):
                settled += count
            seconds = time.perf_counter() - started
            timings[name] = {
                "settled": settled,
                "seconds": round(seconds, 2),
                "per_second": round(settled / seconds, 1) if seconds else 0.0,
            }
        return timings
    finally:
        await services.close()
