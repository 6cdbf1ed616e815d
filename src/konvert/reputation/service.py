"""Reputation use cases: give a kudos, retract one, read a member's reputation.

Each write is one PostgreSQL transaction that locks the rows of every member it touches first
(in member_uid order, with konvert.ledger.store.lock_member) and anything else after; an
acceptance takes its thread's lock before that (see konvert.reputation.store). The balance cache
and the leaderboards are updated after it commits.

Decisions, in the order a kudos meets them:

* **Self-kudos.** Liking or marking helpful one's own post is refused (422 ``self_kudos``).
  Accepting one's own answer is recorded (it is the thread's answer now, and moves the
  accepted answer away from someone else's) but awards nothing to anyone, as on Stack Exchange.
* **Idempotency.** ``kudos_id`` is the key: the same body again returns the stored response
  (``Idempotent-Replayed: true``), a different body is 409 ``idempotency_conflict``. There is
  at most one *standing* kudos per (source, post, giver, kind): another kudos_id for it is 409
  ``duplicate_kudos``, never a second award. Once retracted or superseded it may be given
  again (a member who unlikes and likes again, an answer accepted again), under a new kudos_id.
* **Giver limit.** A giver may give ``giver_daily_limit`` kudos per UTC day of ``occurred_at``
  (retracted ones included, so unlike/like cycles cannot get round it). One more is 429
  ``giver_limit_reached`` and writes nothing. Counted under the giver's row lock: exact under
  any concurrency.
* **Giver standing** (off by default): a kudos from a giver below ``giver_min_reputation`` or
  known to konvert for less than ``giver_min_account_age_days`` is *recorded* (it stands, it
  counts toward the giver's limit, the forum gets 201) but is worth 0 (``counted: false``,
  ``not_counted_reason: giver_without_standing``). It applies to accepted answers too, so
  sock-puppet accounts cannot farm accepted answers either. It is decided when the kudos
  arrives and not revisited: a giver who gains standing later does not revalue old kudos.
* **Daily cap** (likes and helpful marks only): see :mod:`konvert.reputation.rules`. On every
  kudos or retraction the author's day is re-shared in canonical order under the author's
  lock, and each kudos whose share changed gets a transfer for the difference: ``kudos`` up,
  ``retract`` down (pointing at that kudos' first award transfer). A retraction therefore
  reverses exactly what that kudos credited, and a kudos that was over the cap is credited
  with the room it frees (``cap_freed``); a late kudos that happened earlier in the day takes
  room from the last ones (``cap_taken``).
* **Accepted answers** are exempt from the cap. One stands per (source, thread): accepting
  another answer supersedes the standing one (its author and accepter awards and bridge
  points are reversed) and awards the new one, in one transaction. The latest acceptance by
  ``occurred_at`` (then kudos_id) wins whatever the arrival order: an acceptance that arrives
  after a later one is recorded as superseded at once. Retracting the standing acceptance
  leaves the thread without one.
* **Floor.** Reputation never goes below ``floor``: a debit stops there and what it could not
  take is remembered (reputation_members.floor_kept); the next credits make up for it first,
  so a kudos given again after a clamped retraction is not counted twice. Always
  ``reputation = standing credits + floor_kept``.
* **Points bridge** (off by default): with ``accepted_answer_points`` > 0 an accepted answer
  also credits that many loyalty points to its author (a lot and a ``bonus`` transfer from the
  system account points/bridge:accepted_answer; lifetime earned is not changed). Retraction or
  supersession claws them back like a refund does (the bridge lot first, then other lots, then
  a negative balance or a recorded shortfall). Reputation itself never converts into points.
* **Ranks.** When a write moves a member to another rank, an ``events`` row ``rank_changed`` is
  written in the same transaction, for integrations to publish.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import msgspec

from konvert import errors
from konvert.idempotency import Outcome, request_hash
from konvert.ledger import store as ledger
from konvert.reputation import leaderboard, rules, store
from konvert.reputation.leaderboard import Delta
from konvert.reputation.model import (
    BreakdownItem,
    KudosIn,
    KudosOut,
    MemberReputation,
    ReputationChange,
    RetractionIn,
)
from konvert.services import Services

_encode = msgspec.json.Encoder().encode

# A kudos may arrive late, but not from the future beyond clock skew.
_FUTURE_SKEW = timedelta(minutes=10)
# Concurrent writes that meet on a unique index, or find other members to lock than they read
# before locking, start over; the next attempt sees what the other one committed.
_ATTEMPTS = 5
_RETRY_CONSTRAINTS = frozenset({"kudos_kudos_id_key", "kudos_standing_key", "kudos_thread_accepted_key"})
BRIDGE_ACCOUNT = ("points", "bridge:accepted_answer")

_TRANSFER_REASONS = {
    "award": "kudos",
    "retraction": "kudos retracted",
    "superseded": "accepted answer superseded by {cause}",
    "cap_freed": "daily cap room freed by {cause}",
    "cap_taken": "daily cap room taken by {cause}, which happened earlier that day",
}


class _StartOver(Exception):
    """The members a write must lock changed between reading and locking them."""


class _Planned(msgspec.Struct, frozen=True):
    """A change to what one kudos credits one member."""

    kudos_pk: int
    kudos_id: str
    source: str
    day: date
    member_uid: int
    role: str
    reason: str
    change: int


class _Written(msgspec.Struct):
    """What a committed write leaves for after the commit: the response and what to refresh."""

    body: bytes
    replayed: bool = False
    versions: dict[str, int] = msgspec.field(default_factory=dict)
    deltas: list[Delta] = msgspec.field(default_factory=list)


class _Book:
    """One use case's reputation changes: the floor applied, transfers, entries, balances and ranks."""

    def __init__(
        self,
        services: Services,
        conn: asyncpg.Connection,
        members: dict[int, asyncpg.Record],
        cause: asyncpg.Record,
    ):
        self.services = services
        self.conn = conn
        self.members = members
        self.cause = cause
        self.planned: list[_Planned] = []
        self.versions: dict[str, int] = {}
        self._system_accounts: dict[tuple[str, str], int] = {}

    def plan(self, kudos: Mapping[str, Any], member_uid: int, role: str, reason: str, change: int) -> None:
        if change != 0:
            self.planned.append(
                _Planned(
                    kudos["kudos_pk"],
                    kudos["kudos_id"],
                    kudos["source"],
                    kudos["day"],
                    member_uid,
                    role,
                    reason,
                    change,
                )
            )

    async def system_account(self, asset: str, name: str) -> int:
        # Not the process-wide cache: an account created in a transaction that then rolls back
        # must not be remembered.
        key = (asset, name)
        if key not in self._system_accounts:
            self._system_accounts[key] = await ledger.ensure_system_account(self.conn, asset, name)
        return self._system_accounts[key]

    def note_version(self, member_uid: int, version: int) -> None:
        member_id = self.members[member_uid]["member_id"]
        self.versions[member_id] = max(version, self.versions.get(member_id, 0))

    async def post(self) -> tuple[list[ReputationChange], list[Delta]]:
        """Write every planned change. Per member, credits go first, so the floor only holds back
        what the change as a whole would take below it."""
        changes: list[ReputationChange] = []
        deltas: list[Delta] = []
        floor = self.services.program.reputation.floor
        for member_uid in sorted({p.member_uid for p in self.planned}):
            member = self.members[member_uid]
            planned = sorted(
                (p for p in self.planned if p.member_uid == member_uid), key=lambda p: p.change < 0
            )
            reputation_before = reputation = member["reputation"]
            kept_before = kept = await store.select_floor_kept(self.conn, member_uid)
            account_id = (await ledger.select_member_account_ids(self.conn, member_uid))["reputation"]
            for p in planned:
                step = rules.apply_floor(reputation, kept, floor, p.change)
                transfer_id = await self._transfer(p, step.posted, account_id) if step.posted else None
                await store.insert_entry(
                    self.conn,
                    member_uid=member_uid,
                    kudos_pk=p.kudos_pk,
                    role=p.role,
                    source=p.source,
                    day=p.day,
                    reason=p.reason,
                    change=p.change,
                    posted=step.posted,
                    transfer_id=transfer_id,
                    cause_kudos_pk=self.cause["kudos_pk"],
                )
                await store.add_kudos_credit(self.conn, p.kudos_pk, p.role, p.change)
                reputation += step.posted
                kept = step.floor_kept
                if step.posted:
                    deltas.append(Delta(member_uid, p.source, p.day, step.posted))
                changes.append(
                    ReputationChange(
                        member_id=member["member_id"],
                        kudos_id=p.kudos_id,
                        role=p.role,  # type: ignore[arg-type]
                        reason=p.reason,  # type: ignore[arg-type]
                        amount=p.change,
                        reputation_delta=step.posted,
                        transfer_id=transfer_id,
                    )
                )
            if kept != kept_before:
                await store.set_floor_kept(self.conn, member_uid, kept)
            if reputation != reputation_before:
                self.note_version(
                    member_uid,
                    await store.update_member_reputation(
                        self.conn, member_uid, reputation - reputation_before
                    ),
                )
                await self._record_rank_change(member, reputation_before, reputation)
        return changes, deltas

    async def _transfer(self, p: _Planned, posted: int, member_account_id: int) -> int:
        system_account_id = await self.system_account("reputation", f"kudos:{p.source}")
        reason = _TRANSFER_REASONS[p.reason].format(cause=self.cause["kudos_id"])
        if posted != p.change:
            reason += f" ({abs(p.change - posted)} held by the reputation floor)"
        if posted > 0:
            return await ledger.insert_transfer(
                self.conn,
                member_uid=p.member_uid,
                asset="reputation",
                debit_account_id=system_account_id,
                credit_account_id=member_account_id,
                amount=posted,
                code="kudos",
                cause_type="kudos",
                cause_ref=p.kudos_id,
                reason=reason,
            )
        return await ledger.insert_transfer(
            self.conn,
            member_uid=p.member_uid,
            asset="reputation",
            debit_account_id=member_account_id,
            credit_account_id=system_account_id,
            amount=-posted,
            code="retract",
            cause_type="kudos",
            cause_ref=p.kudos_id,
            reverses_transfer_id=await store.select_first_award_transfer(self.conn, p.kudos_pk, p.role),
            reason=reason,
        )

    async def _record_rank_change(self, member: asyncpg.Record, before: int, after: int) -> None:
        ranks = self.services.program.reputation.ranks
        old, new = rules.rank_for(ranks, before).rank, rules.rank_for(ranks, after).rank
        if old != new:
            payload = {
                "member_id": member["member_id"],
                "from": old,
                "to": new,
                "reputation": after,
                "kudos_id": self.cause["kudos_id"],
            }
            await store.insert_event(self.conn, member["member_uid"], "rank_changed", json.dumps(payload))


