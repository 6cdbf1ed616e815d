"""Reputation's part in erasing a member (registered with konvert.preferences.hooks).

Kudos keep their stored responses (which name author and giver) and member events their
payloads: both get the pseudonym instead of the member id, and the member's kudos requests can
no longer be replayed. Leaderboards then rebuild without erased members.
"""

from __future__ import annotations

import asyncpg

from konvert.preferences.hooks import ERASURE_HOOKS, ERASURE_STEPS
from konvert.preferences.store import ERASED_REQUEST_HASH, RENAMED_BYTEA, RENAMED_JSONB
from konvert.reputation.leaderboard import leaderboards
from konvert.services import Services


async def rename_in_kudos_and_events(conn: asyncpg.Connection, member_uid: int, old_member_id: str, pseudonym: str) -> None:
    await conn.execute(
        f"""
        update kudos set response = {RENAMED_BYTEA.format(column="response")},
                         retraction_response = {RENAMED_BYTEA.format(column="retraction_response")},
                         request_hash = $4
        where author_uid = $1 or giver_uid = $1
        """,
        member_uid,
        old_member_id,
        pseudonym,
        ERASED_REQUEST_HASH,
    )
    await conn.execute(
        f"update events set payload = {RENAMED_JSONB.format(column='payload')} where member_uid = $1",
        member_uid,
        old_member_id,
        pseudonym,
    )


async def rebuild_leaderboards_without(services: Services, old_member_id: str, pseudonym: str | None) -> None:
    """Drop the leaderboards' build marker: the next read rebuilds them, skipping erased members."""
    if pseudonym is None:
        return
    keys = await leaderboards(services).keys(services.pool)
    await services.redis.delete(keys.marker)


ERASURE_STEPS.append(rename_in_kudos_and_events)
ERASURE_HOOKS.append(rebuild_leaderboards_without)
