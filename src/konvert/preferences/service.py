"""Preference, consent, export and erasure use cases. One transaction each; the member's row is
locked first, which serialises every change of one member (first shares included) and keeps the
project-wide lock order. Balance caches are invalidated after commit.
"""

from __future__ import annotations

import logging
import secrets
from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from konvert import errors
from konvert.auth import Principal
from konvert.cache import ABOVE_ANY_VERSION
from konvert.ledger import store as ledger
from konvert.ledger.service import _activity_item as activity_item
from konvert.preferences import rules, store
from konvert.preferences.hooks import ERASURE_HOOKS, ERASURE_STEPS
from konvert.preferences.model import (
    Catalog,
    CatalogEntry,
    ConsentsIn,
    ConsentsOut,
    ConsentState,
    Export,
    ExportAdjustment,
    ExportAward,
    ExportBalances,
    ExportLot,
    ExportMember,
    ExportPurchase,
    ExportRedemption,
    ExportRefund,
    PreferenceDeleted,
    PreferenceIn,
    PreferenceItem,
    PreferenceList,
    PreferenceOut,
    PrivacyLogEntry,
)
from konvert.program import PreferenceDef
from konvert.redemption import store as redemption_store
from konvert.redemption.rules import expiry_for
from konvert.services import Services

log = logging.getLogger("konvert.preferences")

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.decode

EXPORT_FORMAT = "konvert.member-export/1"
# Each list in an export holds at most this many rows; `truncated` names the lists cut short.
EXPORT_ROWS_MAX = 100_000
# A member has at most one row per catalog key; this bounds keys the catalog no longer has too.
PREFERENCES_MAX = 1000
PSEUDONYM_PREFIX = "erased-"
# The system account that preference points come from and clawbacks go back to.
SYSTEM_ACCOUNT = "preferences"


def catalog(services: Services) -> Catalog:
    prefs = services.program.preferences
    return Catalog(
        purposes=prefs.purposes,
        claw_back_on_withdrawal=prefs.claw_back_on_withdrawal,
        items=[
            CatalogEntry(
                key=d.key,
                label=d.label,
                type=d.type,
                purposes=d.purposes,
                choices=d.choices,
                max_length=d.max_length if d.type == "text" else None,
                points=d.points,
            )
            for d in prefs.catalog
        ],
    )


# --- members -------------------------------------------------------------------------------


async def _lock_member(conn: asyncpg.Connection, member_id: str, *, create: bool) -> asyncpg.Record:
    """The member's row, locked; created first if ``create``. Erased members are not found.

    An erasure that commits while we wait for the lock renames the row: then the old id names
    nobody (or, with ``create``, a new member), so look it up again.
    """
    for _ in range(3):
        if create:
            member_uid = await ledger.ensure_member(conn, member_id)
        else:
            member_uid = await ledger.select_member_uid(conn, member_id)
        if member_uid is None:
            break
        member = await ledger.lock_member(conn, member_uid)
        if member["member_id"] == member_id:
            if await store.select_erased_at(conn, member_uid) is not None:
                break
            return member
    raise errors.MemberNotFound(f"no member {member_id!r}")


async def _live_member_uid(conn: store.Conn, member_id: str) -> int:
    member_uid = await store.select_live_member_uid(conn, member_id)
    if member_uid is None:
        raise errors.MemberNotFound(f"no member {member_id!r}")
    return member_uid


# --- preferences ---------------------------------------------------------------------------


def _definition(services: Services, key: str) -> PreferenceDef:
    definition = services.program.preferences.find(key)
    if definition is None:
        known = ", ".join(d.key for d in services.program.preferences.catalog) or "none"
        raise errors.UnknownPreference(f"no preference {key!r} in the catalog; keys are {known}")
    return definition


def _shared(value: Any, consent: Any) -> str:
    """A preference as the privacy log records it."""
    return _encode({"value": value, "consent": list(consent)}).decode()


