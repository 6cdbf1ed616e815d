"""Audit checks for preference points and erasure: (invariant, query returning (what, detail) rows)."""

CHECKS: tuple[tuple[str, str], ...] = (
    (
        "4 preference points equal their transfers",
        """
        select m.member_id || '/' || a.key,
               'awarded ' || a.points_awarded || ' vs earn transfers ' || coalesce(t.earned, 0)
               || ', clawed back ' || a.points_clawed_back || ' vs clawback transfers ' || coalesce(t.clawed, 0)
        from preference_awards a join members m using (member_uid)
        left join (
            select member_uid, cause_ref as key,
                   sum(amount) filter (where code = 'earn') as earned,
                   sum(amount) filter (where code = 'clawback') as clawed
            from transfers where cause_type = 'preference' and asset = 'points' group by member_uid, cause_ref
        ) t on t.member_uid = a.member_uid and t.key = a.key
        where a.points_awarded <> coalesce(t.earned, 0) or a.points_clawed_back <> coalesce(t.clawed, 0)
        """,
    ),
    (
        "4 preference points equal their transfers",
        """
        select t.transfer_id::text, 'preference transfer for ' || t.cause_ref || ' without a recorded first share'
        from transfers t
        where t.cause_type = 'preference'
          and not exists (select 1 from preference_awards a where a.member_uid = t.member_uid and a.key = t.cause_ref)
        """,
    ),
    (
        "4 every shared preference had its first share recorded",
        """
        select p.member_uid::text || '/' || p.key, 'shared without a preference_awards row'
        from preferences p
        where not exists (select 1 from preference_awards a where a.member_uid = p.member_uid and a.key = p.key)
        """,
    ),
    (
        "privacy erased members hold no personal data",
        """
        select m.member_id, what
        from members m, lateral (
            select 'preferences remain' as what
            where exists (select 1 from preferences p where p.member_uid = m.member_uid)
            union all
            select 'consents remain' where exists (select 1 from consents c where c.member_uid = m.member_uid)
            union all
            select 'privacy log values remain' where exists (
                select 1 from privacy_log l
                where l.member_uid = m.member_uid and (l.old_value is not null or l.new_value is not null))
        ) found
        where m.erased_at is not null
        """,
    ),
)
