"""Pure preference rules: values per type, consent, visibility, awards, the catalog. (How a
withdrawal's clawback is taken is the ledger's plan_clawback: tests/unit/test_ledger_rules.py.)"""

from __future__ import annotations

from typing import Any

import pytest

from konvert import errors
from konvert.errors import ConfigurationError
from konvert.preferences import rules
from konvert.program import PreferenceDef, Preferences, parse_program

SIZE = PreferenceDef(
    key="size", label="Size", type="choice", choices=("S", "M", "L"), purposes=("personalisation", "support")
)
CATEGORIES = PreferenceDef(
    key="categories",
    label="Categories",
    type="multi_choice",
    choices=("books", "music", "outdoor"),
    purposes=("marketing",),
)
NOTES = PreferenceDef(key="notes", label="Notes", type="text", max_length=10, purposes=("support",))
BIRTHDAY = PreferenceDef(key="birthday", label="Birthday", type="month_day", purposes=("marketing",))
NEWSLETTER = PreferenceDef(key="newsletter", label="Newsletter", type="boolean", purposes=("marketing",))
PREFERENCES = Preferences(catalog=(SIZE, CATEGORIES, NOTES, BIRTHDAY, NEWSLETTER))


@pytest.mark.parametrize(
    ("definition", "value", "stored"),
    [
        (SIZE, "M", "M"),
        (CATEGORIES, ["music"], ["music"]),
        # A multi_choice is a set: duplicates fold, the catalog's order is kept.
        (CATEGORIES, ["outdoor", "books", "outdoor"], ["books", "outdoor"]),
        (NOTES, "ring twice", "ring twice"),
        (NOTES, "line\nbreak", "line\nbreak"),
        (NOTES, "x", "x"),
        (BIRTHDAY, "03-14", "03-14"),
        (BIRTHDAY, "02-29", "02-29"),
        (BIRTHDAY, "12-31", "12-31"),
        (NEWSLETTER, True, True),
        (NEWSLETTER, False, False),
    ],
)
def test_valid_values_are_stored_normalised(definition: PreferenceDef, value: Any, stored: Any) -> None:
    assert rules.normalise_value(definition, value) == stored


@pytest.mark.parametrize(
    ("definition", "value", "allowed"),
    [
        (SIZE, "XL", "one of S, M, L"),
        (SIZE, "m", "one of S, M, L"),
        (SIZE, ["M"], "one of S, M, L"),
        (SIZE, 1, "one of S, M, L"),
        (SIZE, None, "one of S, M, L"),
        (CATEGORIES, [], "a list of one or more of books, music, outdoor"),
        (CATEGORIES, "books", "a list of one or more of books, music, outdoor"),
        (CATEGORIES, ["books", "cars"], "a list of one or more of books, music, outdoor"),
        (CATEGORIES, ["books", 3], "a list of one or more of books, music, outdoor"),
        (NOTES, "", "text of 1 to 10 characters"),
        (NOTES, "   ", "text of 1 to 10 characters"),
        (NOTES, "x" * 11, "text of 1 to 10 characters"),
        (NOTES, 12, "text of 1 to 10 characters"),
        (BIRTHDAY, "02-30", '"MM-DD"'),
        (BIRTHDAY, "13-01", '"MM-DD"'),
        (BIRTHDAY, "3-14", '"MM-DD"'),
        (BIRTHDAY, "1990-03-14", '"MM-DD"'),
        (BIRTHDAY, "00-10", '"MM-DD"'),
        (NEWSLETTER, "true", "true or false"),
        (NEWSLETTER, 1, "true or false"),
        (NEWSLETTER, None, "true or false"),
    ],
)
def test_invalid_values_are_refused_naming_the_key_and_what_it_allows(
    definition: PreferenceDef, value: Any, allowed: str
) -> None:
    with pytest.raises(errors.InvalidPreferenceValue) as raised:
        rules.normalise_value(definition, value)

    assert raised.value.status == 422
    assert raised.value.detail.startswith(f"{definition.key}: ")
    assert allowed in raised.value.detail
    assert raised.value.errors == [{"field": "value", "message": raised.value.detail}]


def test_text_refuses_control_characters() -> None:
    with pytest.raises(errors.InvalidPreferenceValue, match="control characters"):
        rules.normalise_value(NOTES, "a\x00b")


def test_consent_keeps_the_catalog_order_and_folds_duplicates() -> None:
    assert rules.normalise_consent(SIZE, ["support", "personalisation", "support"]) == ("personalisation", "support")
    assert rules.normalise_consent(SIZE, []) == ()


def test_consent_for_a_purpose_the_preference_may_not_serve_is_refused_naming_the_allowed_ones() -> None:
    with pytest.raises(errors.PurposeNotAllowed) as raised:
        rules.normalise_consent(SIZE, ["personalisation", "marketing"])

    assert "personalisation, support" in raised.value.detail
    assert "marketing" in raised.value.detail


