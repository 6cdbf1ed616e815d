"""The ledger core: every change to a member's points, reputation or tier goes through a Book.

A use case opens one transaction with ``async with writing(services) as book``, locks the members
it changes (``book.lock``), does its own SQL on ``book.conn`` and asks the book to move points:
``credit``, ``spend``, ``capture``, ``give_back``, ``claw_back``, ``move_reputation``,
``post_earns``, ``store_tier_standings``. The book writes the transfers, lots and lot entries,
the member's balances and its balance ``version``, and keeps the rules no feature may bend: a
spend never overdraws (it checks the stored available points under the member's lock), a credit
to available points repays a refund debt first, a clawback takes a lot's own points back before
anyone else's. Just before the transaction commits, the book reads the balance of every member
it changed whose balance is cached; once it has committed, it caches them at the version it
committed (a read after a purchase hits) and tombstones the others' at theirs, before the use
case answers.

Lock order, for every writer: members first (several in member_uid order), then what they own
(lots, holds, purchases).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol, TypeVar

import asyncpg
import msgspec

from konvert import errors
from konvert.db import Connection
from konvert.idempotency import Outcome
from konvert.ledger import balances, batches, events, store
from konvert.ledger.accounts import EXPIRED, SystemAccount, SystemAccounts
from konvert.ledger.model import Cause
from konvert.ledger.rules import OpenLot, Take, plan_clawback, plan_takes
from konvert.ledger.store import Deltas, Leg, LotTake, TierStanding

if TYPE_CHECKING:
    from konvert.services import Services

# A member's own accounts.
Bucket = Literal["available", "pending", "held", "reputation"]


class Member(NamedTuple):
    """A member's row as this transaction holds it locked (refreshed by every change)."""

    uid: int
    id: str
    available: int
    pending: int
    held: int
    debt: int
    lifetime_earned: int
    reputation: int
    version: int
    erased: bool
    tier: str | None
    tier_below_since: datetime | None
    tier_qualifying_points: int

    @classmethod
    def of(cls, row: asyncpg.Record) -> Member:
        return cls(
            row["member_uid"],
            row["member_id"],
            row["points_available"],
            row["points_pending"],
            row["points_held"],
            row["points_debt"],
            row["points_lifetime_earned"],
            row["reputation"],
            row["version"],
            row["erased_at"] is not None,
            row["tier"],
            row["tier_below_since"],
            row["tier_qualifying_points"],
        )


class Credit(NamedTuple):
    lot_id: int
    transfer_id: int


class Spend(NamedTuple):
    transfer_id: int
    # The lots the points came from, so that a release or cancellation returns exactly those.
    takes: list[Take]


class Clawback(NamedTuple):
    """What a clawback took: from lots and as debt (``points``), what it could not (``shortfall``),
    and its transfers (none when nothing moved)."""

    points: int
    shortfall: int
    debt: int
    transfer_ids: list[int]


class ReputationMove(NamedTuple):
    """Reputation to or from a member (signed), against a system account (one per kudos source)."""

    amount: int
    account: SystemAccount
    code: str
    cause: Cause
    reason: str
    reverses_transfer_id: int | None = None