async def share(
    services: Services, member_id: str, key: str, body: PreferenceIn, principal: Principal
) -> PreferenceOut:
    """Share (or change) a preference. The member's first share of a key, ever, pays the
    catalog's points; changing, deleting and re-sharing it pays nothing again."""
    definition = _definition(services, key)
    value = rules.normalise_value(definition, body.value)
    consent = rules.normalise_consent(definition, body.consent)
    now = services.clock()
    version = None
    async with services.pool.acquire() as conn, conn.transaction():
        member = await _lock_member(conn, member_id, create=True)
        member_uid = member["member_uid"]
        old = await store.select_preference(conn, member_uid, key)
        old_value = _decode(old["value"]) if old is not None else None
        changed = old is None or old_value != value or tuple(old["consent"]) != consent
        updated_at = old["updated_at"] if old is not None else now
        if changed:
            updated_at = await store.upsert_preference(conn, member_uid, key, _encode(value).decode(), consent, now)

        recorded = await store.select_award(conn, member_uid, key)
        award = rules.award_for(
            definition.points,
            recorded["points"] if recorded else None,
            recorded["points_awarded"] if recorded else 0,
            recorded["points_clawed_back"] if recorded else 0,
        )
        if award.first_share:
            inserted = await store.insert_award(conn, member_uid, key, award.entitled, now)
            assert inserted, "a first share is recorded under the member's lock"
        if award.points:
            version = await _award(services, conn, member, key, award.points, now)
        if changed or award.points:
            await store.insert_log(
                conn,
                member_uid=member_uid,
                kind="preference_set",
                subject=key,
                old_value=_shared(old_value, old["consent"]) if old is not None else None,
                new_value=_shared(value, consent),
                points=award.points,
                client=principal.name,
                now=now,
            )
    if version is not None:
        await services.balances.invalidate(member_id, version)
    return PreferenceOut(
        key=key,
        value=value,
        consent=consent,
        updated_at=updated_at,
        points_awarded=award.points,
        first_shared=award.first_share,
    )


async def _award(
    services: Services, conn: asyncpg.Connection, member: asyncpg.Record, key: str, points: int, now: datetime
) -> int:
    """Credit ``points`` for sharing ``key``: a new lot, available at once; return the new version."""
    member_uid = member["member_uid"]
    lot_id = await redemption_store.insert_lot(
        conn, member_uid, points, "available", now, expiry_for(now, services.program.points)
    )
    accounts = await ledger.select_member_account_ids(conn, member_uid)
    transfer_id = await ledger.insert_transfer(
        conn,
        member_uid=member_uid,
        asset="points",
        debit_account_id=await services.accounts.id(conn, "points", SYSTEM_ACCOUNT),
        credit_account_id=accounts["available"],
        amount=points,
        code="earn",
        cause_type="preference",
        cause_ref=key,
        lot_id=lot_id,
        reason=f"preference_shared: {key}",
    )
    await store.add_awarded(conn, member_uid, key, points, transfer_id, lot_id)
    version = await ledger.update_member_points(conn, member_uid, available=points, lifetime_earned=points)
    await ledger.settle_debt(conn, member_uid, member["points_debt"])
    return version


async def withdraw(services: Services, member_id: str, key: str, principal: Principal) -> PreferenceDeleted:
    """Delete a shared preference. Its points stay, unless the program claws back on withdrawal.
    Deleting a preference that is not shared changes nothing."""
    now = services.clock()
    version = None
    clawed = shortfall = 0
    async with services.pool.acquire() as conn, conn.transaction():
        member = await _lock_member(conn, member_id, create=False)
        member_uid = member["member_uid"]
        old = await store.delete_preference(conn, member_uid, key)
        if old is None:
            _definition(services, key)  # an unknown key is a 404; a known one not shared, a no-op
            return PreferenceDeleted(key=key, deleted=False, points_clawed_back=0, shortfall=0)
        if services.program.preferences.claw_back_on_withdrawal:
            recorded = await store.select_award(conn, member_uid, key)
            held = recorded["points_awarded"] - recorded["points_clawed_back"] if recorded else 0
            if held > 0:
                clawed, shortfall, version = await _claw_back(services, conn, member, recorded, held)
        await store.insert_log(
            conn,
            member_uid=member_uid,
            kind="preference_deleted",
            subject=key,
            old_value=_shared(_decode(old["value"]), old["consent"]),
            new_value=None,
            points=-clawed,
            client=principal.name,
            now=now,
        )
    if version is not None:
        await services.balances.invalidate(member_id, version)
    return PreferenceDeleted(key=key, deleted=True, points_clawed_back=clawed, shortfall=shortfall)