# --- giving ---------------------------------------------------------------------------------


def _normalized(kudos: KudosIn) -> KudosIn:
    # The same instant written with another offset is the same request.
    return msgspec.structs.replace(kudos, occurred_at=kudos.occurred_at.astimezone(UTC))


async def give_kudos(services: Services, kudos: KudosIn) -> Outcome:
    """Record a kudos and credit what it is worth, once per kudos_id."""
    kudos = _normalized(kudos)
    now = datetime.now(UTC)
    if kudos.kind in rules.CAPPED_KINDS and kudos.author_id == kudos.giver_id:
        raise errors.SelfKudos(f"{kudos.giver_id!r} cannot give a {kudos.kind} to their own post")
    if kudos.occurred_at > now + _FUTURE_SKEW:
        raise errors.ValidationFailed(
            "occurred_at is in the future",
            errors=[{"field": "occurred_at", "message": "must not be later than now"}],
        )
    digest = request_hash(kudos)
    return await _write(services, lambda conn: _give(services, conn, kudos, digest, now))


async def _write(services: Services, work: Callable[[asyncpg.Connection], Awaitable[_Written]]) -> Outcome:
    """Run a write in one transaction (starting over on the conflicts above), then refresh the
    balance cache and the leaderboards."""
    async with services.pool.acquire() as conn, leaderboard.writing(conn):
        for attempt in range(_ATTEMPTS):
            try:
                async with conn.transaction():
                    written = await work(conn)
                break
            except _StartOver:
                pass
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name not in _RETRY_CONSTRAINTS:
                    raise
            except asyncpg.DeadlockDetectedError:
                pass
            await asyncio.sleep(0.005 * (attempt + 1))
        else:
            raise errors.Conflict("the kudos conflicted with concurrent ones; retry it")
        if not written.replayed:
            for member_id, version in written.versions.items():
                await services.balances.invalidate(member_id, version)
            await leaderboard.leaderboards(services).add(conn, written.deltas)
    return Outcome(written.body, replayed=written.replayed)


