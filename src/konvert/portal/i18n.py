"""The portal's languages: English and German messages (gettext catalogs, read with Babel), and
numbers and dates formatted per locale (Babel's CLDR data).

The catalogs are the .po files under ``locales/``; they are compiled in memory at start-up, so
the package ships no build artefacts.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Iterable, Mapping
from datetime import date, datetime
from importlib import resources
from typing import Any

from babel import Locale as BabelLocale
from babel import dates, numbers
from babel.core import negotiate_locale
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from babel.support import NullTranslations, Translations
from jinja2 import pass_context
from jinja2.ext import Extension
from jinja2.lexer import Token, TokenStream
from jinja2.runtime import Context
from markupsafe import Markup

from konvert.portal.model import LOCALES, Locale

DEFAULT_LOCALE: Locale = "en"
_ACCEPT_LANGUAGE_ENTRIES_MAX = 20
_ACCEPT_LANGUAGE_CACHED_LENGTH_MAX = 200


def _load(locale: str) -> NullTranslations:
    po = resources.files("konvert.portal").joinpath("locales", locale, "LC_MESSAGES", "messages.po")
    if not po.is_file():
        return NullTranslations()
    with po.open("rb") as source:
        catalog = read_po(source, locale=locale)
    compiled = io.BytesIO()
    write_mo(compiled, catalog)
    compiled.seek(0)
    return Translations(compiled)


# Loaded on first use, not at import: processes that never show a page (the CLI, the jobs)
# skip the catalogs and the CLDR data, and a service worker starts sooner.
@functools.cache
def translations(locale: str) -> NullTranslations:
    return _load(locale)


@functools.cache
def babel_locale(locale: str) -> BabelLocale:
    return BabelLocale.parse(locale)


def from_accept_language(header: str | None) -> Locale:
    """The best of the portal's locales for an Accept-Language header (English if none fits)."""
    # A browser sends the same header with every page: each is negotiated once (if not too long
    # to keep).
    if header is None or len(header) <= _ACCEPT_LANGUAGE_CACHED_LENGTH_MAX:
        return _negotiated(header)
    return _negotiate(header)


@functools.lru_cache(maxsize=256)
def _negotiated(header: str | None) -> Locale:
    return _negotiate(header)


def _negotiate(header: str | None) -> Locale:
    preferred: list[tuple[float, str]] = []
    for entry in (header or "").split(",")[:_ACCEPT_LANGUAGE_ENTRIES_MAX]:
        tag, _, params = entry.strip().partition(";")
        quality = 1.0
        if params.strip().startswith("q="):
            try:
                quality = float(params.strip()[2:])
            except ValueError:
                quality = 0.0
        if tag and quality > 0:
            preferred.append((quality, tag.strip()))
    preferred.sort(key=lambda item: -item[0])  # stable: equal qualities keep the header's order
    # Babel matches "de-AT" to "de" and "en-GB" to "en"; the tags alone, most wanted first.
    tags = [tag.split("-")[0].lower() for _, tag in preferred]
    chosen = negotiate_locale(tags, list(LOCALES))
    return "de" if chosen == "de" else DEFAULT_LOCALE


def _locale(context: Mapping[str, Any] | Context) -> str:
    value = context.get("locale")
    return value if value in LOCALES else DEFAULT_LOCALE


# Jinja's "newstyle" gettext, for the page's locale: the message translated, then its
# %(name)s placeholders filled in (escaped when the template autoescapes). Jinja's own wrapper
# around a gettext function makes a second template call per message; these do it in one.
@pass_context
def gettext(context: Context, message: str, **variables: Any) -> str:
    translated = translations(_locale(context)).gettext(message)
    if context.eval_ctx.autoescape:
        return Markup(translated) % variables  # noqa: S704 (our own catalog; the values are escaped)
    return translated % variables


@pass_context
def ngettext(context: Context, singular: str, plural: str, n: int, **variables: Any) -> str:
    translated = translations(_locale(context)).ngettext(singular, plural, n)
    variables.setdefault("num", n)
    if context.eval_ctx.autoescape:
        return Markup(translated) % variables  # noqa: S704 (our own catalog; the values are escaped)
    return translated % variables


GLOBALS = {"gettext": gettext, "_": gettext, "ngettext": ngettext}


