"""The ledger's jobs: vesting pending points whose return window closed, and expiring lots.

Every purchase's lot comes through both, so they work in batches: one transaction finds a batch
of due lots across members (in their index's order, without a lock), locks them with their members
by uid ``for update skip locked``, and settles every lot in one statement that names the members
(konvert.ledger.batches; on Citus, each locking or writing statement goes to the batch's members'
shards only). Processes running a job at once take different members and
never wait for each other; a member that a request holds is passed over and comes up in the next
run. Members with a refund debt (which vesting repays from the lots), and every member of a batch
whose statement failed, are settled one by one through the ledger core, each with its own outcome.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg

from konvert.db import Connection
from konvert.ledger import batches, events
from konvert.ledger.accounts import EXPIRED, SystemAccounts
from konvert.ledger.book import writing

if TYPE_CHECKING:
    from konvert.services import Services

log = logging.getLogger("konvert.ledger.jobs")

# A member a job failed to settle on its own is passed over by that job's batches for a while, so
# that a member whose rows are broken does not fail every batch its lots land in (they are the
# oldest due, so they would land in every one).
RETRY_FAILED_MEMBERS_AFTER_SECONDS = 600.0

Lock = Callable[[Connection, Sequence[int]], Awaitable[list[dict[str, Any]]]]
Settle = Callable[[Connection, list[dict[str, Any]]], Awaitable[list[asyncpg.Record]]]
Alone = Callable[[int, list[int]], Awaitable[int]]


class FailedMembers:
    """Members each job failed to settle on their own, with when (this process's clock)."""

    def __init__(self, services: Services) -> None:
        self._failed: dict[str, dict[int, float]] = {}

    def passed_over(self, job: str) -> list[int]:
        failed = self._failed.setdefault(job, {})
        now = time.monotonic()
        for member_uid, failed_at in list(failed.items()):
            if now - failed_at >= RETRY_FAILED_MEMBERS_AFTER_SECONDS:
                del failed[member_uid]
        return list(failed)

    def failed(self, job: str, member_uid: int) -> None:
        self._failed.setdefault(job, {})[member_uid] = time.monotonic()


async def vest_due_lots(services: Services, now: datetime | None = None) -> int:
    """Make pending lots whose return window has closed available; return how many vested."""
    moment = now or services.clock()
    batch_size = services.settings.jobs_batch_size

    async def alone(member_uid: int, lot_ids: list[int]) -> int:
        async with writing(services) as book:
            return await book.vest(await book.member_by_uid(member_uid), lot_ids, moment)

    async def settle(conn: Connection, lots: list[dict[str, Any]]) -> list[asyncpg.Record]:
        rows = await batches.vest_locked_lots(conn, lots, moment)
        await events.insert_events(conn, [_settled(row, "points.vested", moment) for row in rows])
        return rows

    return await work_due_lots(
        services,
        "vesting",
        lock=lambda conn, passed_over: batches.lock_due_pending_lots(
            conn, moment, batch_size, passed_over, one_by_one=services.settings.lock_one_by_one
        ),
        settle=settle,
        alone=alone,
        by_itself=lambda row: row["points_debt"] > 0,
    )


async def expire_due_lots(services: Services, now: datetime | None = None) -> int:
    """Expire lots whose date has come; return the number of lots expired."""
    moment = now or services.clock()
    batch_size = services.settings.jobs_batch_size

    async def settle(conn: Connection, lots: list[dict[str, Any]]) -> list[asyncpg.Record]:
        expired_account = await services.shared(SystemAccounts).id(conn, EXPIRED)
        rows = await batches.expire_locked_lots(conn, lots, moment, expired_account)
        await events.insert_events(conn, [_settled(row, "points.expired", moment) for row in rows])
        return rows

    async def alone(member_uid: int, _: list[int]) -> int:
        async with writing(services) as book:
            return await book.expire(await book.member_by_uid(member_uid), moment)

    return await work_due_lots(
        services,
        "expiry",
        lock=lambda conn, passed_over: batches.lock_expiring_lots(
            conn, moment, batch_size, passed_over, one_by_one=services.settings.lock_one_by_one
        ),
        settle=settle,
        alone=alone,
    )


async def announce_expiring_lots(services: Services, now: datetime | None = None) -> int:
    """Announce points.expiring_soon for lots expiring within ``events_expiring_soon_days``, once
    per lot; returns how many lots."""
    days = services.settings.events_expiring_soon_days
    if days == 0:
        return 0
    moment = now or services.clock()
    until = moment + timedelta(days=days)
    async with services.pool.acquire() as conn, conn.transaction():
        rows = await batches.notice_expiring_lots(conn, moment, until, services.settings.jobs_batch_size)
        announced = [
            events.Announcement(
                row["member_uid"],
                "points.expiring_soon",
                events.PointsExpiringSoon(lot_id=row["lot_id"], points=row["points"], expires_at=row["expires_at"]),
                moment,
            )
            for row in rows
        ]
        await events.insert_events(conn, announced)
    return len(rows)


def _settled(row: asyncpg.Record, event_type: str, moment: datetime) -> events.Announcement:
    """The event of a member's lots settled by a batch (a row of konvert.ledger.batches)."""
    balance = events.Balance(available=row["points_available"], pending=row["points_pending"], held=row["points_held"])
    kind = events.PointsVested if event_type == "points.vested" else events.PointsExpired
    data = kind(points=row["points"], lot_ids=list(row["lot_ids"]), balance=balance)
    return events.Announcement(row["member_uid"], event_type, data, moment)


async def work_due_lots(
    services: Services,
    job: str,
    *,
    lock: Lock,
    settle: Settle,
    alone: Alone,
    by_itself: Callable[[dict[str, Any]], bool] = lambda row: False,
) -> int:
    """One batch of a job over due lots; return how many lots it settled.

    One transaction: ``lock`` selects the due lots (``lot_id``, ``member_uid``, ``member_id``)
    with their members locked, except the members that failed lately (konvert.ledger.batches.lock_due); ``settle``
    settles the lots and returns ``(member_uid, member_id, version, lots)`` per member whose
    balances it moved. Cached balances are invalidated after commit. The lots of members
    ``by_itself`` picks, and all of them if ``settle`` failed, then go through ``alone`` member by
    member; a member that fails there is logged and passed over by this job for
    ``RETRY_FAILED_MEMBERS_AFTER_SECONDS``.
    """
    failures = services.shared(FailedMembers)
    due: list[dict[str, Any]] = []
    async with services.pool.acquire() as conn:
        try:
            async with conn.transaction():
                due = await lock(conn, failures.passed_over(job))
                batch = [row for row in due if not by_itself(row)]
                moved = await settle(conn, batch) if batch else []
            left = [row for row in due if by_itself(row)]
        except asyncpg.PostgresError:
            if not due:
                raise
            log.exception("%s batch failed; settling its members one by one", job)
            moved, left = [], due
    await services.cache.invalidate_many((row["member_id"], row["version"]) for row in moved)
    settled: int = sum(row["lots"] for row in moved)
    by_member: dict[int, list[int]] = {}
    for row in left:
        by_member.setdefault(row["member_uid"], []).append(row["lot_id"])
    for member_uid, lot_ids in by_member.items():
        try:
            settled += await alone(member_uid, lot_ids)
        except Exception:  # logged; the member's lots stay due, and come up again later
            failures.failed(job, member_uid)
            log.exception("%s failed for a member; passing over it for a while", job, extra={"member_uid": member_uid})
    return settled
