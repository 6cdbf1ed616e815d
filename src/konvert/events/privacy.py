"""Events' part in a member's export: the member's events konvert still keeps (published ones
until they are pruned, undelivered ones until every endpoint took them or gave up), with where
each stands per webhook endpoint.

Erasure needs no step here: an event names its member only through the member's row, which the
erasure renames, so undelivered events go out with the pseudonym and delivered ones are never sent
again.
"""

from __future__ import annotations

from typing import Any

import msgspec

from konvert.db import Connection
from konvert.events import rules, store

_decode = msgspec.json.Decoder(dict).decode
_decode_deliveries = msgspec.json.Decoder(list).decode


async def export(conn: Connection, member_uid: int, limit: int) -> dict[str, list[Any]]:
    """The member's kept events in their order, ``limit`` at most."""
    return {
        "events": [
            {
                "id": rules.event_id_text(row["event_id"]),
                "type": row["type"],
                "occurred_at": row["occurred_at"],
                "sequence": row["sequence"],
                "data": _decode(row["data"]),
                "webhook_deliveries": _decode_deliveries(row["deliveries"]),
            }
            for row in await store.select_member_events(conn, member_uid, limit)
        ]
    }
