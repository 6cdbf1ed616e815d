"""Running the background jobs (konvert.composition.JOBS): vesting of pending points, hold
timeouts, expiry of lots, tier re-evaluation.

Every service process runs them every ``jobs_interval_seconds``; ``konvert jobs run`` runs them
once (for cron, or with the in-process runner turned off). Each job works in bounded batches and
is safe to run in several processes at once.
"""

from __future__ import annotations

import asyncio
import logging
import random

from konvert.composition import JOBS
from konvert.services import Services

log = logging.getLogger("konvert.jobs")

# One run works at most this many rows (lots, holds, members) per job, whatever the batch size
# (a budget in batches would shrink with it); the next run continues where it stopped, so that
# one job's backlog does not keep the others waiting.
ROWS_PER_RUN_MAX = 1_000_000


async def run_once(services: Services, rows_max: int = ROWS_PER_RUN_MAX) -> dict[str, int]:
    """Run every job until a batch comes back short (nothing more is due, or the rest was
    passed over: locked, or failed) or it has worked ``rows_max`` rows or more; return counts
    per job."""
    counts: dict[str, int] = {}
    for name, job in JOBS.items():
        total = 0
        while total < rows_max:
            count = await job(services)
            total += count
            if count < services.settings.jobs_batch_size:
                break
        counts[name] = total
    return counts


async def run_forever(services: Services) -> None:
    interval = services.settings.jobs_interval_seconds
    # Spread processes out so that several workers do not all wake at the same moment.
    await asyncio.sleep(random.uniform(0, interval))
    while True:
        try:
            counts = await run_once(services)
            if any(counts.values()):
                log.info("jobs ran", extra=counts)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("jobs failed; retrying next interval")
        await asyncio.sleep(interval)
