"""What one kudos write changes: each kudos' credit to each member, the floor applied, and the
ledger's transfers for it (through the ledger core), with an entry explaining every change.

Also the points bridge: an accepted answer may credit loyalty points to its author (a lot and a
``bonus`` transfer), taken back like a refund when the acceptance is retracted or superseded.
Reputation itself never converts into points.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import TYPE_CHECKING, NamedTuple

from konvert.db import Row
from konvert.ledger import events
from konvert.ledger.accounts import SystemAccount
from konvert.ledger.book import Book, Member, ReputationMove
from konvert.ledger.model import Cause
from konvert.ledger.rules import expiry_for
from konvert.reputation import rules, store
from konvert.reputation.leaderboard import Delta
from konvert.reputation.model import ReputationChange

if TYPE_CHECKING:
    from konvert.services import Services

BRIDGE_ACCOUNT = SystemAccount("points", "bridge:accepted_answer")

_TRANSFER_REASONS = {
    "award": "kudos",
    "retraction": "kudos retracted",
    "superseded": "accepted answer superseded by {cause}",
    "cap_freed": "daily cap room freed by {cause}",
    "cap_taken": "daily cap room taken by {cause}, which happened earlier that day",
}


class Planned(NamedTuple):
    """A change to what one kudos credits one member, caused by a kudos (itself, or another one)."""

    author_uid: int
    kudos_pk: int
    kudos_id: str
    source: str
    day: date
    member_uid: int
    role: str
    reason: str
    change: int
    cause_pk: int
    cause_id: str


class Posted(NamedTuple):
    """What ``Credits.post`` wrote: the changes by the kudos_pk of their cause, and the
    leaderboards' share of them."""

    changes: dict[int, list[ReputationChange]]
    deltas: list[Delta]


class Credits:
    """Reputation changes of one transaction: planned first, then posted member by member, with
    the statements for their entries, the kudos' credits and the floor shared by all members."""

    def __init__(self, services: Services, book: Book, members: dict[int, Member], cause: Row | None = None) -> None:
        self.services = services
        self.book = book
        self.conn = book.conn
        self.members = members
        self.cause = cause
        self.planned: list[Planned] = []

    def plan(self, kudos: Row, member_uid: int, role: str, reason: str, change: int, cause: Row | None = None) -> None:
        """Plan a change to what ``kudos`` credits a member; ``cause`` (by default this write's
        cause) is the kudos whose arrival or retraction made it."""
        cause = cause or self.cause
        assert cause is not None, "a change needs its cause"
        if change != 0:
            self.planned.append(
                Planned(
                    kudos["author_uid"],
                    kudos["kudos_pk"],
                    kudos["kudos_id"],
                    kudos["source"],
                    kudos["day"],
                    member_uid,
                    role,
                    reason,
                    change,
                    cause["kudos_pk"],
                    cause["kudos_id"],
                )
            )

    async def post(self) -> Posted:
        """Write every planned change: the members' reputation in one ledger posting, then every
        entry and credit in one statement. Per member, credits go first, so the floor only holds
        back what the change as a whole would take below it."""
        uids = sorted({p.member_uid for p in self.planned})
        kept = await store.select_floor_kept(self.conn, uids) if uids else {}
        steps: list[tuple[Planned, int]] = []
        kept_after: dict[int, int] = {}
        for member_uid in uids:
            planned = sorted((p for p in self.planned if p.member_uid == member_uid), key=lambda p: p.change < 0)
            member_steps, member_kept = self._apply_floor(member_uid, planned, kept.get(member_uid, 0))
            steps += member_steps
            if member_kept != kept.get(member_uid, 0):
                kept_after[member_uid] = member_kept
        before = {uid: self.book.current(self.members[uid]).reputation for uid in uids}
        moves = [(self.members[p.member_uid], await self._move(p, amount)) for p, amount in steps if amount]
        transfer_ids = iter(await self.book.move_reputation(moves) if moves else [])
        posted = Posted({}, [])
        entries: list[tuple[int, store.Entry]] = []
        for p, amount in steps:
            transfer_id = next(transfer_ids) if amount else None
            member = self.members[p.member_uid]
            entry = store.Entry(
                member.uid, p.kudos_pk, p.role, p.source, p.day, p.reason, p.change, amount, transfer_id, p.cause_pk
            )
            entries.append((p.author_uid, entry))
            if amount:
                posted.deltas.append(Delta(member.uid, p.source, p.day, amount))
            posted.changes.setdefault(p.cause_pk, []).append(
                ReputationChange(
                    member_id=member.id,
                    kudos_id=p.kudos_id,
                    role=p.role,  # type: ignore[arg-type]
                    reason=p.reason,  # type: ignore[arg-type]
                    amount=p.change,
                    reputation_delta=amount,
                    transfer_id=transfer_id,
                )
            )
        if entries:
            await store.record_changes(self.conn, entries)
        if kept_after:
            await store.set_floor_kept(self.conn, kept_after)
        for uid in uids:
            cause_id = next(p.cause_id for p in self.planned if p.member_uid == uid)
            self._record_rank_change(self.book.current(self.members[uid]), before[uid], cause_id)
        self.planned = []
        return posted

    def _apply_floor(self, member_uid: int, planned: list[Planned], kept: int) -> tuple[list[tuple[Planned, int]], int]:
        """What each of a member's planned changes posts, the floor applied; and what the floor
        keeps of the member's reputation after them."""
        floor = self.services.program.reputation.floor
        reputation = self.book.current(self.members[member_uid]).reputation
        steps = []
        for p in planned:
            step = rules.apply_floor(reputation, kept, floor, p.change)
            steps.append((p, step.posted))
            reputation += step.posted
            kept = step.floor_kept
        return steps, kept

    async def _move(self, p: Planned, posted: int) -> ReputationMove:
        reason = _TRANSFER_REASONS[p.reason].format(cause=p.cause_id)
        if posted != p.change:
            reason += f" ({abs(p.change - posted)} held by the reputation floor)"
        account = SystemAccount("reputation", f"kudos:{p.source}")
        if posted > 0:
            return ReputationMove(posted, account, "kudos", Cause("kudos", p.kudos_id), reason)
        reverses = await store.select_first_award_transfer(self.conn, p.member_uid, p.kudos_pk, p.role)
        return ReputationMove(posted, account, "retract", Cause("kudos", p.kudos_id), reason, reverses)

    def _record_rank_change(self, member: Member, before: int, cause_id: str) -> None:
        """After posting: a rank_changed event if the member's reputation moved to another rank."""
        ranks = self.services.program.reputation.ranks
        after = member.reputation
        old, new = rules.rank_for(ranks, before).rank, rules.rank_for(ranks, after).rank
        if old != new:
            data = events.RankChanged(from_rank=old, to_rank=new, reputation=after, kudos_id=cause_id)
            self.book.announce(member, "reputation.rank_changed", data, last=True)


