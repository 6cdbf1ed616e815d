"""Audit checks of purchases and refunds: (invariant, query returning (what, detail) text rows)."""

CHECKS: tuple[tuple[str, str], ...] = (
    (
        "4 every purchase earned exactly once",
        """
        select p.partner || '/' || p.purchase_id, 'points ' || p.points || ' but ' || count(t.transfer_id)
               || ' earn transfer(s) of ' || coalesce(sum(t.amount), 0)
        from purchases p left join transfers t
          on t.cause_type = 'purchase' and t.cause_ref = p.partner || '/' || p.purchase_id and t.code = 'earn'
        group by p.member_uid, p.purchase_pk
        having count(t.transfer_id) <> (case when p.points > 0 then 1 else 0 end)
            or coalesce(sum(t.amount), 0) <> p.points
        """,
    ),
    (
        "4 refunds never exceed their purchase",
        """
        select p.partner || '/' || p.purchase_id, 'refunded ' || sum(r.amount) || ' of ' || p.total_amount
               || ', clawed ' || sum(r.points) || ' of ' || p.points || ' points'
        from purchases p join refunds r using (member_uid, purchase_pk)
        group by p.member_uid, p.purchase_pk having sum(r.amount) > p.total_amount or sum(r.points) > p.points
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
