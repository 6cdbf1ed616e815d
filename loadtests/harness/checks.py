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

from harness.load import KIND_NAMES, WrkRun

IN_FLIGHT_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class Marks:
    """The highest ids before a measured run, so the checks only scan rows written after it."""

    purchase_pk: int
    transfer_id: int
    redemption_pk: int
    kudos_pk: int


async def marks(conn: asyncpg.Connection) -> Marks:
    row = await conn.fetchrow(
        """
        select (select coalesce(max(purchase_pk), 0) from purchases) as purchase_pk,
               (select coalesce(max(transfer_id), 0) from transfers) as transfer_id,
               (select coalesce(max(redemption_pk), 0) from redemptions) as redemption_pk,
               (select coalesce(max(kudos_pk), 0) from kudos) as kudos_pk
        """
    )
    return Marks(**dict(row))


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


def _parse_ids(values: list[str], prefix: str) -> tuple[set[tuple[int, int]], list[str]]:
    """'<tag>-<thread>-<n>' -> (thread, n); anything else is returned as foreign."""
    parsed, foreign = set(), []
    for value in values:
        rest = value[len(prefix) :] if value.startswith(prefix) else None
        thread, _, n = (rest or "").partition("-")
        if rest is None or not thread.isdigit() or not n.isdigit():
            foreign.append(value)
        else:
            parsed.add((int(thread), int(n)))
    return parsed, foreign


async def _recorded(
    conn: asyncpg.Connection, kind: str, tag: str, partner: str, since: Marks
) -> tuple[list[str], list[str]]:
    """(ids of rows written, cause refs of their ledger transfers) for a write kind."""
    pattern = f"{tag}-%"
    if kind == "p":
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
    prefix = f"{tag}-"
    report: dict[str, object] = {}
    ok = True
    for kind in ("p", "r", "k"):
        if kind not in run.sent:
            continue
        accepted = run.accepted.get(kind, set())
        refused = run.refused.get(kind, set())
        unanswered = run.unanswered(kind)
        row_ids, transfer_refs = await _recorded(conn, kind, tag, partner, since)
        recorded, foreign_rows = _parse_ids(row_ids, prefix)
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
            transfers, _ = _parse_ids(transfer_refs, prefix)
            entry["recorded_transfers"] = len(transfer_refs)
            # Exactly one ledger transfer per recorded row, and none without a row.
            transfers_ok = len(transfer_refs) == len(row_ids) and transfers == recorded
            entry["transfers_match_rows"] = transfers_ok
            kind_ok = kind_ok and transfers_ok
        entry["ok"] = kind_ok
        if lost:
            entry["lost_sample"] = [f"{tag}-{t}-{n}" for t, n in sorted(lost)[:10]]
        ok = ok and kind_ok
        report[KIND_NAMES[kind]] = entry
    report["ok"] = ok
    return report
