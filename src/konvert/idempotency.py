"""Idempotent writes: every write has a natural key; its request hash and response are stored.

Replaying the same request returns the stored response (``Idempotent-Replayed: true``); the same
key with a different body is refused with 409 ``idempotency_conflict``. Concurrent duplicates
meet on the key's unique index, so exactly one applies.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec
from litestar import Response

from konvert import errors
from konvert.db import Row

REPLAYED_HEADER = "Idempotent-Replayed"
# Written over an erased member's request digests: no SHA-256 digest is one byte long, so a replay
# of one of their old requests is refused (409) instead of answered with their data.
ERASED_REQUEST_HASH = b"\x00"
_encode = msgspec.json.Encoder(decimal_format="number").encode


class Outcome(msgspec.Struct, frozen=True):
    """A write's response body, and whether it replays an earlier identical request."""

    body: bytes
    replayed: bool = False


def request_hash(*parts: object) -> bytes:
    """A digest of the validated request: same content, same digest, whatever the JSON spacing."""
    return hashlib.sha256(b"\x00".join(_encode(p) for p in parts)).digest()


def replay(existing: Row, digest: bytes, key: str = "this id") -> Outcome:
    """The stored outcome (``request_hash``, ``response``) for a key already used, if the request
    is the same one; else IdempotencyConflict (naming the key as ``key``)."""
    if bytes(existing["request_hash"]) != digest:
        raise errors.IdempotencyConflict(f"{key} was used before with a different request body")
    return Outcome(bytes(existing["response"]), replayed=True)


def replayed(existing: Row, digest: bytes, key: str = "this id") -> Outcome | errors.KonvertError:
    """``replay`` for an item of a batch: its refusal is returned, to fail that item alone."""
    try:
        return replay(existing, digest, key)
    except errors.KonvertError as refused:
        return refused


def written(outcome: Outcome, status_code: int = 201) -> Response[Any]:
    """The stored response of a write; a replay carries ``Idempotent-Replayed: true``."""
    headers = {REPLAYED_HEADER: "true"} if outcome.replayed else None
    return Response(outcome.body, status_code=status_code, media_type="application/json", headers=headers)
