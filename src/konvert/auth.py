"""API keys with scopes: creation, storage (hash only), verification and the route guard.

A key looks like ``kvt_<43 url-safe characters>`` (256 random bits). Only its SHA-256 is stored.
Verified keys are remembered in-process for ``auth_cache_seconds`` so a request does not pay a
database round trip; revocation therefore takes effect within that time in every process. Keys
found unknown are remembered as long (apart, so that a flood of them cannot push the valid ones
out), and a client whose keys keep failing is refused with 429 before any lookup.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
from collections import OrderedDict
from datetime import datetime
from typing import Any, Generic, TypeVar

import asyncpg
import msgspec
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from konvert import errors
from konvert.db import Connection

KEY_PREFIX = "kvt_"
SCOPES = (
    "purchases:write",
    "redemptions:write",
    "kudos:write",
    "members:read",
    "members:write",
    "events:read",
    "admin",
)
# `admin` may do everything; the others only what they name.
ADMIN_SCOPE = "admin"
_CACHE_ENTRIES_MAX = 10_000
# Failed authentications are counted per client address over this window.
FAILURES_WINDOW_SECONDS = 60.0
OPENAPI_PATH = "/schema"


class Principal(msgspec.Struct, frozen=True):
    """Who is calling: the key's id and name (recorded on what they change) and its scopes."""

    key_id: int
    name: str
    scopes: frozenset[str]
    # The partners a bound key may post and refund purchases for; None: any.
    partners: frozenset[str] | None = None
    # The consent purposes a bound key reads preferences for; None: any (and the whole export).
    purposes: frozenset[str] | None = None

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or ADMIN_SCOPE in self.scopes

    def check_partner(self, partner: str | None) -> str | None:
        """The partner a purchase write is for, checked against a bound key's partners (a key
        bound to one partner names it when the request does not); PartnerForbidden if not allowed."""
        if self.partners is None:
            return partner
        if partner is None and len(self.partners) == 1:
            return next(iter(self.partners))
        if partner not in self.partners:
            raise errors.PartnerForbidden(
                f"this API key may write purchases only for {', '.join(sorted(self.partners))}"
            )
        return partner

    def check_purposes(self, purpose: str | None) -> frozenset[str] | None:
        """The purposes a preference read is for: the one asked for, else a bound key's own (None:
        unfiltered); PurposeForbidden for a purpose a bound key is not bound to."""
        if purpose is not None:
            if self.purposes is not None and purpose not in self.purposes:
                raise errors.PurposeForbidden(
                    f"this API key may read preferences only for {', '.join(sorted(self.purposes))}"
                )
            return frozenset({purpose})
        return self.purposes

    def check_unbound_by_purpose(self) -> None:
        """For reads of everything on a member (the export): a purpose-bound key may not."""
        if self.purposes is not None:
            raise errors.PurposeForbidden("this API key is bound to purposes; it may not read a whole member")


class ApiKeyInfo(msgspec.Struct, frozen=True):
    key_id: int
    name: str
    prefix: str
    scopes: list[str]
    created_at: datetime
    revoked_at: datetime | None
    partners: list[str] | None = None
    purposes: list[str] | None = None


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def validate_scopes(scopes: list[str]) -> list[str]:
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise errors.ValidationFailed(f"unknown scope {', '.join(unknown)}; scopes are {', '.join(SCOPES)}")
    if not scopes:
        raise errors.ValidationFailed("a key needs at least one scope")
    return sorted(set(scopes))


async def insert_key(
    conn: Connection,
    name: str,
    scopes: list[str],
    partners: list[str] | None = None,
    purposes: list[str] | None = None,
) -> tuple[str, ApiKeyInfo]:
    """Create a key (bound to ``partners`` and ``purposes`` if given); return the key itself (to
    show once) and what is stored about it."""
    key = generate_key()
    row = await conn.fetchrow(
        """
        insert into api_keys (name, prefix, secret_hash, scopes, partners, purposes)
        values ($1, $2, $3, $4, $5, $6)
        returning key_id, name, prefix, scopes, created_at, revoked_at, partners, purposes
        """,
        name,
        key[: len(KEY_PREFIX) + 8],
        hash_key(key),
        validate_scopes(scopes),
        sorted(set(partners)) if partners else None,
        sorted(set(purposes)) if purposes else None,
    )
    assert row is not None
    return key, ApiKeyInfo(**dict(row))


async def select_keys(conn: Connection) -> list[ApiKeyInfo]:
    rows = await conn.fetch(
        "select key_id, name, prefix, scopes, created_at, revoked_at, partners, purposes from api_keys order by key_id"
    )
    return [ApiKeyInfo(**dict(r)) for r in rows]


async def revoke_key(conn: Connection, key_id: int) -> bool:
    status = await conn.execute(
        "update api_keys set revoked_at = now() where key_id = $1 and revoked_at is null", key_id
    )
    return status.endswith(" 1")


async def count_active_admin_keys(conn: Connection) -> int:
    count: int = await conn.fetchval(
        "select count(*) from api_keys where revoked_at is null and $1 = any(scopes)", ADMIN_SCOPE
    )
    return count