# --- the points bridge ---------------------------------------------------------------------


async def bridge_award(credits: Credits, kudos: Row, now: datetime) -> None:
    """Credit an accepted answer's author the program's bridge points: a new lot, available at once."""
    services, book = credits.services, credits.book
    points = services.program.reputation.accepted_answer_points
    credit = await book.credit(
        credits.members[kudos["author_uid"]],
        points,
        source=BRIDGE_ACCOUNT,
        code="bonus",
        cause=Cause("kudos", kudos["kudos_id"]),
        reason="points for an accepted answer",
        expires_at=expiry_for(now, services.program.points),
        vests_at=now,
        lifetime=False,
    )
    await store.set_kudos_bridge(
        book.conn,
        kudos["author_uid"],
        kudos["kudos_pk"],
        points=points,
        lot_id=credit.lot_id,
        transfer_id=credit.transfer_id,
    )


async def bridge_clawback(credits: Credits, kudos: Row) -> None:
    """Take an accepted answer's bridge points back, like a refund: from its own lot first, then the
    member's other available lots, then as a negative balance if the program allows it."""
    services, book = credits.services, credits.book
    clawback = await book.claw_back(
        credits.members[kudos["author_uid"]],
        kudos["bridge_points"],
        own_lot_id=kudos["bridge_lot_id"],
        to=BRIDGE_ACCOUNT,
        code="retract",
        cause=Cause("kudos", kudos["kudos_id"]),
        reverses_transfer_id=kudos["bridge_transfer_id"],
        reason="points for an accepted answer taken back",
        allow_negative=services.program.points.allow_negative_balance,
        lifetime=False,
    )
    await store.set_kudos_bridge(
        book.conn, kudos["author_uid"], kudos["kudos_pk"], points=0, shortfall=clawback.shortfall
    )