def _replay(existing: asyncpg.Record, digest: bytes) -> _Written:
    if bytes(existing["request_hash"]) != digest:
        raise errors.IdempotencyConflict("this kudos_id was used before with a different request body")
    return _Written(bytes(existing["response"]), replayed=True)


async def _lock_members(conn: asyncpg.Connection, member_uids: set[int]) -> dict[int, asyncpg.Record]:
    """Lock the members' rows in member_uid order, so that writes touching several never deadlock."""
    return {uid: await ledger.lock_member(conn, uid) for uid in sorted(member_uids)}


async def _give(
    services: Services, conn: asyncpg.Connection, kudos: KudosIn, digest: bytes, now: datetime
) -> _Written:
    program = services.program.reputation
    existing = await store.select_kudos(conn, kudos.kudos_id)
    if existing is not None:
        return _replay(existing, digest)
    # Create members in one order, so that two writes creating the same two members never wait
    # on each other's inserts.
    uids = {
        member_id: await ledger.ensure_member(conn, member_id)
        for member_id in sorted({kudos.author_id, kudos.giver_id})
    }
    author_uid, giver_uid = uids[kudos.author_id], uids[kudos.giver_id]
    accepted = kudos.kind == "accepted_answer"
    if accepted:
        await store.lock_thread(conn, kudos.source, kudos.thread_id)
    current = await store.select_thread_accepted(conn, kudos.source, kudos.thread_id) if accepted else None
    involved = {author_uid, giver_uid} | ({current["author_uid"], current["giver_uid"]} if current else set())
    members = await _lock_members(conn, involved)

    # Under the locks: what another write committed meanwhile is visible now.
    existing = await store.select_kudos(conn, kudos.kudos_id)
    if existing is not None:
        return _replay(existing, digest)
    if accepted:
        current = await store.select_thread_accepted(conn, kudos.source, kudos.thread_id)
        if current is not None and not {current["author_uid"], current["giver_uid"]} <= members.keys():
            raise _StartOver
    if other := await store.select_standing_kudos_id(
        conn, kudos.source, kudos.post_id, giver_uid, kudos.kind
    ):
        raise errors.DuplicateKudos(
            f"{kudos.giver_id!r} already gave a {kudos.kind} to post {kudos.post_id!r} of {kudos.source!r} "
            f"(kudos_id {other!r}); retract it first"
        )
    day = rules.utc_day(kudos.occurred_at)
    given = await store.count_kudos_given(conn, giver_uid, day)
    if given >= program.giver_daily_limit:
        raise errors.GiverLimitReached(
            f"{kudos.giver_id!r} gave {given} kudos on {day}, "
            f"the most allowed per day ({program.giver_daily_limit})"
        )
    giver_counts = True
    if program.giver_min_reputation or program.giver_min_account_age_days:
        since = await store.select_member_since(conn, giver_uid)
        giver_counts = rules.giver_has_standing(program, members[giver_uid]["reputation"], since, now)
    worth = rules.kudos_worth(program, kudos.kind, author_uid == giver_uid, giver_counts)

    status, superseded_by = "standing", None
    if current is not None and rules.canonical_key(
        current["occurred_at"], current["kudos_id"]
    ) > rules.canonical_key(kudos.occurred_at, kudos.kudos_id):
        # A later acceptance of the thread already stands: this one arrived late.
        status, superseded_by = "superseded", current["kudos_pk"]
    elif current is not None:
        # This acceptance replaces the standing one: it stops standing before this one is inserted,
        # so the thread never has two.
        await store.update_kudos_status(conn, current["kudos_pk"], "superseded")
    kudos_pk = await store.insert_kudos(
        conn,
        kudos_id=kudos.kudos_id,
        source=kudos.source,
        post_id=kudos.post_id,
        thread_id=kudos.thread_id,
        author_uid=author_uid,
        giver_uid=giver_uid,
        kind=kudos.kind,
        occurred_at=kudos.occurred_at,
        day=day,
        status=status,
        not_counted_reason=worth.not_counted_reason,
        value=worth.value,
        accepter_value=worth.accepter_value,
        superseded_by_pk=superseded_by,
        request_hash=digest,
    )
    record = await store.select_kudos_by_pk(conn, kudos_pk)
    book = _Book(services, conn, members, record)
    if status == "standing":
        if not accepted:
            await _share_day(book, author_uid, day)
        else:
            if current is not None:
                await _supersede(book, current, record)
            book.plan(record, author_uid, "author", "award", worth.value)
            book.plan(record, giver_uid, "accepter", "award", worth.accepter_value)
            if services.program.reputation.accepted_answer_points and worth.value:
                await _bridge_award(book, record, now)
    changes, deltas = await book.post()
    body = _encode(_kudos_out(await store.select_kudos_by_pk(conn, kudos_pk), changes))
    await store.set_kudos_response(conn, kudos_pk, body)
    return _Written(body, versions=book.versions, deltas=deltas)