K = TypeVar("K")
V = TypeVar("V")


class Recent(Generic[K, V]):
    """At most ``size`` entries, each for ``seconds``; when full, the least recently used goes."""

    def __init__(self, size: int, seconds: float) -> None:
        self._size = size
        self._seconds = seconds
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def get(self, key: K, now: float) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= now:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: K, value: V, now: float) -> None:
        if self._seconds <= 0:
            return
        self._entries[key] = (now + self._seconds, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


class KeyVerifier:
    """Turns an ``Authorization`` header into a Principal, or raises Unauthenticated (or
    RateLimited, for a client whose keys failed too often)."""

    def __init__(self, pool: asyncpg.Pool, cache_seconds: float, failures_per_minute: int = 60) -> None:
        self._pool = pool
        # By the key as presented: a request whose key was verified lately costs a dict lookup,
        # not a SHA-256. (The key is in this process's memory for the request anyway.)
        self._known: Recent[str, Principal] = Recent(_CACHE_ENTRIES_MAX, cache_seconds)
        self._unknown: Recent[str, bool] = Recent(_CACHE_ENTRIES_MAX, cache_seconds)
        # Per client address: (when its window ends, failures in it).
        self._failures: Recent[str, list[float]] = Recent(_CACHE_ENTRIES_MAX, FAILURES_WINDOW_SECONDS)
        self._failures_max = failures_per_minute

    async def authenticate(self, authorization: str | None, client: str = "") -> Principal:
        if not authorization:
            raise errors.Unauthenticated("send an API key as 'Authorization: Bearer <key>'")
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key.startswith(KEY_PREFIX) or len(key) > 100:
            raise errors.Unauthenticated("send an API key as 'Authorization: Bearer <key>'")
        now = time.monotonic()
        principal = self._known.get(key, now)
        if principal is not None:
            return principal
        self._check_failures(client, now)
        if self._unknown.get(key, now) is None:
            principal = await self._lookup(hash_key(key))
            if principal is not None:
                self._known.put(key, principal, now)
                return principal
            self._unknown.put(key, True, now)
        self._failed(client, now)
        raise errors.Unauthenticated("the API key is not valid or was revoked")

    def _check_failures(self, client: str, now: float) -> None:
        window = self._failures.get(client, now)
        if window is not None and window[1] >= self._failures_max:
            wait = max(1, math.ceil(window[0] - now))
            raise errors.RateLimited(
                f"too many failed authentications from this client; retry in {wait} s", retry_after=wait
            )

    def _failed(self, client: str, now: float) -> None:
        window = self._failures.get(client, now)
        if window is None:
            self._failures.put(client, [now + FAILURES_WINDOW_SECONDS, 1.0], now)
        else:
            window[1] += 1

    async def _lookup(self, digest: bytes) -> Principal | None:
        row = await self._pool.fetchrow(
            """
            select key_id, name, scopes, partners, purposes from api_keys
            where secret_hash = $1 and revoked_at is null
            """,
            digest,
        )
        if row is None:
            return None
        partners = None if row["partners"] is None else frozenset(row["partners"])
        purposes = None if row["purposes"] is None else frozenset(row["purposes"])
        return Principal(row["key_id"], row["name"], frozenset(row["scopes"]), partners, purposes)


async def authorize(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """The guard on every route: the key must carry the scope the route declares in ``opt``.

    Routes declare ``opt={"scope": ...}`` or ``opt={"public": True}``; the convention test makes
    sure each one does. Routes that take a body also require ``Content-Type: application/json``.
    """
    if connection.scope.get("method") == "OPTIONS":
        # CORS preflights: konvert defines no OPTIONS routes; Litestar's automatic ones only
        # list the allowed methods, and browsers send them without credentials.
        return
    required = handler.opt.get("scope")
    if required is None:
        # Health, metrics and the OpenAPI documents are public; anything else without a scope
        # is a programming error, and it fails closed.
        if handler.opt.get("public") or connection.url.path.startswith(OPENAPI_PATH):
            return
        # The member portal's pages: a member's session, checked by the portal's own guard.
        if "member_session" in handler.opt:
            return
        raise errors.Forbidden("this route declares no scope")
    verifier: KeyVerifier = connection.app.state.services.keys
    headers = connection.headers
    client = connection.client.host if connection.client else ""
    principal = await verifier.authenticate(headers.get("authorization"), client)
    if not principal.allows(required):
        raise errors.Forbidden(f"this API key lacks the scope {required}")
    connection.scope["state"]["principal"] = principal
    if handler.opt.get("body") and not is_json(headers.get("content-type")):
        raise errors.UnsupportedMediaType("send the request body as application/json")


def is_json(content_type: str | None) -> bool:
    """Whether a Content-Type header says JSON (parameters such as charset aside)."""
    return (content_type or "").split(";", 1)[0].strip().lower() == "application/json"


def principal_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Principal:
    principal: Principal = connection.scope["state"]["principal"]
    return principal
