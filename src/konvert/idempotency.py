"""Idempotent writes: every write has a natural key; its request hash and response are stored.

Replaying the same request returns the stored response (``Idempotent-Replayed: true``); the same
key with a different body is refused with 409 ``idempotency_conflict``. Concurrent duplicates
meet on the key's unique index, so exactly one applies.
"""

from __future__ import annotations

import hashlib

import asyncpg
import msgspec
from litestar import Response

from konvert import errors

REPLAYED_HEADER = "Idempotent-Replayed"
_encode = msgspec.json.Encoder(decimal_format="number").encode


class Outcome(msgspec.Struct, frozen=True):
    """A write's response body, and whether it replays an earlier identical request."""

    body: bytes
    replayed: bool = False


def request_hash(*parts: object) -> bytes:
    """A digest of the validated request: same content, same digest, whatever the JSON spacing."""
    return hashlib.sha256(b"\x00".join(_encode(p) for p in parts)).digest()


def replay(existing: asyncpg.Record | None, digest: bytes) -> Outcome:
    """The stored outcome for a key already used, if the request is the same one."""
    if existing is None:  # pragma: no cover - the conflicting row is committed before we see the conflict
        raise errors.Conflict("the request conflicted with another; retry it")
    if bytes(existing["request_hash"]) != digest:
        raise errors.IdempotencyConflict("this id was used before with a different request body")
    return Outcome(bytes(existing["response"]), replayed=True)


def written(outcome: Outcome, status_code: int = 201) -> Response[bytes]:
    """The stored response of a write; a replay carries ``Idempotent-Replayed: true``."""
    headers = {REPLAYED_HEADER: "true"} if outcome.replayed else None
    return Response(outcome.body, status_code=status_code, media_type="application/json", headers=headers)
