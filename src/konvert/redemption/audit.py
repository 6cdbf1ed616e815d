"""Audit checks for holds, redemptions and rewards."""

CHECKS: tuple[tuple[str, str], ...] = (
    (
        "2 held points equal active holds",
        """
        select m.member_id, 'held ' || m.points_held || ' <> holds ' || coalesce(h.points, 0)
        from members m left join (
            select member_uid, sum(points) as points from redemptions where status = 'held' group by member_uid
        ) h using (member_uid)
        where m.points_held <> coalesce(h.points, 0)
        """,
    ),
    (
        "3 redemptions took exactly their points from lots",
        """
        select r.redemption_id, 'points ' || r.points || ' but allocations of ' || coalesce(sum(a.points), 0)
        from redemptions r
        left join lateral jsonb_to_recordset(
            (select jsonb_agg(jsonb_build_object('lot_id', e->0, 'points', e->1))
             from jsonb_array_elements(r.allocations) e)
        ) as a (lot_id bigint, points bigint) on true
        group by r.member_uid, r.redemption_pk having r.points <> coalesce(sum(a.points), 0)
        """,
    ),
)