async def _share_day(book: _Book, author_uid: int, day: date) -> None:
    """Share the author's daily cap among the day's standing likes and helpful marks again."""
    cap = book.services.program.reputation.daily_cap
    for row in await store.select_day_shares(book.conn, author_uid, day, cap):
        change = rules.capped_credit(row["value"], row["worth_before"], cap) - row["author_credited"]
        if change:
            reason = (
                "award"
                if row["kudos_pk"] == book.cause["kudos_pk"]
                else ("cap_freed" if change > 0 else "cap_taken")
            )
            book.plan({**row, "day": day}, author_uid, "author", reason, change)


async def _supersede(book: _Book, current: asyncpg.Record, by: asyncpg.Record) -> None:
    await store.update_kudos_status(
        book.conn, current["kudos_pk"], "superseded", superseded_by_pk=by["kudos_pk"]
    )
    await _reverse_accepted(book, current, "superseded")


async def _reverse_accepted(book: _Book, kudos: asyncpg.Record, reason: str) -> None:
    book.plan(kudos, kudos["author_uid"], "author", reason, -kudos["author_credited"])
    book.plan(kudos, kudos["giver_uid"], "accepter", reason, -kudos["accepter_credited"])
    if kudos["bridge_points"]:
        await _bridge_clawback(book, kudos)


