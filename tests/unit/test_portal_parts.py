"""The portal's pure parts: the program's portal section, language negotiation, and the
German catalog covering every message the pages use."""

from __future__ import annotations

import pytest
from babel.numbers import format_decimal

from konvert.errors import ConfigurationError
from konvert.portal import i18n
from konvert.portal.views import _WORDS
from konvert.program import parse_program
from tests.conftest import TEST_PROGRAM


def test_the_program_names_the_portals_origins() -> None:
    program = parse_program(
        TEST_PROGRAM
        + '[portal]\nreturn_origins = ["https://shop.example.com"]\nframe_ancestors = ["http://localhost:8080"]\n'
    )

    assert program.portal.return_origins == ("https://shop.example.com",)
    assert program.portal.frame_ancestors == ("http://localhost:8080",)


@pytest.mark.parametrize(
    "origin", ["https://shop.example.com/account", "shop.example.com", "*", "https://a.b; script-src *"]
)
def test_an_origin_with_a_path_or_anything_else_is_refused(origin: str) -> None:
    with pytest.raises(ConfigurationError, match=r"portal\.frame_ancestors"):
        parse_program(TEST_PROGRAM + f'[portal]\nframe_ancestors = ["{origin}"]\n')


@pytest.mark.parametrize(
    ("header", "chosen"),
    [
        ("de-DE,de;q=0.9,en;q=0.8", "de"),
        ("en-GB,en;q=0.9,de;q=0.8", "en"),
        ("fr-FR,fr;q=0.9,de;q=0.5", "de"),
        ("fr;q=1,en;q=0.2,de;q=0.7", "de"),
        ("de;q=0", "en"),
        ("", "en"),
        (None, "en"),
        ("x;q=abc,,;", "en"),
    ],
)
def test_the_browsers_languages_choose_english_or_german(header: str | None, chosen: str) -> None:
    assert i18n.from_accept_language(header) == chosen


def test_every_activity_line_has_a_german_translation() -> None:
    german = i18n.translations("de")

    untranslated = [message for message in _WORDS.values() if german.gettext(message) == message]

    assert untranslated == []


@pytest.mark.parametrize("value", [0, 7, 999, 1000, 1234, -20, 1_000_000, -1_234_567, 10**12])
@pytest.mark.parametrize("locale", ["en", "de"])
def test_points_are_written_as_babel_writes_them(value: int, locale: str) -> None:
    assert i18n.format_points(value, locale) == format_decimal(value, locale=locale)