async def _claw_back(
    services: Services, conn: asyncpg.Connection, member: asyncpg.Record, award: asyncpg.Record, points: int
) -> tuple[int, int, int | None]:
    """Take back a key's points: from its own lot first, then the soonest-expiring available
    lots. What is missing becomes debt if the program allows negative balances, else a
    shortfall. Returns (points taken, shortfall, new version or None if nothing moved).
    """
    member_uid = member["member_uid"]
    lots = await ledger.lock_available_lots(conn, member_uid)
    own_first = sorted(lots, key=lambda lot: lot["lot_id"] != award["latest_lot_id"])
    takes, missing = ledger.plan_takes(own_first, points)
    split = rules.clawback_split(points, points - missing, services.program.points.allow_negative_balance)
    taken = split.from_lots + split.debt
    if taken == 0:
        return 0, split.shortfall, None
    accounts = await ledger.select_member_account_ids(conn, member_uid)
    transfer_id = await ledger.insert_transfer(
        conn,
        member_uid=member_uid,
        asset="points",
        debit_account_id=accounts["available"],
        credit_account_id=await services.accounts.id(conn, "points", SYSTEM_ACCOUNT),
        amount=taken,
        code="clawback",
        cause_type="preference",
        cause_ref=award["key"],
        lot_id=award["latest_lot_id"],
        reverses_transfer_id=award["transfer_id"],
        reason=f"preference_withdrawn: {award['key']}",
    )
    await ledger.take_from_lots(conn, member_uid, takes, transfer_id, "clawback")
    await store.add_clawed_back(conn, member_uid, award["key"], taken)
    version = await ledger.update_member_points(
        conn, member_uid, available=-taken, debt=split.debt, lifetime_earned=-taken
    )
    return taken, split.shortfall, version


def _item(services: Services, row: asyncpg.Record) -> PreferenceItem:
    definition = services.program.preferences.find(row["key"])
    return PreferenceItem(
        key=row["key"],
        label=definition.label if definition else None,
        type=definition.type if definition else None,
        value=_decode(row["value"]),
        consent=tuple(row["consent"]),
        updated_at=row["updated_at"],
    )


async def list_preferences(services: Services, member_id: str, purpose: str | None) -> PreferenceList:
    """The member's preferences; with ``purpose``, only those readable for it (rules.visible_for)."""
    prefs = services.program.preferences
    if purpose is not None:
        rules.check_purpose(prefs, purpose)
    async with services.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        member_uid = await _live_member_uid(conn, member_id)
        rows = await store.select_preferences(conn, member_uid, PREFERENCES_MAX)
        granted = {r["purpose"] for r in await store.select_consents(conn, member_uid) if r["granted"]}
    if purpose is not None:
        rows = [r for r in rows if rules.visible_for(purpose, prefs.find(r["key"]), r["consent"], granted)]
    return PreferenceList(member_id=member_id, purpose=purpose, items=[_item(services, r) for r in rows])


# --- consents ------------------------------------------------------------------------------


