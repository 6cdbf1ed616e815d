"""``konvert audit``: check every ledger invariant of DESIGN.md on a live database.

Each check is one SQL query that returns the rows violating it (a bounded sample), so the
audit scales with the ledger and says exactly what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

_SAMPLE = 20


@dataclass(frozen=True)
class Violation:
    invariant: str
    detail: str


# (invariant, query returning offending rows as (what, detail) text pairs)
CHECKS: tuple[tuple[str, str], ...] = (
    (
        "1 transfers balance per asset",
        """
        select t.transfer_id::text, 'asset ' || t.asset || ' moves between accounts of '
               || d.asset || ' and ' || c.asset
        from transfers t join accounts d on d.account_id = t.debit_account_id
                         join accounts c on c.account_id = t.credit_account_id
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
            select a.asset, 0, t.amount from transfers t join accounts a on a.account_id = t.credit_account_id
        ) x group by asset having sum(debits) <> sum(credits)
        """,
    ),
    (
        "2 stored balances equal transfers",
        """
        with net as (
            select a.member_uid, a.name,
                   coalesce(sum(case when t.credit_account_id = a.account_id then t.amount else -t.amount end), 0) as net
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
        from lots l left join lot_entries e using (lot_id)
        group by l.lot_id having l.remaining <> l.amount - coalesce(sum(e.amount), 0)
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
        "4 every purchase earned exactly once",
        """
        select p.partner || '/' || p.purchase_id, 'points ' || p.points || ' but ' || count(t.transfer_id)
               || ' earn transfer(s) of ' || coalesce(sum(t.amount), 0)
        from purchases p left join transfers t
          on t.cause_type = 'purchase' and t.cause_ref = p.partner || '/' || p.purchase_id and t.code = 'earn'
        group by p.purchase_pk
        having count(t.transfer_id) <> (case when p.points > 0 then 1 else 0 end)
            or coalesce(sum(t.amount), 0) <> p.points
        """,
    ),
    (
        "4 refunds never exceed their purchase",
        """
        select p.partner || '/' || p.purchase_id, 'refunded ' || sum(r.amount) || ' of ' || p.total_amount
               || ', clawed ' || sum(r.points) || ' of ' || p.points || ' points'
        from purchases p join refunds r using (purchase_pk)
        group by p.purchase_pk having sum(r.amount) > p.total_amount or sum(r.points) > p.points
        """,
    ),
    (
        "5 reputation is never spent",
        """
        select t.transfer_id::text, 'code ' || t.code || ' takes reputation from a member'
        from transfers t join accounts d on d.account_id = t.debit_account_id
        where t.asset = 'reputation' and d.member_uid is not null and t.code not in ('retract')
        """,
    ),
    # Transfers, lots and purchases have no foreign keys (their checks cost a purchase a quarter
    # of PostgreSQL's time: sql/0011); nothing they refer to is ever deleted, and these check
    # that nothing was written pointing nowhere.
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
        left join accounts d on d.account_id = t.debit_account_id
        left join accounts c on c.account_id = t.credit_account_id
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
    (
        "6 every reference resolves",
        """
        select 'purchase ' || p.partner || '/' || p.purchase_id, 'refers to no ' || concat_ws(', no ',
                   case when m.member_uid is null then 'member ' || p.member_uid end,
                   case when p.lot_id is not null and l.lot_id is null then 'lot ' || p.lot_id end,
                   case when p.transfer_id is not null and t.transfer_id is null then 'transfer ' || p.transfer_id end)
        from purchases p
        left join members m on m.member_uid = p.member_uid
        left join lots l on l.lot_id = p.lot_id
        left join transfers t on t.transfer_id = p.transfer_id
        where m.member_uid is null or (p.lot_id is not null and l.lot_id is null)
           or (p.transfer_id is not null and t.transfer_id is null)
        """,
    ),
)


def all_checks() -> tuple[tuple[str, str], ...]:
    """The ledger's own checks plus those each feature adds for its tables."""
    from konvert.preferences import audit as preferences
    from konvert.redemption import audit as redemption
    from konvert.reputation import audit as reputation

    return CHECKS + redemption.CHECKS + reputation.CHECKS + preferences.CHECKS


async def run_audit(conn: asyncpg.Connection) -> list[Violation]:
    """Every violation found (a sample of at most 20 per check); empty means the ledger is sound."""
    violations = []
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        for invariant, query in all_checks():
            for what, detail in await conn.fetch(f"{query} limit {_SAMPLE}"):
                violations.append(Violation(invariant, f"{what}: {detail}"))
    return violations
