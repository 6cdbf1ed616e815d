"""A member's export (right of access and portability) and erasure (right to be forgotten)."""

from __future__ import annotations

import logging
import secrets
from datetime import datetime
from typing import TYPE_CHECKING, Any

import msgspec

from konvert import errors
from konvert.auth import Principal
from konvert.cache import ABOVE_ANY_VERSION
from konvert.db import Connection
from konvert.earning import store as earning_store
from konvert.events import privacy as events_privacy
from konvert.integrations import privacy as integrations_privacy
from konvert.ledger import events, reads
from konvert.ledger.balances import activity_item
from konvert.ledger.book import writing
from konvert.preferences import store as preferences_store
from konvert.preferences.model import ExportAward, PrivacyLogEntry
from konvert.preferences.service import PREFERENCES_MAX, consent_states, preference_item
from konvert.privacy.model import (
    Export,
    ExportAdjustment,
    ExportBalances,
    ExportLot,
    ExportMember,
    ExportPurchase,
    ExportRedemption,
    ExportRefund,
)
from konvert.redemption import store as redemption_store
from konvert.reputation import privacy as reputation_privacy

if TYPE_CHECKING:
    from konvert.services import Services

log = logging.getLogger("konvert.privacy")

EXPORT_FORMAT = "konvert.member-export/1"
# Each list in an export holds at most this many rows; `truncated` names the lists cut short.
EXPORT_ROWS_MAX = 100_000
PSEUDONYM_PREFIX = "erased-"

_decode = msgspec.json.decode


async def export(services: Services, member_id: str, principal: Principal) -> Export:
    """Everything konvert holds on the member, read in one snapshot; the export itself is logged.

    The snapshot is read only and takes no row lock, so the member's purchases go on beside it
    and cannot make it fail. The export is logged afterwards, in a transaction of its own, and
    that entry ends the privacy log it returns."""
    now = services.clock()
    async with services.pool.acquire() as conn:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            member_uid = await reads.select_live_member_uid(conn, member_id)
            if member_uid is None:
                raise errors.MemberNotFound(f"no member {member_id!r}")
            sections = await _sections(services, conn, member_uid)
        log_id = await _log(conn, member_uid, "exported", principal, now)
    sections["privacy_log"].append(
        PrivacyLogEntry(
            log_id=log_id,
            kind="exported",
            subject=None,
            old_value=None,
            new_value=None,
            points=0,
            client=principal.name,
            created_at=now,
        )
    )
    return Export(format=EXPORT_FORMAT, exported_at=now, **sections)


