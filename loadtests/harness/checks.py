"""Nothing lost, nothing doubled: every accepted write is in the database exactly once.

wrk's response log says which writes were answered 2xx (accepted), answered otherwise (refused)
or never answered (wrk stopped with them in flight). The database must hold every accepted one,
none of the refused ones, nothing that was never sent, and exactly one ledger transfer per
recorded purchase and redemption. The in-flight ones may or may not have been committed.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import asyncpg

from harness import webhooks
from harness.load import KIND_NAMES, WrkRun

IN_FLIGHT_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class Marks:
    """The highest ids before a measured run, so the checks only scan rows written after it."""

    purchase_pk: int
    transfer_id: int
    redemption_pk: int
    kudos_pk: int
    delivery_pk: int


async def marks(conn: asyncpg.Connection) -> Marks:
    row = await conn.fetchrow(
        """
        select (select coalesce(max(purchase_pk), 0) from purchases) as purchase_pk,
               (select coalesce(max(transfer_id), 0) from transfers) as transfer_id,
               (select coalesce(max(redemption_pk), 0) from redemptions) as redemption_pk,
               (select coalesce(max(kudos_pk), 0) from kudos) as kudos_pk
        """
    )
    # An install from before the webhooks inbox (a baseline commit) has no deliveries table.
    has_inbox = await conn.fetchval("select to_regclass('deliveries') is not null")
    delivery_pk = await conn.fetchval("select coalesce(max(delivery_pk), 0) from deliveries") if has_inbox else 0
    return Marks(**dict(row), delivery_pk=delivery_pk)


async def marks_at(url: str) -> Marks:
    """``marks`` on a connection of its own, for the harness's synchronous steps."""
    conn = await asyncpg.connect(url)
    try:
        return await marks(conn)
    finally:
        await conn.close()


async def wait_until_quiet(conn: asyncpg.Connection) -> None:
    """Wait until the service has no statement or transaction open (requests wrk left in flight)."""
    deadline = time.monotonic() + IN_FLIGHT_TIMEOUT_SECONDS
    quiet_since = None
    while time.monotonic() < deadline:
        busy = await conn.fetchval(
            "select count(*) from pg_stat_activity where application_name = 'konvert' and datname = current_database()"
            " and state <> 'idle'"
        )
        if busy == 0:
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= 0.5:
                return
        else:
            quiet_since = None
        await asyncio.sleep(0.1)


def _tagged_id(value: str, prefix: str) -> tuple[int, int] | None:
    """'<tag>-<thread>-<n>' -> (thread, n); None for anything else."""
    rest = value[len(prefix) :] if value.startswith(prefix) else None
    thread, _, n = (rest or "").partition("-")
    return (int(thread), int(n)) if rest is not None and thread.isdigit() and n.isdigit() else None


def _parse_ids(values: list[str], prefix: str, kind: str = "p") -> tuple[set[tuple[int, int]], list[str]]:
    """The ids a run wrote -> {(thread, n)}; anything else is returned as foreign. Shopify
    orders (kind w) are the digits of webhooks.py, the other kinds '<tag>-<thread>-<n>'."""
    parsed, foreign = set(), []
    for value in values:
        key = webhooks.parse_order_id(value, prefix) if kind == "w" else _tagged_id(value, prefix)
        if key is None:
            foreign.append(value)
        else:
            parsed.add(key)
    return parsed, foreign


def _prefix(kind: str, tag: str) -> str:
    return webhooks.order_prefix(tag) if kind == "w" else f"{tag}-"


async def _recorded(
    conn: asyncpg.Connection, kind: str, tag: str, partner: str, since: Marks
) -> tuple[list[str], list[str]]:
    """(ids of rows written, cause refs of their ledger transfers) for a write kind."""
    pattern = f"{_prefix(kind, tag)}%"
    if kind in ("p", "w"):
        rows = await conn.fetch(
            "select purchase_id from purchases where purchase_pk > $1 and partner = $2 and purchase_id like $3",
            since.purchase_pk,
            partner,
            pattern,
        )
        transfers = await conn.fetch(
            "select substr(cause_ref, length($2) + 2) from transfers where transfer_id > $1 and code = 'earn'"
            " and cause_type = 'purchase' and cause_ref like $2 || '/' || $3",
            since.transfer_id,
            partner,
            pattern,
        )
    elif kind == "r":
        rows = await conn.fetch(
            "select redemption_id from redemptions where redemption_pk > $1 and redemption_id like $2",
            since.redemption_pk,
            pattern,
        )
        transfers = await conn.fetch(
            "select cause_ref from transfers where transfer_id > $1 and cause_type = 'redemption'"
            " and code in ('redeem', 'hold') and cause_ref like $2",
            since.transfer_id,
            pattern,
        )
    elif kind == "k":
        rows = await conn.fetch(
            "select kudos_id from kudos where kudos_pk > $1 and kudos_id like $2", since.kudos_pk, pattern
        )
        return [r[0] for r in rows], []
    else:
        raise ValueError(kind)
    return [r[0] for r in rows], [r[0] for r in transfers]