# --- the points bridge ----------------------------------------------------------------------


async def _bridge_award(book: _Book, kudos: asyncpg.Record, now: datetime) -> None:
    services, conn = book.services, book.conn
    points = services.program.reputation.accepted_answer_points
    member_uid = kudos["author_uid"]
    expire_days = services.program.points.expire_after_days
    expires_at = now + timedelta(days=expire_days) if expire_days is not None else None
    lot_id = await store.insert_available_lot(conn, member_uid, points, now, expires_at)
    accounts = await ledger.select_member_account_ids(conn, member_uid)
    transfer_id = await ledger.insert_transfer(
        conn,
        member_uid=member_uid,
        asset="points",
        debit_account_id=await book.system_account(*BRIDGE_ACCOUNT),
        credit_account_id=accounts["available"],
        amount=points,
        code="bonus",
        cause_type="kudos",
        cause_ref=kudos["kudos_id"],
        lot_id=lot_id,
        reason="points for an accepted answer",
    )
    book.note_version(member_uid, await ledger.update_member_points(conn, member_uid, available=points))
    debt = (await ledger.lock_member(conn, member_uid))["points_debt"]
    await ledger.settle_debt(conn, member_uid, debt)
    await store.set_kudos_bridge(
        conn, kudos["kudos_pk"], points=points, lot_id=lot_id, transfer_id=transfer_id
    )