def test_a_preference_is_visible_only_where_consent_grant_and_catalog_agree() -> None:
    granted = {"marketing", "support"}

    assert rules.visible_for("support", SIZE, ("support",), granted)
    assert not rules.visible_for("support", SIZE, ("personalisation",), granted)  # not consented for it
    assert not rules.visible_for("personalisation", SIZE, ("personalisation",), granted)  # purpose not granted
    assert not rules.visible_for("marketing", SIZE, ("marketing",), granted)  # catalog does not allow it
    assert not rules.visible_for("support", None, ("support",), granted)  # key gone from the catalog


def test_unknown_purposes_are_refused() -> None:
    with pytest.raises(errors.UnknownPurpose, match="personalisation, marketing, support"):
        rules.check_purpose(PREFERENCES, "tracking")
    with pytest.raises(errors.UnknownPurpose) as raised:
        rules.consent_changes(PREFERENCES, {}, {"marketing": True, "tracking": True})
    assert raised.value.errors == [{"field": "purposes.tracking", "message": "unknown purpose"}]


def test_consent_changes_are_only_real_changes_in_the_programs_order() -> None:
    changes = rules.consent_changes(
        PREFERENCES, {"marketing": True}, {"support": True, "marketing": True, "personalisation": False}
    )

    # marketing is restated, personalisation was never granted: neither is a change.
    assert changes == [rules.ConsentChange("support", False, True)]
    assert rules.consent_changes(PREFERENCES, {"marketing": True}, {"marketing": False}) == [
        rules.ConsentChange("marketing", True, False)
    ]


def test_the_first_share_pays_the_catalog_points_and_later_shares_nothing() -> None:
    assert rules.award_for(50, None, 0, 0) == rules.Award(50, 50, True)
    assert rules.award_for(50, 50, 50, 0) == rules.Award(50, 0, False)
    # The catalog's points changed since: the member's entitlement is what it was.
    assert rules.award_for(80, 50, 50, 0) == rules.Award(50, 0, False)
    assert rules.award_for(0, None, 0, 0) == rules.Award(0, 0, True)


def test_a_share_after_a_clawback_pays_back_only_what_was_taken() -> None:
    assert rules.award_for(50, 50, 50, 50) == rules.Award(50, 50, False)
    # A clawback that stopped at zero took 30 of 50: the member still holds 20.
    assert rules.award_for(50, 50, 50, 30) == rules.Award(50, 30, False)


# The catalog in the program file.

BASE = 'name = "t"\n[[partners]]\nid = "shop"\n'


def catalog(entry: str, head: str = "") -> str:
    return BASE + "[preferences]\n" + head + "[[preferences.catalog]]\n" + entry


def test_the_example_program_has_a_catalog_of_every_type() -> None:
    from konvert.program import load_program

    types = {d.type for d in load_program().preferences.catalog}

    assert types == {"choice", "multi_choice", "text", "month_day", "boolean"}


def test_a_program_without_preferences_has_the_default_purposes_and_no_catalog() -> None:
    preferences = parse_program(BASE).preferences

    assert preferences.purposes == ("personalisation", "marketing", "support")
    assert preferences.catalog == ()
    assert preferences.claw_back_on_withdrawal is False


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (catalog('key = "a"\nlabel = "A"\ntype = "choice"\npurposes = ["marketing"]\n'), "needs choices"),
        (
            catalog('key = "a"\nlabel = "A"\ntype = "choice"\nchoices = ["x", "x"]\npurposes = ["marketing"]\n'),
            "unique",
        ),
        (catalog('key = "a"\nlabel = "A"\ntype = "text"\nchoices = ["x"]\npurposes = ["marketing"]\n'), "only choice"),
        (catalog('key = "a"\nlabel = "A"\ntype = "boolean"\npurposes = ["tracking"]\n'), "unknown purpose tracking"),
        (catalog('key = "a"\nlabel = "A"\ntype = "boolean"\npurposes = []\n'), "preferences.catalog[0].purposes"),
        (catalog('key = "a"\nlabel = "A"\ntype = "colour"\npurposes = ["marketing"]\n'), "preferences.catalog[0].type"),
        (catalog('key = "a"\nlabel = "A"\ntype = "boolean"\npoints = -1\npurposes = ["marketing"]\n'), "points"),
        (catalog('key = "a"\nlabel = "A"\ntype = "boolean"\npurposes = ["marketing"]\ncolour = 1\n'), "colour"),
        (
            catalog(
                'key = "a"\nlabel = "A"\ntype = "boolean"\npurposes = ["marketing"]\n',
                'purposes = ["marketing", "marketing"]\n',
            ),
            "purposes must be unique",
        ),
        (
            catalog(
                'key = "a"\nlabel = "A"\ntype = "boolean"\npurposes = ["marketing"]\n[[preferences.catalog]]\nkey = "a"\n'
                'label = "B"\ntype = "boolean"\npurposes = ["marketing"]\n'
            ),
            "keys must be unique",
        ),
    ],
)
def test_a_bad_catalog_is_refused_naming_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_program(text)