@functools.cache
def messages(locale: str) -> dict[str, Any]:
    """gettext and ngettext bound to one locale, for a page's context (where they take the place
    of the globals above). Jinja calls a function that takes the template's context with extra
    work on each of a page's thirty-odd messages; these take none, and keep each translated
    message as markup. For the portal's templates, which all autoescape."""
    catalog = translations(locale)

    @functools.lru_cache(maxsize=1024)
    def translated(message: str) -> Markup:
        return Markup(catalog.gettext(message))  # noqa: S704 (our own catalog)

    def bound_gettext(message: str, **variables: Any) -> str:
        text = translated(message)
        return text % variables if variables else text  # the values are escaped

    def bound_ngettext(singular: str, plural: str, n: int, **variables: Any) -> str:
        variables.setdefault("num", n)
        return Markup(catalog.ngettext(singular, plural, n)) % variables  # noqa: S704 (our own catalog)

    return {"gettext": bound_gettext, "_": bound_gettext, "ngettext": bound_ngettext}


# Points are whole numbers, and both locales group them by threes (CLDR's "#,##0.###"): the
# locale's group symbol in Python's own grouping gives Babel's result at a fraction of its cost,
# which matters with a dozen figures on every page.
@functools.cache
def _symbols(locale: str) -> tuple[str, str]:
    """The locale's group symbol and minus sign."""
    return numbers.get_group_symbol(babel_locale(locale)), numbers.get_minus_sign_symbol(babel_locale(locale))


def format_points(value: int, locale: str) -> str:
    """An integer as the locale writes it: 1,234,567 (en) or 1.234.567 (de)."""
    group, minus = _symbols(locale)
    text = f"{abs(value):,}".replace(",", group)
    return minus + text if value < 0 else text


@pass_context
def number(context: Mapping[str, Any], value: int) -> str:
    return format_points(value, _locale(context))


@pass_context
def signed(context: Mapping[str, Any], value: int) -> str:
    """A change of points: +151, or a real minus sign (U+2212) before what was taken."""
    text = format_points(abs(value), _locale(context))
    return f"+{text}" if value > 0 else f"\u2212{text}" if value < 0 else text


@functools.lru_cache(maxsize=4096)
def _format_day(value: date, locale: str) -> str:
    return dates.format_date(value, format="medium", locale=babel_locale(locale))


@pass_context
def day(context: Mapping[str, Any], value: date | datetime) -> str:
    """A date in the locale's medium format (7 Dec 2026, 07.12.2026), in UTC. Pages show the
    same few dates over and over (when points vest or expire), so each is formatted once."""
    if isinstance(value, datetime):
        value = value.astimezone(dates.UTC).date()
    return _format_day(value, _locale(context))


@pass_context
def moment(context: Mapping[str, Any], value: datetime) -> str:
    return dates.format_datetime(value, format="medium", tzinfo=dates.UTC, locale=babel_locale(_locale(context)))


@functools.cache
def language_name(locale: str) -> str:
    """A language's name in its own language (Deutsch, English), as language pickers show it."""
    if locale not in LOCALES:
        return locale
    name: str = babel_locale(locale).get_display_name(locale) or locale
    return name[:1].upper() + name[1:]


FILTERS = {"number": number, "signed": signed, "day": day, "moment": moment, "language_name": language_name}


class CompiledMessages(Extension):
    """Translates each message without placeholders (``_("Overview")``) when a template is
    compiled, for the locale its name starts with ("de/overview.html"): the page writes it as
    text instead of calling gettext on every render. Messages with placeholders are still
    translated while rendering (``messages``)."""

    def filter_stream(self, stream: TokenStream) -> Iterable[Token]:
        locale = (stream.name or "").partition("/")[0]
        tokens = list(stream)
        if locale not in LOCALES:
            return tokens
        catalog = translations(locale)
        compiled: list[Token] = []
        i = 0
        while i < len(tokens):
            if _is_plain_message(tokens, i):
                compiled.append(Token(tokens[i].lineno, "string", catalog.gettext(tokens[i + 2].value)))
                i += 4
            else:
                compiled.append(tokens[i])
                i += 1
        return compiled


def _is_plain_message(tokens: list[Token], i: int) -> bool:
    """Whether tokens[i:i+4] are ``_("...")`` or ``gettext("...")`` (and not an attribute's)."""
    return (
        tokens[i].type == "name"
        and tokens[i].value in ("_", "gettext")
        and (i == 0 or tokens[i - 1].type != "dot")
        and [t.type for t in tokens[i + 1 : i + 4]] == ["lparen", "string", "rparen"]
    )