async def _sections(services: Services, conn: Connection, member_uid: int) -> dict[str, Any]:
    limit = EXPORT_ROWS_MAX + 1
    truncated: list[str] = []

    def bounded(name: str, rows: list[Any]) -> list[Any]:
        if len(rows) > EXPORT_ROWS_MAX:
            truncated.append(name)
        return rows[:EXPORT_ROWS_MAX]

    member = await reads.select_member_for_export(conn, member_uid)
    balances = {name: member[f"points_{name}"] for name in ("available", "pending", "held", "debt", "lifetime_earned")}
    # Oldest first, like every other list here (the activity pages newest first).
    transfers = bounded("transfers", await reads.select_activity(conn, member_uid, None, limit))[::-1]
    exported = await reputation_privacy.export(conn, member_uid, limit)
    exported |= await integrations_privacy.export(conn, member_uid, limit)
    exported |= await events_privacy.export(conn, member_uid, limit)
    optional = {name: bounded(name, rows) for name, rows in exported.items()}
    log_rows = bounded("privacy_log", await preferences_store.select_log(conn, member_uid, limit))
    purchases = bounded("purchases", await earning_store.select_purchases(conn, member_uid, limit))
    return {
        "member": ExportMember(
            member_id=member["member_id"],
            created_at=member["created_at"],
            tier=member["tier"],
            balances=ExportBalances(**balances, reputation=member["reputation"]),
        ),
        "preferences": [
            preference_item(services, r)
            for r in await preferences_store.select_preferences(conn, member_uid, PREFERENCES_MAX)
        ],
        "preference_awards": [
            ExportAward(**dict(r))
            for r in bounded("preference_awards", await preferences_store.select_awards(conn, member_uid, limit))
        ],
        "consents": consent_states(
            services, await preferences_store.select_consents(conn, member_uid), every_stored=True
        ),
        "privacy_log": [
            PrivacyLogEntry(**dict(r) | {"old_value": _json(r["old_value"]), "new_value": _json(r["new_value"])})
            for r in log_rows
        ],
        "transfers": [activity_item(r) for r in transfers],
        "lots": [ExportLot(**dict(r)) for r in bounded("lots", await reads.select_lots(conn, member_uid, limit))],
        "purchases": [
            ExportPurchase(**dict(r) | {"refunds": msgspec.json.decode(r["refunds"], type=list[ExportRefund])})
            for r in purchases
        ],
        "redemptions": [
            ExportRedemption(**dict(r))
            for r in bounded("redemptions", await redemption_store.select_redemptions(conn, member_uid, limit))
        ],
        "adjustments": [
            ExportAdjustment(**dict(r))
            for r in bounded("adjustments", await reads.select_adjustments(conn, member_uid, limit))
        ],
        "kudos_received": optional.pop("kudos_received", []),
        "kudos_given": optional.pop("kudos_given", []),
        "other": optional,
        "truncated": truncated,
    }


async def _log(conn: Connection, member_uid: int, kind: str, principal: Principal, now: datetime) -> int:
    """The export or erasure in the member's privacy log, with the client that asked for it."""
    return await preferences_store.insert_log(
        conn,
        member_uid=member_uid,
        kind=kind,
        subject=None,
        old_value=None,
        new_value=None,
        points=0,
        client=principal.name,
        now=now,
    )


def _json(text: str | None) -> Any:
    return _decode(text) if text is not None else None


async def erase(services: Services, member_id: str, principal: Principal) -> str | None:
    """Erase a member: personal data goes, the ledger's amounts stay under a pseudonym, and the
    old id finds nobody afterwards. Returns the pseudonym, or None when there was nothing to
    erase (idempotent: a second erasure of the same id changes nothing).

    Each feature's erasure step (konvert.composition) runs in the erasure's transaction; then,
    after the commit, each one's clean-up, on every erasure (also when nothing was left to erase,
    so that retrying one finishes a clean-up that failed).
    """
    now = services.clock()
    pseudonym = None
    async with writing(services) as book:
        member_uid = await reads.select_live_member_uid(book.conn, member_id)
        member = await book.member_by_uid(member_uid) if member_uid is not None else None
        if member is not None and member.id == member_id:  # else erased meanwhile, by a concurrent DELETE
            pseudonym = PSEUDONYM_PREFIX + secrets.token_hex(16)
            for step in services.erasure.steps:
                await step(book, member, pseudonym)
            await book.rename(member, pseudonym, now)
            book.announce(member, "member.erased", events.MemberErased())
            await _log(book.conn, member.uid, "erased", principal, now)
    if pseudonym is None:
        # A repeated erasure leaves a tombstone above any version (the first one's may have failed
        # to reach Redis), so that no fill that late can put the old balance back; it expires with
        # the cache's TTL.
        await services.cache.invalidate_many([(member_id, ABOVE_ANY_VERSION)])
    await _clean_up(services, member_id, pseudonym)
    return pseudonym


async def _clean_up(services: Services, member_id: str, pseudonym: str | None) -> None:
    failed = []
    for after in services.erasure.after:
        try:
            await after(services, member_id, pseudonym)
        except Exception:
            log.exception("erasure clean-up failed", extra={"step": getattr(after, "__qualname__", repr(after))})
            failed.append(after)
    if failed:
        raise errors.ServiceUnavailable(
            "the member is erased, but cleaning up after it failed; retry the DELETE to finish it"
        )
