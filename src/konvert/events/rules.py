"""Pure rules of event delivery: retry back-off, dead-lettering, disabling endpoints, the signed
headers of a webhook message, the feed's cursor. No I/O."""

from __future__ import annotations

import base64
import functools
import ipaddress
import random
import re
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import NamedTuple
from urllib.parse import urlsplit

from standardwebhooks.webhooks import Webhook

from konvert import errors
from konvert.settings import Settings

# Each retry waits this many times longer than the one before (before jitter).
BACKOFF_FACTOR = 4.0


class LegacyCursor(NamedTuple):
    """A feed cursor given out before the outbox had positions: the event it points past."""

    event_id: int


def contiguous(positions: Sequence[int], after: int, settled: int = 0) -> int:
    """How far ``positions`` (ascending, all past ``after``) run on from ``after`` with no number
    missing; a number missing at or below ``settled`` is no gap (its event was pruned).

    The sequencer gives positions without a gap, in one transaction. A number missing past what
    every publisher has read belongs to a part of such a transaction that is not visible yet (a
    Citus shard whose commit comes later): reading on past it would leave it behind the cursor."""
    reached = after
    for position in positions:
        if position > reached + 1 and position - 1 > settled:
            break
        reached = position
    return reached


def retry_delay_seconds(settings: Settings, attempts: int, rng: random.Random | None = None) -> float:
    """How long to wait after the ``attempts``-th failed attempt: exponential from the base, at
    most the maximum, with jitter (a random half to all of it), so that messages that failed
    together do not all come back at the same moment."""
    exponent = min(max(attempts - 1, 0), 64)
    delay = min(settings.webhook_backoff_base_seconds * BACKOFF_FACTOR**exponent, settings.webhook_backoff_max_seconds)
    return delay * (rng or random).uniform(0.5, 1.0)


class Failure(NamedTuple):
    """What a failed attempt leads to: the next attempt's time, or (None) the dead letter."""

    next_attempt_at: datetime | None


def after_failure(settings: Settings, attempts: int, first_attempt_at: datetime, now: datetime) -> Failure:
    """A message is retried until ``webhook_retry_seconds`` after its first attempt; the attempt
    that fails after that is its last."""
    if now >= first_attempt_at + timedelta(seconds=settings.webhook_retry_seconds):
        return Failure(None)
    return Failure(now + timedelta(seconds=retry_delay_seconds(settings, attempts)))


def signing_secrets(
    secret: str, previous: str | None, previous_expires_at: datetime | None, now: datetime
) -> list[str]:
    """The secrets that sign a message now: the current one, and the previous one during the grace
    period after a rotation (receivers that still have it keep verifying)."""
    if previous is not None and previous_expires_at is not None and now < previous_expires_at:
        return [secret, previous]
    return [secret]


def signed_headers(message_id: str, body: bytes, keys: list[str], now: datetime) -> dict[str, str]:
    """The Standard Webhooks headers of a message: its id, its time, and a signature per secret
    (space-separated, as the specification has receivers accept)."""
    signatures = " ".join(_signer(key).sign(message_id, now, body) for key in keys)
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signatures,
        "content-type": "application/json",
    }


@functools.lru_cache(maxsize=256)
def _signer(key: str) -> Webhook:
    # Made once per secret: a Webhook decodes its secret when it is made, not per message.
    return Webhook(key)


def address_refused(address: str) -> str | None:
    """Why an endpoint may not be reached at this IP address (None: it may): anything but a public
    unicast address would let whoever registers endpoints make konvert post into its own network."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone ("fe80::1%eth0") is no part of it
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind, refused in (
        ("an unspecified", ip.is_unspecified),
        ("a loopback", ip.is_loopback),
        ("a link-local", ip.is_link_local),
        ("a multicast", ip.is_multicast),
        ("a private", ip.is_private),
        ("a non-public", not ip.is_global),
    ):
        if refused:
            return f"{address} is {kind} address"
    return None


class Destination(NamedTuple):
    """Where an endpoint URL points: its host (an IP address or a name to resolve) and port."""

    host: str
    port: int
    literal: bool


def destination(url: str) -> Destination:
    """The host and port of an http(s) URL; ValueError for any other URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http(s) URL with a host")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        ipaddress.ip_address(parts.hostname.split("%", 1)[0])
        literal = True
    except ValueError:
        literal = False
        try:  # a name DNS can carry: labels of at most 63 octets, IDNA-encodable
            parts.hostname.encode("idna")
        except UnicodeError:
            raise ValueError("not an http(s) URL with a host DNS can resolve") from None
    return Destination(parts.hostname, port, literal)


def new_secret() -> str:
    """A new endpoint secret: 32 random bytes, base64, with the Standard Webhooks prefix."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def event_id_text(event_id: int) -> str:
    """An event's public id (also its webhook-id): stable across retries and publishers."""
    return f"evt_{event_id}"


_CURSOR = re.compile(r"^p(\d{1,19})$")
_LEGACY_CURSOR = re.compile(r"^e(\d{1,20})\.(\d{1,19})$")


def encode_cursor(position: int) -> str:
    return base64.urlsafe_b64encode(f"p{position}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int | LegacyCursor:
    """The position a feed cursor points past (or, for one given out before positions, its
    event); 422 naming ``after`` for anything else."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except ValueError:
        text = ""
    if (match := _CURSOR.match(text)) is not None and int(match[1]) < 2**63:
        return int(match[1])
    if (legacy := _LEGACY_CURSOR.match(text)) is not None and int(legacy[1]) < 2**64 and int(legacy[2]) < 2**63:
        return LegacyCursor(int(legacy[2]))
    raise errors.ValidationFailed(
        "after is not a cursor this API gave out", errors=[{"field": "after", "message": "invalid cursor"}]
    )
