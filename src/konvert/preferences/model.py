"""Wire types for preferences, consents, the privacy log and the member export."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

PreferenceKey = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$(?!\n)")]
Purpose = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$(?!\n)")]
# What a preference holds, by catalog type: choice, text, month_day -> a string; boolean -> a
# boolean; multi_choice -> a list of strings.
PreferenceValue = str | bool | list[str]
PreferenceType = Literal["choice", "multi_choice", "text", "month_day", "boolean"]


class PreferenceIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A preference as the member shares it, and the purposes they agree it may be used for."""

    # A string (choice, text, month_day as "MM-DD"), a boolean (boolean) or a list of strings
    # (multi_choice), as the catalog entry's type says. Checked against the catalog, so that a
    # wrong value is refused naming the key and what it allows.
    value: Annotated[
        Any,
        Meta(
            description=(
                "A string (choice, text, month_day as MM-DD), a boolean (boolean) or a list of strings "
                "(multi_choice), as the key's catalog entry says (GET /v1/preferences)."
            )
        ),
    ]
    # A subset of the catalog entry's purposes; empty shares the value for no purpose at all.
    consent: Annotated[tuple[Purpose, ...], Meta(max_length=50)]


class PreferenceOut(msgspec.Struct, frozen=True, kw_only=True):
    key: str
    value: PreferenceValue
    consent: tuple[str, ...]
    updated_at: datetime
    # Points this request awarded: the catalog's points on the member's first share of the key,
    # else 0.
    points_awarded: int
    # Whether this request was the member's first share of the key, ever.
    first_shared: bool


class PreferenceItem(msgspec.Struct, frozen=True, kw_only=True):
    key: str
    # Null for a key the program's catalog no longer has (the member can still delete it).
    label: str | None
    type: PreferenceType | None
    value: PreferenceValue
    consent: tuple[str, ...]
    updated_at: datetime


class PreferenceList(msgspec.Struct, frozen=True, kw_only=True):
    member_id: str
    # The purpose the list was filtered for, or null for the member's own view of everything.
    purpose: str | None
    items: list[PreferenceItem]
    # Every purpose the list was filtered for (a purpose-bound key's own when it names none);
    # null: not filtered.
    purposes: list[str] | None = None


class PreferenceDeleted(msgspec.Struct, frozen=True, kw_only=True):
    key: str
    # False when the member had not shared the key (deleting is idempotent).
    deleted: bool
    # Points taken back (only when the program sets claw_back_on_withdrawal).
    points_clawed_back: int
    # Points that could not be taken back because the balance may not go below zero.
    shortfall: int


class CatalogEntry(msgspec.Struct, frozen=True, kw_only=True):
    key: str
    label: str
    type: PreferenceType
    purposes: tuple[str, ...]
    choices: tuple[str, ...]
    # The longest text value (text preferences only).
    max_length: int | None
    # Points for the first share of this key.
    points: int


class Catalog(msgspec.Struct, frozen=True, kw_only=True):
    purposes: tuple[str, ...]
    claw_back_on_withdrawal: bool
    items: list[CatalogEntry]


class ConsentsIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Grant (true) or withdraw (false) purposes; purposes not named keep their state."""

    purposes: Annotated[dict[Purpose, bool], Meta(min_length=1, max_length=50)]


class ConsentState(msgspec.Struct, frozen=True, kw_only=True):
    granted: bool
    # When the member last changed it, and through which client (API key name); null if never.
    changed_at: datetime | None
    changed_by: str | None


class ConsentsOut(msgspec.Struct, frozen=True, kw_only=True):
    member_id: str
    # Every purpose of the program. A purpose the member never granted is not granted.
    purposes: dict[str, ConsentState]


PrivacyLogKind = Literal["preference_set", "preference_deleted", "consent_changed", "exported", "erased"]


class PrivacyLogEntry(msgspec.Struct, frozen=True, kw_only=True):
    log_id: int
    kind: PrivacyLogKind
    # The preference key or purpose the entry is about.
    subject: str | None
    old_value: Any
    new_value: Any
    # Points the change awarded (positive) or clawed back (negative).
    points: int
    client: str
    created_at: datetime


class ExportAward(msgspec.Struct, frozen=True, kw_only=True):
    key: str
    points: int
    points_awarded: int
    points_clawed_back: int
    awarded_at: datetime
