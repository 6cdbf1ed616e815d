"""Wire types of the portal's one API route, and what a portal session holds."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

Locale = Literal["en", "de"]
LOCALES: tuple[Locale, ...] = ("en", "de")
ReturnUrl = Annotated[str, Meta(min_length=8, max_length=2000, pattern=r"^https?://[^\s]+$")]


class PortalSessionIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """What the shop's or forum's backend asks for when it sends a member to the portal."""

    # The portal's language; absent: the member's browser decides (Accept-Language).
    locale: Locale | None = None
    # Where "Back" leads, on one of the program's portal.return_origins.
    return_url: ReturnUrl | None = None


class PortalSessionOut(msgspec.Struct, frozen=True, kw_only=True):
    # Send the member here (a redirect or a link). It works once, until expires_at.
    url: str
    expires_at: datetime


class Grant(msgspec.Struct, frozen=True, kw_only=True):
    """What a portal link grants, kept in Redis under its token's digest until it is used."""

    member_id: str
    locale: Locale | None
    return_url: str | None