async def _bridge_clawback(book: _Book, kudos: asyncpg.Record) -> None:
    """Take an accepted answer's bridge points back, like a refund: from its own lot first, then
    the member's other available lots, then as a negative balance if the program allows it."""
    services, conn = book.services, book.conn
    points, member_uid, lot_id = kudos["bridge_points"], kudos["author_uid"], kudos["bridge_lot_id"]
    own = await ledger.lock_lot(conn, lot_id)
    own_take = min(points, own["remaining"]) if own is not None and own["state"] == "available" else 0
    other_takes, missing = ledger.plan_takes(
        await ledger.lock_available_lots(conn, member_uid, lot_id), points - own_take
    )
    allow_negative = services.program.points.allow_negative_balance
    debt, shortfall = (missing, 0) if allow_negative else (0, missing)
    amount = points - shortfall
    if amount:
        accounts = await ledger.select_member_account_ids(conn, member_uid)
        transfer_id = await ledger.insert_transfer(
            conn,
            member_uid=member_uid,
            asset="points",
            debit_account_id=accounts["available"],
            credit_account_id=await book.system_account(*BRIDGE_ACCOUNT),
            amount=amount,
            code="retract",
            cause_type="kudos",
            cause_ref=kudos["kudos_id"],
            lot_id=lot_id,
            reverses_transfer_id=kudos["bridge_transfer_id"],
            reason="points for an accepted answer taken back",
        )
        takes = ([(lot_id, own_take)] if own_take else []) + other_takes
        await ledger.take_from_lots(conn, member_uid, takes, transfer_id, "retract")
        book.note_version(
            member_uid, await ledger.update_member_points(conn, member_uid, available=-amount, debt=debt)
        )
    await store.set_kudos_bridge(conn, kudos["kudos_pk"], points=0, shortfall=shortfall)


# --- retracting -----------------------------------------------------------------------------


async def retract_kudos(services: Services, kudos_id: str) -> Outcome:
    """Retract a kudos by its kudos_id: reverse exactly what it credits. Retracting again replays."""

    async def find(conn: asyncpg.Connection) -> asyncpg.Record | None:
        return await store.select_kudos(conn, kudos_id)

    return await _write(services, lambda conn: _retract(services, conn, find, f"no kudos {kudos_id!r}"))


async def retract_kudos_by_key(services: Services, key: RetractionIn) -> Outcome:
    """Retract the kudos a giver gave to a post (the standing one, else replay the last retraction)."""

    async def find(conn: asyncpg.Connection) -> asyncpg.Record | None:
        giver_uid = await ledger.select_member_uid(conn, key.giver_id)
        if giver_uid is None:
            return None
        return await store.select_kudos_by_key(conn, key.source, key.post_id, giver_uid, key.kind)

    missing = f"no {key.kind} from {key.giver_id!r} for post {key.post_id!r} of {key.source!r}"
    return await _write(services, lambda conn: _retract(services, conn, find, missing))