async def check_writes(
    conn: asyncpg.Connection, run: WrkRun, tag: str, partner: str, since: Marks
) -> dict[str, object]:
    """Compare what wrk was told with what the database holds, per write kind in the run."""
    await wait_until_quiet(conn)
    report: dict[str, object] = {}
    ok = True
    for kind in ("p", "r", "k", "w"):
        if kind not in run.sent:
            continue
        prefix = _prefix(kind, tag)
        accepted = run.accepted.get(kind, set())
        refused = run.refused.get(kind, set())
        unanswered = run.unanswered(kind)
        row_ids, transfer_refs = await _recorded(conn, kind, tag, partner, since)
        recorded, foreign_rows = _parse_ids(row_ids, prefix, kind)
        lost = accepted - recorded
        refused_but_recorded = refused & recorded
        unexpected = recorded - accepted - refused - unanswered
        entry: dict[str, object] = {
            "sent": sum(run.sent[kind].values()),
            "accepted": len(accepted),
            "refused": len(refused),
            "unanswered_in_flight": len(unanswered),
            "recorded_rows": len(row_ids),
            "recorded_of_in_flight": len(recorded & unanswered),
            "lost": len(lost),
            "refused_but_recorded": len(refused_but_recorded),
            "unexpected_rows": len(unexpected) + len(foreign_rows),
            "duplicate_rows": len(row_ids) - len(set(row_ids)),
        }
        kind_ok = not lost and not refused_but_recorded and not unexpected and not foreign_rows
        kind_ok = kind_ok and len(row_ids) == len(set(row_ids))
        if kind != "k":
            transfers, _ = _parse_ids(transfer_refs, prefix, kind)
            entry["recorded_transfers"] = len(transfer_refs)
            # Exactly one ledger transfer per recorded row, and none without a row.
            transfers_ok = len(transfer_refs) == len(row_ids) and transfers == recorded
            entry["transfers_match_rows"] = transfers_ok
            kind_ok = kind_ok and transfers_ok
        if kind == "w":
            entry["inbox"] = inbox = await _inbox(conn, tag, since)
            # Every recorded purchase came with its delivery marked applied, in one transaction.
            inbox_ok = inbox.pop("applied_keys") == recorded and set(inbox["by_status"]) <= {"applied"}
            entry["inbox_matches_rows"] = inbox_ok
            kind_ok = kind_ok and inbox_ok
        entry["ok"] = kind_ok
        if lost:
            entry["lost_sample"] = [_written_id(kind, tag, t, n) for t, n in sorted(lost)[:10]]
        ok = ok and kind_ok
        report[KIND_NAMES[kind]] = entry
    report["ok"] = ok
    return report


def _written_id(kind: str, tag: str, thread: int, n: int) -> str:
    if kind == "w":
        return f"{webhooks.order_prefix(tag)}{thread:03d}{n:09d}"
    return f"{tag}-{thread}-{n}"


async def _inbox(conn: asyncpg.Connection, tag: str, since: Marks) -> dict:
    """The run's Shopify deliveries in the inbox: how many per status, and which were applied."""
    rows = await conn.fetch(
        "select d.delivery_key, d.status from deliveries d join integrations i using (integration_id)"
        " where d.delivery_pk > $1 and i.name = $2 and d.delivery_key like $3",
        since.delivery_pk,
        webhooks.INTEGRATION_NAME,
        f"{tag}-%",
    )
    by_status: dict[str, int] = {}
    applied = set()
    for key, status in rows:
        by_status[status] = by_status.get(status, 0) + 1
        digits = key[len(tag) + 1 :]
        if status == "applied" and len(digits) == 12 and digits.isdigit():
            applied.add((int(digits[:3]), int(digits[3:])))
    return {"rows": len(rows), "by_status": by_status, "applied_keys": applied}
