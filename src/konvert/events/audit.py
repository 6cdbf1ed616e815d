"""Audit checks for the outbox: (invariant, query returning (what, detail) rows).

Citus cannot keep a position unique across shards with a constraint, so the sequencer's promises
are checked here: each position once, none past the sequencer's, each member's events in order.
"""

CHECKS: tuple[tuple[str, str], ...] = (
    (
        "7 each event's position is given once",
        """
        select position::text, 'position given to ' || count(*) || ' events'
        from outbox_events where position is not null group by position having count(*) > 1
        """,
    ),
    (
        "7 no event's position is past the sequencer's",
        """
        select e.event_id::text, 'position ' || e.position || ' is past the sequencer''s ' || c.position
        from outbox_events e join event_cursors c on c.name = 'sequencer'
        where e.position > c.position
        """,
    ),
    (
        "7 each member's events are numbered in their order",
        """
        select member_uid || '/' || sequence,
               coalesce('position ' || position, 'not numbered') || ' after a later event''s ' || later
        from (
            select member_uid, sequence, position,
                   min(position) over (partition by member_uid order by sequence desc
                                       rows between unbounded preceding and 1 preceding) as later
            from outbox_events where member_uid <> 0
        ) x
        where later is not null and (position is null or position > later)
        """,
    ),
)
