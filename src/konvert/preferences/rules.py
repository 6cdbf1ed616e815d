"""Pure rules for preferences and consent: value checks per type, consent, visibility, awards
and clawbacks. No I/O; every refusal names the key and what it allows.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import date
from typing import Any, NamedTuple

from konvert import errors
from konvert.program import PreferenceDef, Preferences

_MONTH_DAY = re.compile(r"^(\d{2})-(\d{2})$")
# Text may hold line breaks and tabs, never other control characters.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
# A leap year, so that 02-29 is a month_day like any other.
_LEAP_YEAR = 2000


def _refuse(definition: PreferenceDef, message: str) -> errors.InvalidPreferenceValue:
    return errors.InvalidPreferenceValue(
        f"{definition.key}: {message}", errors=[{"field": "value", "message": f"{definition.key}: {message}"}]
    )


def allowed_values(definition: PreferenceDef) -> str:
    """What a preference accepts, in words, for error messages and docs."""
    if definition.type == "choice":
        return "one of " + ", ".join(definition.choices)
    if definition.type == "multi_choice":
        return "a list of one or more of " + ", ".join(definition.choices)
    if definition.type == "text":
        return f"text of 1 to {definition.max_length} characters"
    if definition.type == "month_day":
        return 'a month and day as "MM-DD", e.g. "03-14"'
    return "true or false"


def normalise_value(definition: PreferenceDef, value: Any) -> str | bool | list[str]:
    """The value in its stored form, or InvalidPreferenceValue naming the key and what it allows.

    A multi_choice value is stored as a set: duplicates fold and the catalog's order is kept, so
    the same choices always compare equal.
    """
    kind = definition.type
    if kind == "boolean":
        if isinstance(value, bool):
            return value
    elif kind == "choice":
        if isinstance(value, str) and value in definition.choices:
            return value
    elif kind == "multi_choice":
        if isinstance(value, list) and value and all(isinstance(v, str) and v in definition.choices for v in value):
            chosen = set(value)
            return [choice for choice in definition.choices if choice in chosen]
    elif kind == "text":
        if isinstance(value, str) and value.strip() and len(value) <= definition.max_length:
            if _CONTROL.search(value):
                raise _refuse(definition, "text must not contain control characters")
            return value
    elif kind == "month_day" and isinstance(value, str) and (match := _MONTH_DAY.match(value)):
        try:
            date(_LEAP_YEAR, int(match[1]), int(match[2]))
            return value
        except ValueError:
            pass
    raise _refuse(definition, f"must be {allowed_values(definition)}")


def normalise_consent(definition: PreferenceDef, consent: Iterable[str]) -> tuple[str, ...]:
    """The purposes in the catalog entry's order (duplicates fold), or PurposeNotAllowed."""
    requested = set(consent)
    refused = sorted(requested - set(definition.purposes))
    if refused:
        allowed = ", ".join(definition.purposes)
        raise errors.PurposeNotAllowed(
            f"{definition.key} may be used for {allowed} only, not {', '.join(refused)}",
            errors=[{"field": "consent", "message": f"{definition.key}: purposes allowed are {allowed}"}],
        )
    return tuple(p for p in definition.purposes if p in requested)


def check_purpose(preferences: Preferences, purpose: str) -> str:
    if purpose not in preferences.purposes:
        raise errors.UnknownPurpose(
            f"unknown purpose {purpose!r}; purposes are {', '.join(preferences.purposes)}",
            errors=[{"field": "purpose", "message": f"must be one of {', '.join(preferences.purposes)}"}],
        )
    return purpose


def visible_for(purpose: str, definition: PreferenceDef | None, consent: Iterable[str], granted: Iterable[str]) -> bool:
    """Whether a shared preference may be read for ``purpose``.

    All three must agree: the member granted the purpose (member-level consent), consented to it
    for this preference, and the program's catalog still allows the preference to be used for it.
    """
    return definition is not None and purpose in definition.purposes and purpose in consent and purpose in granted


class ConsentChange(NamedTuple):
    purpose: str
    was_granted: bool
    granted: bool


def consent_changes(
    preferences: Preferences, current: Mapping[str, bool], requested: Mapping[str, bool]
) -> list[ConsentChange]:
    """The purposes whose state changes, in the program's order. Re-stating a state is no change."""
    unknown = sorted(set(requested) - set(preferences.purposes))
    if unknown:
        raise errors.UnknownPurpose(
            f"unknown purpose {', '.join(unknown)}; purposes are {', '.join(preferences.purposes)}",
            errors=[{"field": f"purposes.{p}", "message": "unknown purpose"} for p in unknown],
        )
    return [
        ConsentChange(purpose, current.get(purpose, False), requested[purpose])
        for purpose in preferences.purposes
        if purpose in requested and requested[purpose] != current.get(purpose, False)
    ]


class Award(NamedTuple):
    # What the key is worth to this member (the catalog's points at their first share).
    entitled: int
    # Points to award now.
    points: int
    first_share: bool


def award_for(catalog_points: int, entitled: int | None, awarded: int, clawed_back: int) -> Award:
    """Points a share pays. The first share ever pays the catalog's points. Later shares pay
    nothing, except what a clawback took back (only programs that claw back on withdrawal): a
    member never holds more than one award per key, and never loses it for good by re-sharing.
    """
    if entitled is None:
        return Award(catalog_points, catalog_points, True)
    held = awarded - clawed_back
    return Award(entitled, max(entitled - held, 0), False)
