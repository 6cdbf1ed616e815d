"""Erasure hooks: how other features take part in erasing a member.

Erasure (``konvert.preferences.service.erase``) clears what the core tables hold about a person.
A feature with tables or Redis keys of its own registers here, at import time of its module,
so that erasure reaches them without this package knowing them:

``ERASURE_STEPS``
    run inside the erasure transaction, after the member's row is locked and before it is
    renamed: ``await step(conn, member_uid, old_member_id, pseudonym)``. Clear or rewrite the
    feature's personal data there (free text, member ids inside JSON). An exception rolls the
    whole erasure back.

``ERASURE_HOOKS``
    run after the erasure committed: ``await hook(services, old_member_id, pseudonym)``, e.g. to
    remove the member from Redis leaderboards. ``pseudonym`` is None when DELETE finds nothing
    to erase (never existed, or erased before): hooks run on every DELETE so that retrying it
    finishes a clean-up that failed. Hooks must therefore be idempotent. If one raises, the
    DELETE answers 503 and the client retries it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import asyncpg

if TYPE_CHECKING:
    from konvert.services import Services

ErasureStep = Callable[[asyncpg.Connection, int, str, str], Awaitable[None]]
ErasureHook = Callable[["Services", str, "str | None"], Awaitable[None]]

ERASURE_STEPS: list[ErasureStep] = []
ERASURE_HOOKS: list[ErasureHook] = []
