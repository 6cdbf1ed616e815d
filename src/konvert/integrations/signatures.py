"""The three webhook signature schemes, verified over the raw body before anything parses it.

Every comparison is constant-time (hmac.compare_digest), against each of the integration's
secrets, so a secret can be rotated with old and new both valid. Each scheme raises
InvalidSignature with a reason that reveals nothing about the secret.

- Shopify: ``X-Shopify-Hmac-Sha256`` = base64(HMAC-SHA256(secret, body)).
- Stripe: ``Stripe-Signature: t=<unix>,v1=<hex>[,v1=...]``, v1 = hex(HMAC-SHA256(secret,
  "<t>.<body>")); refused when t is more than ``STRIPE_TOLERANCE_SECONDS`` from now.
- Discourse: ``X-Discourse-Event-Signature: sha256=<hex>`` = hex(HMAC-SHA256(secret, body)).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime

from konvert.errors import InvalidSignature

STRIPE_TOLERANCE_SECONDS = 300
# Longer header values are not signatures konvert could have made sense of.
_HEADER_MAX = 1_000


def _mac(secret: str, message: bytes) -> bytes:
    return hmac.new(secret.encode(), message, hashlib.sha256).digest()


def _header(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name)
    if not value:
        raise InvalidSignature(f"the delivery has no {name} header")
    if len(value) > _HEADER_MAX:
        raise InvalidSignature(f"the {name} header is not a signature")
    return value


def _matches(expected: bytes, secrets: Sequence[str], compute: Callable[[str], bytes]) -> bool:
    # Every secret is tried, so the time taken does not say which one matched.
    found = False
    for secret in secrets:
        found |= hmac.compare_digest(compute(secret), expected)
    return found


def verify_shopify(secrets: Sequence[str], headers: Mapping[str, str], body: bytes, now: datetime) -> None:
    try:
        expected = base64.b64decode(_header(headers, "x-shopify-hmac-sha256"), validate=True)
    except ValueError:
        raise InvalidSignature("the X-Shopify-Hmac-Sha256 header is not base64") from None
    if not _matches(expected, secrets, lambda secret: _mac(secret, body)):
        raise InvalidSignature("the X-Shopify-Hmac-Sha256 header does not match the body")


def verify_stripe(secrets: Sequence[str], headers: Mapping[str, str], body: bytes, now: datetime) -> None:
    timestamp, signatures = None, []
    for part in _header(headers, "stripe-signature").split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isascii() and value.isdigit():
            timestamp = int(value)
        elif name == "v1":
            try:
                signatures.append(bytes.fromhex(value))
            except ValueError:
                continue
    if timestamp is None or not signatures:
        raise InvalidSignature("the Stripe-Signature header has no timestamp or no v1 signature")
    if abs(now.timestamp() - timestamp) > STRIPE_TOLERANCE_SECONDS:
        raise InvalidSignature(f"the Stripe-Signature timestamp is more than {STRIPE_TOLERANCE_SECONDS} s from now")
    signed = str(timestamp).encode() + b"." + body
    if not any(_matches(signature, secrets, lambda secret: _mac(secret, signed)) for signature in signatures):
        raise InvalidSignature("no v1 signature of the Stripe-Signature header matches the body")


def verify_discourse(secrets: Sequence[str], headers: Mapping[str, str], body: bytes, now: datetime) -> None:
    scheme, _, digest = _header(headers, "x-discourse-event-signature").partition("=")
    try:
        expected = bytes.fromhex(digest)
    except ValueError:
        raise InvalidSignature("the X-Discourse-Event-Signature header is not sha256=<hex>") from None
    if scheme != "sha256" or not _matches(expected, secrets, lambda secret: _mac(secret, body)):
        raise InvalidSignature("the X-Discourse-Event-Signature header does not match the body")


VERIFY = {"shopify": verify_shopify, "stripe": verify_stripe, "discourse": verify_discourse}
