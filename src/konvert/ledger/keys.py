"""Natural keys that are not per member: member ids, a partner's purchase ids, redemption,
adjustment and kudos ids (a kudos' member is its author).

Each is unique in ``natural_keys``, a table distributed by the key (konvert.distribution), which
also says which member the key belongs to. A write claims its key in the statement that records
it (concurrent duplicates meet on the table's primary key, which konvert.problems answers as an
idempotency conflict); a request that names only the key finds its member here first, with a
statement on one shard, and then reads the member's rows with statements on the member's.
"""

from __future__ import annotations

from konvert.db import Queryable

MEMBER = "member"
PURCHASE = "purchase"
REDEMPTION = "redemption"
ADJUSTMENT = "adjustment"
KUDOS = "kudos"

# A statement that records a keyed row puts this in front of its insert and selects from it, so
# that the row is written only with its key ($1 key, $2 kind, $3 scope, $4 member_uid).
CLAIM_CTE = """claimed as (
    insert into natural_keys (key, kind, scope, member_uid) values ($1, $2, $3, $4) returning member_uid
)"""


async def select_key_member(conn: Queryable, kind: str, key: str, scope: str = "") -> int | None:
    """The member a key belongs to, or None when nothing was recorded under it."""
    uid: int | None = await conn.fetchval(
        "select member_uid from natural_keys where key = $1 and kind = $2 and scope = $3", key, kind, scope
    )
    return uid
