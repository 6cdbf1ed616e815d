"""Preference and consent use cases. One transaction each; the member's row is locked first,
which serialises every change of one member (first shares included) and keeps the project-wide
lock order. A member's export and erasure are konvert.privacy's.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import msgspec

from konvert import errors
from konvert.auth import Principal
from konvert.ledger import events
from konvert.ledger.accounts import SystemAccount
from konvert.ledger.book import Book, Member, writing
from konvert.ledger.model import Cause
from konvert.ledger.reads import select_live_member_uid
from konvert.ledger.rules import expiry_for
from konvert.preferences import rules, store
from konvert.preferences.model import (
    Catalog,
    CatalogEntry,
    ConsentsIn,
    ConsentsOut,
    ConsentState,
    PreferenceDeleted,
    PreferenceIn,
    PreferenceItem,
    PreferenceList,
    PreferenceOut,
)
from konvert.program import PreferenceDef

if TYPE_CHECKING:
    from konvert.services import Services

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.decode

# A member has at most one row per catalog key; this bounds keys the catalog no longer has too.
PREFERENCES_MAX = 1000
# The system account that preference points come from and clawbacks go back to.
SYSTEM_ACCOUNT = SystemAccount("points", "preferences")


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


async def _lock_member(book: Book, member_id: str, *, create: bool) -> Member:
    """The member, locked; created first if ``create``. Erased members are not found (an erasure
    that commits while this waits for the lock renames the row, and the old id names nobody)."""
    member = await book.member(member_id, create=create)
    if member is None or member.erased:
        raise errors.MemberNotFound(f"no member {member_id!r}")
    return member


async def _live_member_uid(conn: store.Conn, member_id: str) -> int:
    member_uid = await select_live_member_uid(conn, member_id)
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
    async with writing(services) as book:
        conn = book.conn
        member = await _lock_member(book, member_id, create=True)
        member_uid = member.uid
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
            await _award(services, book, member, key, award.points, now)
        if changed or award.points:
            shared = events.PreferenceShared(key=key, first_shared=award.first_share, points=award.points)
            book.announce(member, "preference.shared", shared)
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
    return PreferenceOut(
        key=key,
        value=value,
        consent=consent,
        updated_at=updated_at,
        points_awarded=award.points,
        first_shared=award.first_share,
    )


async def _award(services: Services, book: Book, member: Member, key: str, points: int, now: datetime) -> None:
    """Credit ``points`` for sharing ``key``: a new lot, available at once."""
    credit = await book.credit(
        member,
        points,
        source=SYSTEM_ACCOUNT,
        code="earn",
        cause=Cause("preference", key),
        reason=f"preference_shared: {key}",
        expires_at=expiry_for(now, services.program.points),
        vests_at=now,
    )
    await store.add_awarded(book.conn, member.uid, key, points, credit.transfer_id, credit.lot_id)


async def withdraw(services: Services, member_id: str, key: str, principal: Principal) -> PreferenceDeleted:
    """Delete a shared preference. Its points stay, unless the program claws back on withdrawal.
    Deleting a preference that is not shared changes nothing."""
    now = services.clock()
    clawed = shortfall = 0
    async with writing(services) as book:
        conn = book.conn
        member = await _lock_member(book, member_id, create=False)
        member_uid = member.uid
        old = await store.delete_preference(conn, member_uid, key)
        if old is None:
            _definition(services, key)  # an unknown key is a 404; a known one not shared, a no-op
            return PreferenceDeleted(key=key, deleted=False, points_clawed_back=0, shortfall=0)
        if services.program.preferences.claw_back_on_withdrawal:
            recorded = await store.select_award(conn, member_uid, key)
            held = recorded["points_awarded"] - recorded["points_clawed_back"] if recorded else 0
            if held > 0 and recorded is not None:
                clawed, shortfall = await _claw_back(services, book, member, recorded, held)
        withdrawn = events.PreferenceWithdrawn(key=key, points_clawed_back=clawed, shortfall=shortfall)
        book.announce(member, "preference.withdrawn", withdrawn)
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
    return PreferenceDeleted(key=key, deleted=True, points_clawed_back=clawed, shortfall=shortfall)


async def _claw_back(
    services: Services, book: Book, member: Member, award: asyncpg.Record, points: int
) -> tuple[int, int]:
    """Take back a key's points: from its own lot first, then the soonest-expiring available lots.
    What is missing becomes debt if the program allows negative balances, else a shortfall.
    Returns (points taken, shortfall)."""
    clawback = await book.claw_back(
        member,
        points,
        own_lot_id=award["latest_lot_id"],
        to=SYSTEM_ACCOUNT,
        code="clawback",
        cause=Cause("preference", award["key"]),
        reverses_transfer_id=award["transfer_id"],
        reason=f"preference_withdrawn: {award['key']}",
        allow_negative=services.program.points.allow_negative_balance,
        lifetime=True,
    )
    if clawback.points:
        await store.add_clawed_back(book.conn, member.uid, award["key"], clawback.points)
    return clawback.points, clawback.shortfall


def preference_item(services: Services, row: asyncpg.Record) -> PreferenceItem:
    definition = services.program.preferences.find(row["key"])
    return PreferenceItem(
        key=row["key"],
        label=definition.label if definition else None,
        type=definition.type if definition else None,
        value=_decode(row["value"]),
        consent=tuple(row["consent"]),
        updated_at=row["updated_at"],
    )


async def list_preferences(
    services: Services, member_id: str, purpose: str | None, principal: Principal | None = None
) -> PreferenceList:
    """The member's preferences; with ``purpose``, only those readable for it (rules.visible_for).
    A key bound to purposes reads only what they may: ``purpose`` must be one of them, and without
    it the preferences readable for any of them."""
    prefs = services.program.preferences
    if purpose is not None:
        rules.check_purpose(prefs, purpose)
    purposes = principal.check_purposes(purpose) if principal is not None else None
    if purposes is None and purpose is not None:
        purposes = frozenset({purpose})
    async with services.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        member_uid = await _live_member_uid(conn, member_id)
        rows = await store.select_preferences(conn, member_uid, PREFERENCES_MAX)
        granted = {r["purpose"] for r in await store.select_consents(conn, member_uid) if r["granted"]}
    if purposes is not None:
        rows = [
            r for r in rows if any(rules.visible_for(p, prefs.find(r["key"]), r["consent"], granted) for p in purposes)
        ]
    return PreferenceList(
        member_id=member_id,
        purpose=purpose,
        purposes=sorted(purposes) if purposes is not None else None,
        items=[preference_item(services, r) for r in rows],
    )


# --- consents ------------------------------------------------------------------------------


def consent_states(
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
    return ConsentsOut(member_id=member_id, purposes=consent_states(services, rows))


async def change_consents(services: Services, member_id: str, body: ConsentsIn, principal: Principal) -> ConsentsOut:
    """Grant or withdraw purposes. A withdrawal hides the member's preferences from that purpose
    with the commit (reads check consent every time; nothing caches it)."""
    prefs = services.program.preferences
    rules.consent_changes(prefs, {}, body.purposes)  # refuse unknown purposes before writing
    now = services.clock()
    async with writing(services) as book:
        conn = book.conn
        member = await _lock_member(book, member_id, create=True)
        member_uid = member.uid
        current = {r["purpose"]: r["granted"] for r in await store.select_consents(conn, member_uid)}
        for change in rules.consent_changes(prefs, current, body.purposes):
            await store.upsert_consent(conn, member_uid, change.purpose, change.granted, now, principal.name)
            book.announce(
                member, "consent.changed", events.ConsentChanged(purpose=change.purpose, granted=change.granted)
            )
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
    return ConsentsOut(member_id=member_id, purposes=consent_states(services, rows))
