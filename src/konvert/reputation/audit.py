"""Audit checks of reputation: (invariant, query returning (what, detail) text rows).

Together with the ledger's own checks (members.reputation equals the net of its transfers; only
``retract`` takes reputation from a member) these prove that every kudos credits exactly what
its entries and transfers say, that reputation is the sum of what standing kudos credit plus
what the floor kept, and that the daily cap was filled in the order the kudos happened.
"""

CHECKS: tuple[tuple[str, str], ...] = (
    (
        "R1 kudos credit what their entries add up to",
        """
        select k.kudos_id, k.status || ' kudos credits ' || k.author_credited || ' to its author and '
               || k.accepter_credited || ' to its accepter; entries add up to ' || coalesce(e.author, 0)
               || ' and ' || coalesce(e.accepter, 0)
        from kudos k left join (
            select kudos_pk, sum(change) filter (where role = 'author') as author,
                   sum(change) filter (where role = 'accepter') as accepter
            from reputation_entries group by kudos_pk
        ) e using (kudos_pk)
        where k.author_credited <> coalesce(e.author, 0) or k.accepter_credited <> coalesce(e.accepter, 0)
           or (k.status <> 'standing' and (k.author_credited <> 0 or k.accepter_credited <> 0))
        """,
    ),
    (
        "R2 reputation entries match their transfers",
        """
        select 'entry ' || e.entry_id, 'posted ' || e.posted || ' to member ' || e.member_uid || ' as '
               || e.role || ' but transfer ' || coalesce(t.code || ' ' || t.amount || ' ' || t.asset, 'none')
        from reputation_entries e join kudos k using (kudos_pk)
        left join transfers t on t.transfer_id = e.transfer_id
        where (e.posted <> 0) <> (t.transfer_id is not null)
           or e.member_uid <> case e.role when 'author' then k.author_uid else k.giver_uid end
           or (t.transfer_id is not null and (
                  t.asset <> 'reputation' or t.member_uid <> e.member_uid or t.cause_type <> 'kudos'
               or t.cause_ref <> k.kudos_id or t.amount <> abs(e.posted)
               or t.code <> case when e.posted > 0 then 'kudos' else 'retract' end))
        union all
        select 'transfer ' || t.transfer_id, 'reputation transfer for kudos ' || t.cause_ref || ' has '
               || count(e.entry_id) || ' entries'
        from transfers t left join reputation_entries e on e.member_uid = t.member_uid and e.transfer_id = t.transfer_id
        where t.asset = 'reputation' and t.cause_type = 'kudos'
        group by t.member_uid, t.transfer_id having count(e.entry_id) <> 1
        """,
    ),
    (
        "R3 reputation equals what standing kudos credit plus what the floor kept",
        """
        select m.member_id, 'reputation ' || m.reputation || ' <> kudos credits ' || coalesce(c.credits, 0)
               || ' + floor kept ' || coalesce(r.floor_kept, 0)
        from members m
        left join (select member_uid, sum(change) as credits from reputation_entries group by member_uid) c
          using (member_uid)
        left join reputation_members r using (member_uid)
        where m.reputation <> coalesce(c.credits, 0) + coalesce(r.floor_kept, 0)
        """,
    ),
    (
        "R4 reputation never below zero",
        """
        select m.member_id, 'reputation ' || m.reputation || ', floor kept ' || coalesce(r.floor_kept, 0)
        from members m left join reputation_members r using (member_uid)
        where m.reputation < 0 or coalesce(r.floor_kept, 0) > m.reputation
        """,
    ),
    (
        "R5 the daily cap is filled in the order kudos happened",
        """
        select kudos_id, 'credits ' || author_credited || ' of ' || value
               || ' although a kudos before it that day is not fully credited'
        from (
            select kudos_id, value, author_credited,
                   bool_or(author_credited < value) over (
                       partition by author_uid, day order by occurred_at, kudos_id collate "C"
                       rows between unbounded preceding and 1 preceding) as earlier_short
            from kudos where status = 'standing' and kind in ('like', 'helpful')
        ) day
        where earlier_short and author_credited > 0
        """,
    ),
    (
        "R6 one accepted answer per thread, credited in full",
        """
        select source || '/' || thread_id, count(*) || ' standing accepted answers'
        from kudos where kind = 'accepted_answer' and status = 'standing'
        group by source, thread_id having count(*) > 1
        union all
        select kudos_id, 'accepted answer credits ' || author_credited || '+' || accepter_credited || ' of '
               || value || '+' || accepter_value
        from kudos
        where kind = 'accepted_answer' and status = 'standing'
          and (author_credited <> value or accepter_credited <> accepter_value)
        """,
    ),
    (
        "R7 bridge points equal their transfers",
        """
        select k.kudos_id, 'bridge points ' || k.bridge_points || ' + shortfall ' || k.bridge_shortfall
               || ' <> net transfers ' || coalesce(t.net, 0)
        from kudos k left join (
            select cause_ref, sum(case code when 'bonus' then amount when 'retract' then -amount else 0 end) as net
            from transfers where asset = 'points' and cause_type = 'kudos' group by cause_ref
        ) t on t.cause_ref = k.kudos_id
        where k.bridge_points + k.bridge_shortfall <> coalesce(t.net, 0)
           or (k.status <> 'standing' and k.bridge_points <> 0)
        """,
    ),
)
