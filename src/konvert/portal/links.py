"""Portal links: a single-use token, valid for a few minutes, that starts a member's session.

The token is 256 random bits; Redis keeps only its SHA-256, with what it grants, for the link's
lifetime. Opening the link takes the grant out with GETDEL, so of two requests with the same
token exactly one gets it: a link cannot be used twice, not even concurrently.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import msgspec

from konvert import errors
from konvert.ledger import reads
from konvert.portal.model import Grant, PortalSessionIn, PortalSessionOut
from konvert.redis_client import REDIS_ERRORS

if TYPE_CHECKING:
    from konvert.services import Services

START_PATH = "/portal/start/"
_encode = msgspec.json.Encoder().encode
_grant = msgspec.json.Decoder(Grant).decode


def _key(services: Services, token: str) -> str:
    digest = hashlib.sha256(token.encode()).hexdigest()
    return f"{services.settings.redis_key_prefix}:portal:link:{digest}"


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


async def issue(services: Services, member_id: str, request: PortalSessionIn, base_url: str) -> PortalSessionOut:
    """A link that signs ``member_id`` into the portal once, within the link lifetime."""
    allowed = {origin.lower() for origin in services.program.portal.return_origins}
    if request.return_url is not None and origin_of(request.return_url) not in allowed:
        raise errors.ValidationFailed(
            "return_url must be on one of the program's portal.return_origins",
            errors=[{"field": "return_url", "message": f"allowed origins: {', '.join(sorted(allowed)) or 'none'}"}],
        )
    if await reads.select_live_member_uid(services.pool, member_id) is None:
        raise errors.MemberNotFound(f"no member {member_id!r}")
    grant = Grant(member_id=member_id, locale=request.locale, return_url=request.return_url)
    token = await _store(services, grant)
    base = (services.settings.public_url or base_url).rstrip("/")
    ttl_seconds = services.settings.portal_link_ttl_seconds
    return PortalSessionOut(
        url=f"{base}{START_PATH}{token}", expires_at=services.clock() + timedelta(seconds=ttl_seconds)
    )


async def reissue(services: Services, grant: Grant) -> str:
    """A new link (its path) granting what a link just used granted: the card's way into the
    portal, which it opens as a page of its own."""
    return START_PATH + await _store(services, grant)


async def _store(services: Services, grant: Grant) -> str:
    token = secrets.token_urlsafe(32)
    try:
        await services.redis.set(_key(services, token), _encode(grant), ex=services.settings.portal_link_ttl_seconds)
    except REDIS_ERRORS as exc:
        raise errors.ServiceUnavailable("portal links cannot be made while Redis is unavailable") from exc
    return token


async def redeem(services: Services, token: str) -> Grant | None:
    """What the link grants, taken out so that no one can use it again; None when the token is
    unknown, used or expired."""
    if not 20 <= len(token) <= 100:
        return None
    try:
        stored = await services.redis.getdel(_key(services, token))
    except REDIS_ERRORS as exc:
        raise errors.ServiceUnavailable("the portal is unavailable while Redis is") from exc
    return _grant(stored) if stored is not None else None