class Book:
    def __init__(self, services: Services, conn: Connection) -> None:
        self.conn = conn
        self._services = services
        self._accounts = services.shared(SystemAccounts)
        self._members: dict[int, Member] = {}
        # The newest version this transaction gave each member it changed, by member id.
        self._versions: dict[str, int] = {}
        self._gathered: dict[type[Gathered], Gathered] = {}
        # The events this transaction announces, written to the outbox just before it commits.
        self._announced: list[events.Announcement] = []
        self._announced_last: list[events.Announcement] = []
        # The balances this transaction leaves, read just before it commits: (member id, version, body).
        self._balances: list[tuple[str, int, bytes]] = []

    # --- members --------------------------------------------------------------------------

    async def lock(self, *, uids: Iterable[int] = (), ids: Iterable[str] = (), create: bool = False) -> list[Member]:
        """Lock members (by uid or id) in member_uid order; with ``create``, members named by an
        id that does not exist yet are created first (and locked after the others)."""
        wanted_ids = set(ids)
        one_by_one = self._services.settings.lock_one_by_one
        rows = await store.lock_members(self.conn, uids=list(uids), ids=sorted(wanted_ids), one_by_one=one_by_one)
        missing = wanted_ids - {row["member_id"] for row in rows}
        if create and missing:
            await store.insert_members(self.conn, sorted(missing))
            rows += await store.lock_members(self.conn, ids=sorted(missing), one_by_one=one_by_one)
        return [self._note(row) for row in rows]

    async def member(self, member_id: str, *, create: bool = False) -> Member | None:
        """One member, locked (created first with ``create``); None if there is no such member."""
        locked = await self.lock(ids=[member_id], create=create)
        return locked[0] if locked else None

    async def member_by_uid(self, member_uid: int) -> Member:
        (member,) = await self.lock(uids=[member_uid])
        return member

    def _note(self, row: asyncpg.Record) -> Member:
        member = Member.of(row)
        self._members[member.uid] = member
        return member

    def _changed(self, row: asyncpg.Record) -> Member:
        member = self._note(row)
        self._note_version(member.id, member.version)
        return member

    def _note_version(self, member_id: str, version: int) -> None:
        self._versions[member_id] = max(version, self._versions.get(member_id, version))

    def invalidate_cached(self, member: Member) -> None:
        """After the commit, tombstone the member's cached balance at its current version too,
        although this transaction changed nothing of it (a replayed write whose first answer may
        have been lost before its cache entry was invalidated)."""
        self._note_version(member.id, member.version)

    async def system_account(self, account: SystemAccount) -> int:
        return await self._accounts.id(self.conn, account)

    async def _account_id(self, account: SystemAccount | Bucket) -> tuple[int | None, str | None]:
        """A leg's side: (system account id, None) or (None, the member's bucket)."""
        if isinstance(account, SystemAccount):
            return await self.system_account(account), None
        return None, account

    # --- points ---------------------------------------------------------------------------

    async def credit(
        self,
        member: Member,
        points: int,
        *,
        source: SystemAccount,
        code: str,
        cause: Cause,
        reason: str,
        expires_at: datetime | None,
        vests_at: datetime,
        state: Literal["available", "pending"] = "available",
        lifetime: bool = True,
        announce: bool = True,
    ) -> Credit:
        """Points into a new lot (pending until ``vests_at``, or available), from ``source``; with
        ``lifetime`` they count as earned. A credit to available points repays a refund debt.
        Announced as points.earned, unless the use case announces it otherwise."""
        row = await store.credit_lot(
            self.conn,
            member.uid,
            points=points,
            state=state,
            vests_at=vests_at,
            expires_at=expires_at,
            source_account_id=await self.system_account(source),
            code=code,
            cause_type=cause.type,
            cause_ref=cause.ref,
            reason=reason,
            lifetime=lifetime,
        )
        member = self._changed(row)
        if announce:
            earned = events.PointsEarned(
                points=points,
                state=state,
                cause_type=cause.type,
                cause_ref=cause.ref,
                lot_id=row["lot_id"],
                transfer_id=row["transfer_id"],
                vests_at=vests_at,
                expires_at=expires_at,
                balance=self.balance(member),
            )
            self.announce(member, "points.earned", earned)
        if state == "available":
            await self.repay_debt(member)
        return Credit(row["lot_id"], row["transfer_id"])

    def ensure_available(self, member: Member, points: int) -> Member:
        """The member's newest row, if it has ``points`` available (under its lock); else raises
        InsufficientPoints."""
        member = self._members[member.uid]  # the newest row, whatever the caller holds
        if member.available < points:
            available = max(member.available, 0)
            raise errors.InsufficientPoints(f"{points} points needed, {available} available", available=available)
        return member

    async def spend(
        self,
        member: Member,
        points: int,
        *,
        to: SystemAccount | Literal["held"],
        code: str,
        cause: Cause,
        reason: str,
    ) -> Spend:
        """Move available points to ``to`` (a system account, or the member's held points),
        taking them from lots soonest-expiring first. Never overdraws: with fewer available points
        than asked, under the member's lock, it raises InsufficientPoints and writes nothing."""
        member = self.ensure_available(member, points)
        takes, missing = plan_takes(await store.lock_available_lots(self.conn, member.uid), points)
        assert missing == 0, "available points and available lots disagree"
        system_id, bucket = await self._account_id(to)
        leg = Leg(
            "points",
            points,
            code,
            cause.type,
            cause.ref,
            reason,
            debit_bucket="available",
            credit_account_id=system_id,
            credit_bucket=bucket,
        )
        deltas = Deltas(available=-points, held=points if to == "held" else 0)
        (transfer_id,), row = await store.post(
            self.conn, member.uid, [leg], [LotTake(lot, amount, 0, code) for lot, amount in takes], deltas
        )
        self._changed(row)
        return Spend(transfer_id, takes)

    async def capture(self, member: Member, points: int, *, to: SystemAccount, cause: Cause, reason: str) -> int:
        """Held points spent for good: from the member's held points to ``to``."""
        leg = Leg(
            "points",
            points,
            "capture",
            cause.type,
            cause.ref,
            reason,
            debit_bucket="held",
            credit_account_id=await self.system_account(to),
        )
        (transfer_id,), row = await store.post(self.conn, member.uid, [leg], [], Deltas(held=-points))
        self._changed(row)
        return transfer_id

    async def give_back(
        self,
        member: Member,
        takes: Sequence[Take],
        *,
        source: SystemAccount | Literal["held"],
        code: str,
        cause: Cause,
        reverses_transfer_id: int,
        reason: str,
    ) -> int:
        """Return spent or held points to the lots they came from (``takes``); points whose lot
        expired meanwhile expire now instead. Returns the first transfer's id."""
        states = await store.lock_lot_states(self.conn, member.uid, [lot for lot, _ in takes])
        alive = [(lot, points) for lot, points in takes if states[lot] != "expired"]
        alive_points = sum(points for _, points in alive)
        dead_points = sum(points for _, points in takes) - alive_points
        system_id, bucket = await self._account_id(source)
        back = Leg(
            "points",
            alive_points,
            code,
            cause.type,
            cause.ref,
            reason,
            debit_account_id=system_id,
            debit_bucket=bucket,
            credit_bucket="available",
            reverses_transfer_id=reverses_transfer_id,
        )
        legs = [back] if alive_points else []
        if dead_points:
            expired_id = await self.system_account(EXPIRED)
            reason_expired = f"{reason}; their lots had expired"
            legs.append(
                back._replace(
                    amount=dead_points,
                    code="expire",
                    reason=reason_expired,
                    credit_bucket=None,
                    credit_account_id=expired_id,
                )
            )
        deltas = Deltas(available=alive_points, held=-(alive_points + dead_points) if source == "held" else 0)
        returns = [LotTake(lot, -points, 0, code) for lot, points in alive]
        transfer_ids, row = await store.post(self.conn, member.uid, legs, returns, deltas)
        await self.repay_debt(self._changed(row))
        return transfer_ids[0]

    async def claw_back(
        self,
        member: Member,
        points: int,
        *,
        own_lot_id: int | None,
        to: SystemAccount,
        code: str,
        cause: Cause,
        reverses_transfer_id: int | None,
        reason: str,
        allow_negative: bool,
        lifetime: bool,
    ) -> Clawback:
        """Take back ``points`` once credited to lot ``own_lot_id``: from that lot first (pending or
        available, unless expired), then from the member's other available lots, soonest
        expiring first. What is still missing becomes a debt (available goes below zero) if
        ``allow_negative``, else a shortfall that is not taken. With ``lifetime`` the points no
        longer count as earned."""
        if points == 0:
            return Clawback(0, 0, 0, [])
        own = await store.lock_lot(self.conn, member.uid, own_lot_id) if own_lot_id is not None else None
        own_open = OpenLot(own.lot_id, own.remaining) if own is not None and own.state != "expired" else None
        others = await store.lock_available_lots(self.conn, member.uid, own_lot_id)
        plan = plan_clawback(points, own_open, own is not None and own.state == "pending", others, allow_negative)
        if plan.taken == 0:
            return Clawback(0, plan.shortfall, 0, [])
        destination = await self.system_account(to)
        legs, takes = [], []
        for bucket, amount in (("pending", plan.from_pending), ("available", plan.from_available)):
            if amount:
                legs.append(
                    Leg(
                        "points",
                        amount,
                        code,
                        cause.type,
                        cause.ref,
                        reason,
                        debit_bucket=bucket,
                        credit_account_id=destination,
                        lot_id=own_lot_id,
                        reverses_transfer_id=reverses_transfer_id,
                    )
                )
        if plan.own_take:
            takes.append(LotTake(own_lot_id or 0, plan.own_take, 0, code))
        takes += [LotTake(lot, amount, len(legs) - 1, code) for lot, amount in plan.other_takes]
        deltas = Deltas(
            available=-plan.from_available,
            pending=-plan.from_pending,
            debt=plan.debt,
            lifetime_earned=-plan.taken if lifetime else 0,
        )
        transfer_ids, row = await store.post(self.conn, member.uid, legs, takes, deltas)
        self._changed(row)
        return Clawback(plan.taken, plan.shortfall, plan.debt, transfer_ids)

    async def repay_debt(self, member: Member) -> None:
        """Repay a refund debt from the member's available lots. The stored available balance
        already counts the debt, so this moves no points: it makes the lots agree with the
        balance again (available = available lots - debt)."""
        if member.debt <= 0:
            return
        takes, missing = plan_takes(await store.lock_available_lots(self.conn, member.uid), member.debt)
        repaid = member.debt - missing
        if repaid:
            _, row = await store.post(
                self.conn,
                member.uid,
                [],
                [LotTake(lot, amount, None, "debt") for lot, amount in takes],
                Deltas(debt=-repaid),
            )
            self._changed(row)

    async def vest(self, member: Member, lot_ids: Sequence[int], now: datetime) -> int:
        """Make the member's due pending lots among ``lot_ids`` available (the return window
        closed); return how many vested. Repays a refund debt from them."""
        vested = await store.vest_lots(self.conn, member.uid, lot_ids, now)
        if not vested:
            return 0
        legs = [
            Leg(
                "points",
                lot.remaining,
                "vest",
                "lot",
                str(lot.lot_id),
                "return window closed",
                debit_bucket="pending",
                credit_bucket="available",
                lot_id=lot.lot_id,
            )
            for lot in vested
            if lot.remaining > 0
        ]
        points = sum(lot.remaining for lot in vested)
        _, row = await store.post(self.conn, member.uid, legs, [], Deltas(available=points, pending=-points))
        member = self._changed(row)
        lot_ids = sorted(lot.lot_id for lot in vested)
        self.announce(
            member, "points.vested", events.PointsVested(points=points, lot_ids=lot_ids, balance=self.balance(member))
        )
        await self.repay_debt(member)
        return len(vested)

    async def expire(self, member: Member, now: datetime) -> int:
        """Expire the member's lots whose date has come: what remains of each goes to the
        program's expired account. Returns how many lots expired."""
        lots = await store.lock_due_lots(self.conn, member.uid, now)
        if not lots:
            return 0
        expired_id = await self.system_account(EXPIRED)
        live = [lot for lot in lots if lot.remaining > 0]
        legs = [
            Leg(
                "points",
                lot.remaining,
                "expire",
                "lot",
                str(lot.lot_id),
                f"points expired on {lot.expires_at:%Y-%m-%d}",
                debit_bucket=lot.state,
                credit_account_id=expired_id,
                lot_id=lot.lot_id,
            )
            for lot in live
        ]
        takes = [LotTake(lot.lot_id, lot.remaining, i, "expire") for i, lot in enumerate(live)]
        deltas = Deltas(
            available=-sum(lot.remaining for lot in live if lot.state == "available"),
            pending=-sum(lot.remaining for lot in live if lot.state == "pending"),
        )
        await store.mark_lots(self.conn, member.uid, [lot.lot_id for lot in lots], "expired")
        _, row = await store.post(self.conn, member.uid, legs, takes, deltas)
        member = self._changed(row)
        points = sum(lot.remaining for lot in live)
        lot_ids = sorted(lot.lot_id for lot in lots)
        self.announce(
            member, "points.expired", events.PointsExpired(points=points, lot_ids=lot_ids, balance=self.balance(member))
        )
        return len(lots)

    # --- reputation -----------------------------------------------------------------------

    async def move_reputation(self, moves: Sequence[tuple[Member, ReputationMove]]) -> list[int]:
        """Credit (positive) or debit (negative) members' reputation, one transfer per move against
        its system account, all in one statement; returns the transfers' ids in order. Each
        member's version moves once."""
        posted = [
            batches.ReputationPosting(
                member.uid,
                move.amount,
                await self.system_account(move.account),
                move.code,
                move.cause.type,
                move.cause.ref,
                move.reason,
                move.reverses_transfer_id,
            )
            for member, move in moves
        ]
        transfer_ids, rows = await batches.post_reputation(self.conn, posted)
        for row in rows:
            self._changed(row)
        return transfer_ids

    # --- many members at once -------------------------------------------------------------

    async def post_earns(
        self, earns: Sequence[batches.Earn], standings: Sequence[TierStanding] = ()
    ) -> list[batches.Earned]:
        """``credit`` for many locked members in one statement (see konvert.ledger.batches), with
        the tier standings the earns left them in; then refund debts are repaid."""
        self._announce_tiers(standings)
        earned, rows = await batches.post_earns(self.conn, earns, standings)
        for row in rows:
            self._note_version(row["member_id"], row["version"])
            member = self._members[row["member_uid"]]._replace(
                available=row["points_available"], debt=row["points_debt"], version=row["version"]
            )
            self._members[member.uid] = member
            await self.repay_debt(member)
        return earned

    async def store_tier_standings(
        self,
        standings: Sequence[TierStanding],
        evaluated_at: datetime,
        tiers_before: Mapping[int, str | None] | None = None,
    ) -> None:
        """Store the tier standings of locked members (see konvert.ledger.store); the version moves
        where the standing changed. ``tiers_before`` names the tiers of members locked outside
        this book (by member_uid), for their tier.changed events."""
        self._announce_tiers(standings, tiers_before)
        changed = {standing.member_uid for standing in standings if standing.changed}
        for row in await store.store_tier_standings(self.conn, standings, evaluated_at):
            if row["member_uid"] in changed:
                self._note_version(row["member_id"], row["version"])

    def _announce_tiers(
        self, standings: Sequence[TierStanding], before: Mapping[int, str | None] | None = None
    ) -> None:
        """tier.changed for each member whose standing names another tier than ``before`` (by
        member_uid; by default the tier of the member's row as this book holds it)."""
        for standing in standings:
            member = self._members.get(standing.member_uid)
            was = member.tier if before is None and member is not None else (before or {}).get(standing.member_uid)
            if standing.tier == was:
                continue
            data = events.TierChanged(
                from_tier=was, to_tier=standing.tier, qualifying_points=standing.qualifying_points
            )
            self._announce_uid(standing.member_uid, "tier.changed", data, last=True)
            if member is not None:
                self._members[member.uid] = member._replace(tier=standing.tier)

    # --- erasure --------------------------------------------------------------------------

    async def rename(self, member: Member, pseudonym: str, now: datetime) -> None:
        """Erase a member's id: the balances stay under ``pseudonym``; the old id's cached balance
        is tombstoned at the new version, so no reader can put it back."""
        row = await store.rename_member(self.conn, member.uid, pseudonym, now)
        self._note(row)
        self._note_version(member.id, row["version"])

    async def replace_transfer_reasons(self, member: Member, reasons: Sequence[tuple[int, str]]) -> None:
        await store.replace_transfer_reasons(self.conn, member.uid, reasons)

    async def reset_transfer_reasons(self, member: Member, cause_type: str, reason: str) -> None:
        await store.reset_transfer_reasons(self.conn, member.uid, cause_type, reason)

    # --- before commit --------------------------------------------------------------------

    def gathered(self, kind: type[G]) -> G:
        """This transaction's one ``kind()``, made on first use, flushed just before the commit:
        for a caller's rows that a batch's writes gather and store in one statement."""
        found = self._gathered.get(kind)
        if found is None:
            found = self._gathered[kind] = kind()
        assert isinstance(found, kind)
        return found

    async def flush_gathered(self) -> None:
        for gathered in self._gathered.values():
            await gathered.flush(self)

    # --- events ---------------------------------------------------------------------------

    def announce(self, member: Member | None, event_type: str, data: msgspec.Struct, *, last: bool = False) -> None:
        """Announce an event about ``member`` (None: about konvert itself); it is written to the
        outbox with everything else of this transaction, or not at all. With ``last`` it follows
        every other event of the transaction (a consequence of them all: a new tier or rank)."""
        self._announce_uid(member.uid if member else None, event_type, data, last)

    def _announce_uid(self, member_uid: int | None, event_type: str, data: msgspec.Struct, last: bool = False) -> None:
        announcement = events.Announcement(member_uid, event_type, data, self._services.clock())
        # A tier change follows from everything else the transaction did, so it comes after it.
        (self._announced_last if last else self._announced).append(announcement)

    def current(self, member: Member) -> Member:
        """The member's row as this transaction has left it so far."""
        return self._members[member.uid]

    def balance(self, member: Member) -> events.Balance:
        """The member's points as this transaction has left them so far."""
        now = self._members[member.uid]
        return events.Balance(available=now.available, pending=now.pending, held=now.held)

    async def write_announced(self) -> None:
        """Write the announced events to the outbox, in one statement (before the commit)."""
        announced = self._announced + self._announced_last
        self._announced, self._announced_last = [], []
        await events.insert_events(self.conn, announced)

    # --- after commit ---------------------------------------------------------------------

    @property
    def versions(self) -> dict[str, int]:
        """The newest version this transaction gave each member it changed, by member id."""
        return dict(self._versions)

    async def read_balances(self) -> None:
        """Just before the commit: the balances this transaction leaves, for the cache, of the
        members it changed whose balance is cached (someone reads it). A member it renamed
        (erased) keeps a tombstone under the old id."""
        changed = {
            m.id: m.uid for m in self._members.values() if self._versions.get(m.id) == m.version and not m.erased
        }
        read = await self._services.cache.cached(list(changed))
        if read:
            uids = [changed[member_id] for member_id in read]
            self._balances = await balances.committed_bodies(self._services, self.conn, self._versions, uids)

    async def committed(self) -> None:
        """After the commit: no reader may serve a member's balance older than what committed;
        the balances read before the commit are cached, the other members tombstoned."""
        bodies = {member_id: body for member_id, _, body in self._balances}
        await self._services.cache.refresh_many(
            (member_id, version, bodies.get(member_id, b"")) for member_id, version in self._versions.items()
        )


class Gathered(Protocol):
    """Rows a transaction gathers (see Book.gathered), written by ``flush`` before it commits."""

    async def flush(self, book: Book) -> None: ...


G = TypeVar("G", bound=Gathered)


# A caller's own step in a use case's transaction (an integration recording the delivery that
# asked for the write), run once the write is done or found to be a replay, with its outcome or
# its refusal. Whatever it raises rolls the whole transaction back.
InTransaction = Callable[["Book", "Outcome | errors.KonvertError"], Awaitable[None]]


@contextlib.asynccontextmanager
async def writing(services: Services, conn: Connection | None = None) -> AsyncIterator[Book]:
    """One use case's transaction, on ``conn`` or a pooled connection; the cached balances of the
    members it changed are refreshed after it commits."""
    if conn is None:
        async with services.pool.acquire() as pooled, writing(services, pooled) as book:
            yield book
        return
    book = Book(services, conn)
    async with conn.transaction():
        yield book
        await book.flush_gathered()
        await book.write_announced()
        await book.read_balances()
    await book.committed()
