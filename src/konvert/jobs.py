"""Background jobs: vesting of pending points (later: hold timeouts, expiry).

Every service process runs them every ``jobs_interval_seconds``; ``konvert jobs run`` runs them
once (for cron, or with the in-process runner turned off). Each job works in bounded batches and
is safe to run in several processes at once.
"""

from __future__ import annotations

import asyncio
import logging
import random

from konvert.ledger.service import vest_due_lots
from konvert.services import Services

log = logging.getLogger("konvert.jobs")


async def run_once(services: Services) -> dict[str, int]:
    """Run every job until it has nothing left due (bounded by batches); return counts per job."""
    vested = 0
    for _ in range(1000):  # at most 1000 batches per run; the next run continues
        count = await vest_due_lots(services)
        vested += count
        if count < services.settings.jobs_batch_size:
            break
    return {"vested_lots": vested}


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