def _consent_states(
    services: Services, rows: list[asyncpg.Record], every_stored: bool = False
) -> dict[str, ConsentState]:
    """Every program purpose (never granted: not granted); with ``every_stored`` also purposes
    the program no longer has but the member once decided on."""
    stored = {
        r["purpose"]: ConsentState(granted=r["granted"], changed_at=r["changed_at"], changed_by=r["changed_by"])
        for r in rows
    }
    never = ConsentState(granted=False, changed_at=None, changed_by=None)
    states = {purpose: stored.get(purpose, never) for purpose in services.program.preferences.purposes}
    if every_stored:
        states |= stored
    return states


async def consents(services: Services, member_id: str) -> ConsentsOut:
    member_uid = await _live_member_uid(services.pool, member_id)
    rows = await store.select_consents(services.pool, member_uid)
    return ConsentsOut(member_id=member_id, purposes=_consent_states(services, rows))


async def change_consents(services: Services, member_id: str, body: ConsentsIn, principal: Principal) -> ConsentsOut:
    """Grant or withdraw purposes. A withdrawal hides the member's preferences from that purpose
    with the commit (reads check consent every time; nothing caches it)."""
    prefs = services.program.preferences
    rules.consent_changes(prefs, {}, body.purposes)  # refuse unknown purposes before writing
    now = services.clock()
    async with services.pool.acquire() as conn, conn.transaction():
        member = await _lock_member(conn, member_id, create=True)
        member_uid = member["member_uid"]
        current = {r["purpose"]: r["granted"] for r in await store.select_consents(conn, member_uid)}
        for change in rules.consent_changes(prefs, current, body.purposes):
            await store.upsert_consent(conn, member_uid, change.purpose, change.granted, now, principal.name)
            await store.insert_log(
                conn,
                member_uid=member_uid,
                kind="consent_changed",
                subject=change.purpose,
                old_value=_encode(change.was_granted).decode() if change.purpose in current else None,
                new_value=_encode(change.granted).decode(),
                points=0,
                client=principal.name,
                now=now,
            )
        rows = await store.select_consents(conn, member_uid)
    return ConsentsOut(member_id=member_id, purposes=_consent_states(services, rows))


# --- export --------------------------------------------------------------------------------


async def export(services: Services, member_id: str, principal: Principal) -> Export:
    """Everything konvert holds on the member, read in one snapshot; the export itself is logged."""
    now = services.clock()
    limit = EXPORT_ROWS_MAX + 1
    truncated: list[str] = []

    def bounded(name: str, rows: list[Any]) -> list[Any]:
        if len(rows) > EXPORT_ROWS_MAX:
            truncated.append(name)
        return rows[:EXPORT_ROWS_MAX]

    async with services.pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
        member_uid = await _live_member_uid(conn, member_id)
        await store.insert_log(
            conn, member_uid=member_uid, kind="exported", subject=None, old_value=None, new_value=None,
            points=0, client=principal.name, now=now,
        )  # fmt: skip
        member = await store.select_member_for_export(conn, member_uid)
        preferences = await store.select_preferences(conn, member_uid, PREFERENCES_MAX)
        awards = await store.select_awards(conn, member_uid, limit)
        consent_rows = await store.select_consents(conn, member_uid)
        log_rows = bounded("privacy_log", await store.select_log(conn, member_uid, limit))
        # Oldest first, like every other list here (select_activity pages newest first).
        transfers = bounded("transfers", await ledger.select_activity(conn, member_uid, None, limit))[::-1]
        lots = bounded("lots", await store.select_lots(conn, member_uid, limit))
        purchases = bounded("purchases", await store.select_purchases(conn, member_uid, limit))
        redemptions = bounded("redemptions", await store.select_redemptions(conn, member_uid, limit))
        adjustments = bounded("adjustments", await store.select_adjustments(conn, member_uid, limit))
        optional: dict[str, list[dict[str, Any]]] = {}
        for name, table, column, left_out in store.OPTIONAL_MEMBER_TABLES:
            if await store.table_exists(conn, table):
                rows = await store.select_optional_rows(conn, table, column, left_out, member_uid, limit)
                optional[name] = [_decode(r) for r in bounded(name, rows)]
    return Export(
        format=EXPORT_FORMAT,
        exported_at=now,
        member=ExportMember(
            member_id=member["member_id"],
            created_at=member["created_at"],
            tier=member["tier"],
            balances=ExportBalances(
                available=member["points_available"],
                pending=member["points_pending"],
                held=member["points_held"],
                debt=member["points_debt"],
                lifetime_earned=member["points_lifetime_earned"],
                reputation=member["reputation"],
            ),
        ),
        preferences=[_item(services, r) for r in preferences],
        preference_awards=[ExportAward(**dict(r)) for r in bounded("preference_awards", awards)],
        consents=_consent_states(services, consent_rows, every_stored=True),
        privacy_log=[
            PrivacyLogEntry(
                **dict(r) | {"old_value": _json_or_none(r["old_value"]), "new_value": _json_or_none(r["new_value"])}
            )
            for r in log_rows
        ],
        transfers=[activity_item(r) for r in transfers],
        lots=[ExportLot(**dict(r)) for r in lots],
        purchases=[
            ExportPurchase(
                **dict(r) | {"refunds": msgspec.json.decode(r["refunds"], type=list[ExportRefund])}
            )
            for r in purchases
        ],
        redemptions=[ExportRedemption(**dict(r)) for r in redemptions],
        adjustments=[ExportAdjustment(**dict(r)) for r in adjustments],
        kudos_received=optional.pop("kudos_received", []),
        kudos_given=optional.pop("kudos_given", []),
        other=optional,
        truncated=truncated,
    )


