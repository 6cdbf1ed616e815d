"""Where webhooks may go: an endpoint's URL is checked when it is registered, and every address a
delivery connects to is checked again (DNS answers change), so that konvert cannot be made to post
to loopback, private or link-local addresses unless KONVERT_WEBHOOK_ALLOW_PRIVATE_ADDRESSES says so.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Any

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from konvert import errors
from konvert.events import rules
from konvert.settings import Settings

# How long the check of a new endpoint's host waits for DNS.
_RESOLVE_TIMEOUT_SECONDS = 5.0


class DestinationRefused(OSError):
    """A delivery's host resolved to an address it may not go to (aiohttp reports it as a DNS
    error of the attempt, which is then retried like any failed attempt)."""

    def __init__(self, reason: str) -> None:
        # With an errno, aiohttp's error message carries the reason.
        super().__init__(errno.EACCES, reason)


async def check_url(settings: Settings, url: str) -> None:
    """Refuse (422 webhook_url_refused) a URL that is not http(s), or whose host is or resolves to
    an address deliveries may not go to."""
    try:
        where = rules.destination(url)
    except ValueError:
        raise _refused(url, "it is not an http(s) URL with a host") from None
    if settings.webhook_allow_private_addresses:
        return
    if where.literal:
        addresses = [where.host]
    else:
        try:
            found = await asyncio.wait_for(
                asyncio.get_running_loop().getaddrinfo(where.host, where.port, type=socket.SOCK_STREAM),
                _RESOLVE_TIMEOUT_SECONDS,
            )
        except (OSError, TimeoutError):
            raise _refused(url, f"its host {where.host} does not resolve") from None
        addresses = [str(info[4][0]) for info in found]
    for address in addresses:
        reason = rules.address_refused(address)
        if reason is not None:
            raise _refused(url, reason)


def _refused(url: str, reason: str) -> errors.WebhookUrlRefused:
    return errors.WebhookUrlRefused(
        f"webhooks may not go to {url}: {reason}",
        errors=[{"field": "url", "message": reason}],
    )


def literal_refused(settings: Settings, url: str) -> str | None:
    """Why a delivery may not go to this URL's host if the host is an IP address (names are
    checked by PublicResolver as they resolve); None: it may."""
    if settings.webhook_allow_private_addresses:
        return None
    try:
        where = rules.destination(url)
    except ValueError:
        return "not an http(s) URL with a host"
    return rules.address_refused(where.host) if where.literal else None


class PublicResolver(AbstractResolver):
    """aiohttp's resolver, refusing hosts that resolve to an address deliveries may not go to: the
    addresses checked are the ones connected to."""

    def __init__(self) -> None:
        self._resolver = DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: Any = socket.AF_INET) -> list[ResolveResult]:
        found = await self._resolver.resolve(host, port, family)
        for result in found:
            reason = rules.address_refused(result["host"])
            if reason is not None:
                raise DestinationRefused(f"{host} resolves to {result['host']}: {reason}")
        return found

    async def close(self) -> None:
        await self._resolver.close()
