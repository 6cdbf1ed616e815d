"""How konvert's tables spread over a Citus cluster: the one list of them.

Tables that grow with members are distributed by the member (``member_uid``) and co-located
with ``members``, so that everything of one member lives on one shard and every statement that
names one member runs on one node. Program data (partners' keys, rewards, integrations, webhook
endpoints) is small and read by every request: reference tables, copied to every node. A
natural key that is not per member (a partner's purchase id, a redemption, adjustment or kudos id, a
shop's customer id, a delivery id) is made unique in a table distributed by that key instead,
never by a unique constraint across shards (docs/SCALING.md, "Citus").

``tests/integration/test_distribution.py`` checks the schema against this list (every primary
key and unique constraint holds its table's distribution column, every foreign key between
distributed tables joins on it), and ``konvert citus-setup --print`` turns it into the calls
that distribute a database.
"""

from __future__ import annotations

from typing import NamedTuple


class Distributed(NamedTuple):
    """A table spread over shards by ``column``; co-located with ``colocate_with`` (None: a
    co-location group of its own)."""

    table: str
    column: str
    colocate_with: str | None


MEMBER = "member_uid"

# Every member's rows, co-located with members, in the order they can be distributed (a table
# after the tables its foreign keys refer to).
MEMBER_TABLES = (
    "members",
    "accounts",
    "lots",
    "transfers",
    "lot_entries",
    "adjustments",
    "purchases",
    "refunds",
    "redemptions",
    "kudos",
    "kudos_given",
    "reputation_entries",
    "reputation_members",
    "event_sequences",
    "outbox_events",
    "preferences",
    "preference_awards",
    "consents",
    "privacy_log",
    "lot_expiry_notices",
    "webhook_messages",
)

# The column that names the member, where it is not member_uid.
_MEMBER_COLUMN = {"kudos": "author_uid"}

# Tables distributed by a natural key that is not per member: each is the one place that key is
# unique, and says which member it belongs to.
KEY_TABLES = (
    # (key, kind, scope) -> member: member ids, a partner's purchase ids, redemption, adjustment and
    # kudos ids.
    Distributed("natural_keys", "key", None),
    # A source's customer or user id -> member.
    Distributed("identity_links", "external_id", None),
    # A source's delivery id: its inbox row (the member, once it is known, is a column).
    Distributed("deliveries", "delivery_key", None),
    # A thread's standing accepted answer (its author and kudos).
    Distributed("kudos_threads", "thread_id", None),
)

# Program data: small, read by every request, written by operators.
REFERENCE_TABLES = (
    "api_keys",
    "rewards",
    "system_accounts",
    "integrations",
    "event_cursors",
    "webhook_endpoints",
    "portal_secrets",
)

# konvert's own bookkeeping, kept on the coordinator.
LOCAL_TABLES = ("schema_migrations",)

# Rules of the list that the schema does not meet yet: table -> why. The schema check fails for
# any other table that breaks them, and for a table listed here that no longer does.
GAPS: dict[str, str] = {}


def distributed_tables() -> tuple[Distributed, ...]:
    """Every distributed table in the order to distribute them: members and their co-located
    tables, then the key tables."""
    members = tuple(
        Distributed(table, _MEMBER_COLUMN.get(table, MEMBER), None if table == "members" else "members")
        for table in MEMBER_TABLES
    )
    return members + KEY_TABLES


def citus_setup_sql() -> str:
    """The statements that distribute a migrated database on Citus, in order: reference tables
    first (members' tables refer to them), then members and everything co-located with them, then
    the key tables. A table in GAPS is listed as a comment saying what it still needs."""
    lines = [
        "-- konvert on Citus: run on the coordinator after `konvert migrate`, before traffic (docs/SCALING.md).",
        "create extension if not exists citus;",
    ]
    lines += [f"select create_reference_table('{table}');" for table in REFERENCE_TABLES]
    for table in distributed_tables():
        colocate = table.colocate_with or "none"
        call = f"select create_distributed_table('{table.table}', '{table.column}', colocate_with => '{colocate}');"
        if table.table in GAPS:
            lines.append(f"-- not yet, {GAPS[table.table]}:")
            call = f"-- {call}"
        lines.append(call)
    return "\n".join(lines) + "\n"