def _json_or_none(text: str | None) -> Any:
    return _decode(text) if text is not None else None


# --- erasure -------------------------------------------------------------------------------


async def erase(services: Services, member_id: str, principal: Principal) -> str | None:
    """Erase a member: personal data goes, the ledger's amounts stay under a pseudonym, and the
    old id finds nobody afterwards. Returns the pseudonym, or None when there was nothing to
    erase (idempotent: a second erasure of the same id changes nothing).
    """
    now = services.clock()
    pseudonym = None
    version = None
    async with services.pool.acquire() as conn, conn.transaction():
        member_uid = await store.select_live_member_uid(conn, member_id)
        if member_uid is not None:
            member = await ledger.lock_member(conn, member_uid)
            if member["member_id"] == member_id:  # else erased meanwhile, by a concurrent DELETE
                pseudonym = PSEUDONYM_PREFIX + secrets.token_hex(16)
                # The privacy log refuses every update outside this transaction (sql/0005).
                await conn.execute("set local konvert.erasure = 'on'")
                for step in ERASURE_STEPS:
                    await step(conn, member_uid, member_id, pseudonym)
                version = await store.erase_member(conn, member_uid, member_id, pseudonym, now)
                await store.insert_log(
                    conn, member_uid=member_uid, kind="erased", subject=None, old_value=None, new_value=None,
                    points=0, client=principal.name, now=now,
                )  # fmt: skip
    await _after_erasure(services, member_id, pseudonym, version)
    return pseudonym


async def _after_erasure(services: Services, member_id: str, pseudonym: str | None, version: int | None) -> None:
    # A version-only tombstone: a reader (or `konvert cache warm`) that fetched the balance
    # before the erasure cannot put it back under the old id. A repeated DELETE, which finds
    # nothing left to erase, leaves one above any version (the first one's may have failed), so
    # that no fill that late can land either; it expires with the cache's TTL.
    await services.balances.invalidate(member_id, version if version is not None else ABOVE_ANY_VERSION)
    failed = []
    for hook in ERASURE_HOOKS:
        try:
            await hook(services, member_id, pseudonym)
        except Exception:
            log.exception("erasure hook failed", extra={"hook": getattr(hook, "__qualname__", repr(hook))})
            failed.append(hook)
    if failed:
        raise errors.ServiceUnavailable(
            "the member is erased, but cleaning up after it failed; retry the DELETE to finish it"
        )