async def _retract(
    services: Services,
    conn: asyncpg.Connection,
    find: Callable[[asyncpg.Connection], Awaitable[asyncpg.Record | None]],
    missing: str,
) -> _Written:
    found = await find(conn)
    if found is None:
        raise errors.KudosNotFound(missing)
    members = await _lock_members(conn, {found["author_uid"], found["giver_uid"]})
    kudos = await find(conn)  # again, under the locks
    if kudos is None or kudos["kudos_pk"] != found["kudos_pk"]:
        raise _StartOver
    if kudos["status"] == "retracted":
        return _Written(bytes(kudos["retraction_response"]), replayed=True)
    accepted = kudos["kind"] == "accepted_answer"
    was_standing = kudos["status"] == "standing"
    await store.update_kudos_status(conn, kudos["kudos_pk"], "retracted")
    book = _Book(services, conn, members, kudos)
    if was_standing:
        if accepted:
            await _reverse_accepted(book, kudos, "retraction")
        else:
            book.plan(kudos, kudos["author_uid"], "author", "retraction", -kudos["author_credited"])
            await _share_day(book, kudos["author_uid"], kudos["day"])
    # A superseded kudos credits nothing any more: its retraction only records that it is gone.
    changes, deltas = await book.post()
    body = _encode(_kudos_out(await store.select_kudos_by_pk(conn, kudos["kudos_pk"]), changes))
    await store.set_retraction_response(conn, kudos["kudos_pk"], body)
    return _Written(body, versions=book.versions, deltas=deltas)


def _kudos_out(kudos: asyncpg.Record, changes: list[ReputationChange]) -> KudosOut:
    status = kudos["status"]
    reason = kudos["not_counted_reason"] or (None if status == "standing" else status)
    return KudosOut(
        kudos_id=kudos["kudos_id"],
        source=kudos["source"],
        post_id=kudos["post_id"],
        thread_id=kudos["thread_id"],
        author_id=kudos["author_id"],
        giver_id=kudos["giver_id"],
        kind=kudos["kind"],
        occurred_at=kudos["occurred_at"],
        day=kudos["day"],
        status=status,
        counted=status == "standing" and kudos["not_counted_reason"] is None,
        not_counted_reason=reason,
        author_reputation=kudos["author_credited"],
        accepter_reputation=kudos["accepter_credited"],
        bridge_points=kudos["bridge_points"],
        changes=changes,
    )


# --- reading --------------------------------------------------------------------------------


async def member_reputation(
    services: Services, member_id: str, now: datetime | None = None
) -> MemberReputation:
    """A member's reputation, rank, what the next rank needs, where it comes from, and today's cap."""
    program = services.program.reputation
    row = await store.select_member_reputation(services.pool, member_id)
    if row is None:
        raise errors.MemberNotFound(f"no member {member_id!r}")
    today = rules.utc_day(now or datetime.now(UTC))
    breakdown = await store.select_breakdown(services.pool, row["member_uid"])
    totals = await store.select_day_totals(services.pool, row["member_uid"], today)
    standing = rules.rank_for(program.ranks, row["reputation"])
    return MemberReputation(
        member_id=row["member_id"],
        reputation=row["reputation"],
        rank=standing.rank,
        next_rank=standing.next_rank,
        needed_for_next_rank=standing.needed_for_next_rank,
        breakdown=[BreakdownItem(r["source"], r["kind"], r["reputation"]) for r in breakdown],
        kept_by_floor=row["floor_kept"],
        today_before_cap=totals["before_cap"],
        today_capped=totals["capped"],
        daily_cap=program.daily_cap,
    )
