"""``konvert audit``: check every invariant of the books on a live database.

Each check is one SQL query that returns the rows violating it (a bounded sample), so the audit
scales with the ledger and says exactly what is wrong. These are the ledger's own; each feature
adds checks of its tables, and konvert.composition lists them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from konvert.db import Connection

_SAMPLE = 20


@dataclass(frozen=True)
class Violation:
    invariant: str
    detail: str


# (invariant, query returning offending rows as (what, detail) text pairs)
Check = tuple[str, str]

CHECKS: tuple[Check, ...] = (
    (
        "1 transfers balance per asset",
        """
        select t.transfer_id::text, 'asset ' || t.asset || ' moves between accounts of '
               || d.asset || ' and ' || c.asset
        from transfers t join every_account d on d.account_id = t.debit_account_id
                         join every_account c on c.account_id = t.credit_account_id
        where d.asset <> t.asset or c.asset <> t.asset
           or (d.member_uid is not null and d.member_uid <> t.member_uid)
           or (c.member_uid is not null and c.member_uid <> t.member_uid)
        """,
    ),
    (
        "1 transfers balance per asset",
        """
        select asset, 'debits ' || sum(debits) || ' <> credits ' || sum(credits)
        from (
            select asset, amount as debits, 0::numeric as credits from transfers
            union all
            select a.asset, 0, t.amount from transfers t join every_account a on a.account_id = t.credit_account_id
        ) x group by asset having sum(debits) <> sum(credits)
        """,
    ),
    (
        "2 stored balances equal transfers",
        """
        with net as (
            select a.member_uid, a.name,
                   coalesce(sum(case when t.credit_account_id = a.account_id then t.amount else -t.amount end), 0)
                   as net
            from accounts a left join transfers t
              on t.member_uid = a.member_uid and a.account_id in (t.debit_account_id, t.credit_account_id)
            where a.member_uid is not null
            group by a.member_uid, a.name
        )
        select m.member_id, 'stored ' || n.name || ' ' ||
               case n.name when 'available' then m.points_available when 'pending' then m.points_pending
                           when 'held' then m.points_held else m.reputation end || ' <> transfers ' || n.net
        from net n join members m using (member_uid)
        where n.net <> case n.name when 'available' then m.points_available when 'pending' then m.points_pending
                                   when 'held' then m.points_held else m.reputation end
        """,
    ),
    (
        "2 stored balances equal lots",
        """
        with lots_sum as (
            select member_uid,
                   coalesce(sum(remaining) filter (where state = 'pending'), 0) as pending,
                   coalesce(sum(remaining) filter (where state = 'available'), 0) as available
            from lots group by member_uid
        )
        select m.member_id, 'pending ' || m.points_pending || ' vs lots ' || coalesce(l.pending, 0)
               || '; available + debt ' || (m.points_available + m.points_debt) || ' vs lots '
               || coalesce(l.available, 0)
        from members m left join lots_sum l using (member_uid)
        where m.points_pending <> coalesce(l.pending, 0)
           or m.points_available + m.points_debt <> coalesce(l.available, 0)
        """,
    ),
    (
        "2 lots equal their entries",
        """
        select l.lot_id::text, 'remaining ' || l.remaining || ' <> amount ' || l.amount || ' - entries '
               || coalesce(sum(e.amount), 0)
        from lots l left join lot_entries e using (member_uid, lot_id)
        group by l.member_uid, l.lot_id having l.remaining <> l.amount - coalesce(sum(e.amount), 0)
        """,
    ),
    (
        "2 lifetime earned equals earn minus refund transfers",
        """
        select m.member_id, 'lifetime_earned ' || m.points_lifetime_earned || ' <> transfers ' || coalesce(t.net, 0)
        from members m left join (
            select member_uid, sum(case code when 'earn' then amount else -amount end) as net
            from transfers where asset = 'points' and code in ('earn', 'refund', 'clawback') group by member_uid
        ) t using (member_uid)
        where m.points_lifetime_earned <> coalesce(t.net, 0)
        """,
    ),
    (
        "3 available points never below zero except by refund debt",
        """
        select member_id, 'available ' || points_available || ', held ' || points_held || ', debt ' || points_debt
        from members
        where points_held < 0 or points_pending < 0 or points_available + points_debt < 0
           or (points_debt > 0 and exists (
               select 1 from lots where lots.member_uid = members.member_uid and state = 'available' and remaining > 0))
        """,
    ),
    (
        "5 reputation is never spent",
        """
        select t.transfer_id::text, 'code ' || t.code || ' takes reputation from a member'
        from transfers t join every_account d on d.account_id = t.debit_account_id
        where t.asset = 'reputation' and d.member_uid is not null and t.code not in ('retract')
        """,
    ),
    # Transfers and lots have no foreign keys (see sql/0001_schema.sql); nothing they refer to is
    # ever deleted, and these check that nothing was written pointing nowhere.
    (
        "6 every reference resolves",
        """
        select 'transfer ' || t.transfer_id, 'refers to no ' || concat_ws(', no ',
                   case when m.member_uid is null then 'member ' || t.member_uid end,
                   case when d.account_id is null then 'account ' || t.debit_account_id end,
                   case when c.account_id is null then 'account ' || t.credit_account_id end,
                   case when t.lot_id is not null and l.lot_id is null then 'lot ' || t.lot_id end,
                   case when t.reverses_transfer_id is not null and r.transfer_id is null
                        then 'transfer ' || t.reverses_transfer_id end)
        from transfers t
        left join members m on m.member_uid = t.member_uid
        left join every_account d on d.account_id = t.debit_account_id
        left join every_account c on c.account_id = t.credit_account_id
        left join lots l on l.lot_id = t.lot_id
        left join transfers r on r.transfer_id = t.reverses_transfer_id
        where m.member_uid is null or d.account_id is null or c.account_id is null
           or (t.lot_id is not null and l.lot_id is null)
           or (t.reverses_transfer_id is not null and r.transfer_id is null)
        """,
    ),
    (
        "6 every reference resolves",
        """
        select 'lot ' || l.lot_id, 'refers to no member ' || l.member_uid
        from lots l where not exists (select from members m where m.member_uid = l.member_uid)
        """,
    ),
)


async def run_audit(conn: Connection, checks: Sequence[Check]) -> list[Violation]:
    """Every violation ``checks`` find (a sample of at most 20 per check), in one snapshot; empty
    means the books are sound."""
    violations = []
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        for invariant, query in checks:
            for what, detail in await conn.fetch(f"{query} limit {_SAMPLE}"):
                violations.append(Violation(invariant, f"{what}: {detail}"))
    return violations
