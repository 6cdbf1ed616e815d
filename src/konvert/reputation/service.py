"""Reputation use cases: give a kudos, retract one, read a member's reputation.

Each write is one PostgreSQL transaction that locks the rows of every member it touches first
(in member_uid order, through the ledger core) and anything else after; an
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
* **Events.** A kudos given or retracted is announced to its author (``kudos.received``,
  ``kudos.retracted``), and a write that moves a member to another rank announces
  ``reputation.rank_changed``, in the write's transaction (konvert.ledger.events).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING

import asyncpg
import msgspec

from konvert import errors
from konvert.db import Connection, Row
from konvert.idempotency import Outcome, request_hash
from konvert.ledger import events
from konvert.ledger.book import Book, InTransaction, Member, writing
from konvert.ledger.store import select_member_uid
from konvert.reputation import leaderboard, rules, store
from konvert.reputation.credits import Credits, bridge_award, bridge_clawback
from konvert.reputation.leaderboard import Delta, Leaderboards
from konvert.reputation.model import BreakdownItem, KudosIn, KudosOut, MemberReputation, ReputationChange, RetractionIn

if TYPE_CHECKING:
    from konvert.services import Services

_encode = msgspec.json.Encoder().encode

# A kudos may arrive late, but not from the future beyond clock skew.
_FUTURE_SKEW = timedelta(minutes=10)
# Concurrent writes that meet on a unique index, or find other members to lock than they read
# before locking, start over; the next attempt sees what the other one committed.
_ATTEMPTS = 5
# natural_keys_pkey: another author's kudos claimed the kudos_id meanwhile (the next attempt
# replays it or refuses the request).
_RETRY_CONSTRAINTS = frozenset(
    {"natural_keys_pkey", "kudos_kudos_id_key", "kudos_given_standing_key", "kudos_thread_accepted_key"}
)


class _StartOver(Exception):
    """The members a write must lock changed between reading and locking them."""


class _Written(msgspec.Struct):
    """What a committed write leaves for after the commit: the response and the leaderboards' changes."""

    body: bytes
    replayed: bool = False
    deltas: list[Delta] = msgspec.field(default_factory=list)


# --- giving ---------------------------------------------------------------------------------


def _normalized(kudos: KudosIn) -> KudosIn:
    # The same instant written with another offset is the same request.
    return msgspec.structs.replace(kudos, occurred_at=kudos.occurred_at.astimezone(UTC))


async def give_kudos(services: Services, kudos: KudosIn, also: InTransaction | None = None) -> Outcome:
    """Record a kudos and credit what it is worth, once per kudos_id. ``also`` runs in the same
    transaction, after the kudos (or its replay)."""
    kudos = _normalized(kudos)
    now = services.clock()
    if kudos.kind in rules.CAPPED_KINDS and kudos.author_id == kudos.giver_id:
        raise errors.SelfKudos(f"{kudos.giver_id!r} cannot give a {kudos.kind} to their own post")
    if kudos.occurred_at > now + _FUTURE_SKEW:
        raise errors.ValidationFailed(
            "occurred_at is in the future",
            errors=[{"field": "occurred_at", "message": "must not be later than now"}],
        )
    digest = request_hash(kudos)
    return await _write(services, lambda book: _give(services, book, kudos, digest, now), also)


async def _write(
    services: Services, work: Callable[[Book], Awaitable[_Written]], also: InTransaction | None = None
) -> Outcome:
    """Run a write in one transaction (starting over on the conflicts above); after it commits,
    the ledger core has refreshed the balance cache, and this adds the changes to the leaderboards."""
    async with services.pool.acquire() as conn, leaderboard.writing(conn):
        for attempt in range(_ATTEMPTS):
            try:
                async with writing(services, conn) as book:
                    written = await work(book)
                    if also is not None:
                        await also(book, Outcome(written.body, replayed=written.replayed))
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
            await services.shared(Leaderboards).add(conn, written.deltas)
    return Outcome(written.body, replayed=written.replayed)


def _replay(existing: asyncpg.Record, digest: bytes) -> _Written:
    if bytes(existing["request_hash"]) != digest:
        raise errors.IdempotencyConflict("this kudos_id was used before with a different request body")
    return _Written(bytes(existing["response"]), replayed=True)


async def _give(services: Services, book: Book, kudos: KudosIn, digest: bytes, now: datetime) -> _Written:
    conn = book.conn
    accepted = kudos.kind == "accepted_answer"
    # The thread's lock names its last standing acceptance, which no other acceptance replaces
    # while this one holds it.
    thread = await store.lock_thread(conn, kudos.source, kudos.thread_id) if accepted else None
    # Author and giver are created if new (a refusal below rolls that back), and locked with the
    # members of the thread's standing acceptance, all in member_uid order.
    locked = await book.lock(
        uids={thread.author_uid, thread.giver_uid} if thread else set(),
        ids={kudos.author_id, kudos.giver_id},
        create=True,
    )
    members = {member.uid: member for member in locked}
    uids = {member.id: member.uid for member in locked}
    author_uid, giver_uid = uids[kudos.author_id], uids[kudos.giver_id]

    # Under the locks (a replay too: it may have been recorded while this one waited for them).
    existing = await store.select_kudos(conn, kudos.kudos_id)
    if existing is not None:
        return _replay(existing, digest)
    current = None
    if thread is not None:
        # It may have been retracted meanwhile (a retraction takes the members' locks only).
        last = await store.select_kudos_by_pk(conn, thread.author_uid, thread.kudos_pk)
        current = last if last["status"] == "standing" else None
    day = rules.utc_day(kudos.occurred_at)
    worth = await _worth(services, conn, kudos, day, author_uid, members[giver_uid], now)

    kudos_pk, status = await _record(conn, kudos, digest, day, (author_uid, giver_uid), worth, current)
    # As recorded, crediting nothing yet (what Credits and the bridge read of it).
    record = {"kudos_pk": kudos_pk, "kudos_id": kudos.kudos_id, "source": kudos.source, "day": day}
    record |= {"author_uid": author_uid, "giver_uid": giver_uid}
    credits = Credits(services, book, members, record)
    if status == "standing":
        if not accepted:
            await _share_day(credits, author_uid, day)
        else:
            if current is not None:
                await _supersede(credits, current, record)
            credits.plan(record, author_uid, "author", "award", worth.value)
            credits.plan(record, giver_uid, "accepter", "award", worth.accepter_value)
            if services.program.reputation.accepted_answer_points and worth.value:
                await bridge_award(credits, record, now)
    changes, deltas = await credits.post()
    out = _kudos_out(await store.select_kudos_by_pk(conn, author_uid, kudos_pk), members[giver_uid].id, changes)
    author = book.current(members[author_uid])
    received = events.KudosReceived(
        kudos_id=out.kudos_id,
        kind=out.kind,
        source=out.source,
        post_id=out.post_id,
        counted=out.counted,
        reputation_delta=_delta_of(changes, author.id),
        reputation=author.reputation,
    )
    book.announce(author, "kudos.received", received)
    body = _encode(out)
    await store.set_kudos_response(conn, author_uid, kudos_pk, body)
    return _Written(body, deltas=deltas)


async def _record(
    conn: Connection,
    kudos: KudosIn,
    digest: bytes,
    day: date,
    uids: tuple[int, int],
    worth: rules.KudosWorth,
    current: asyncpg.Record | None,
) -> tuple[int, str]:
    """Insert the kudos (author and giver ``uids``) crediting nothing yet; return its kudos_pk
    and status. An acceptance after the thread's standing one (``current``) replaces it, and is
    the thread's from now on; one before it is superseded at once."""
    author_uid, giver_uid = uids
    status, superseded_by = "standing", None
    if current is not None and rules.canonical_key(current["occurred_at"], current["kudos_id"]) > rules.canonical_key(
        kudos.occurred_at, kudos.kudos_id
    ):
        # A later acceptance of the thread already stands: this one arrived late.
        status, superseded_by = "superseded", current["kudos_pk"]
    elif current is not None:
        # This acceptance replaces the standing one: it stops standing before this one is inserted,
        # so the thread never has two.
        await store.update_kudos_status(conn, current, "superseded")
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
    if kudos.kind == "accepted_answer" and status == "standing":
        await store.set_thread_accepted(
            conn, kudos.source, kudos.thread_id, store.Thread(author_uid, giver_uid, kudos_pk)
        )
    return kudos_pk, status


async def _worth(
    services: Services, conn: Connection, kudos: KudosIn, day: date, author_uid: int, giver: Member, now: datetime
) -> rules.KudosWorth:
    """What the kudos is worth, or its refusal: one standing kudos per giver, post and kind, and
    at most the program's number per giver and day. A giver without standing gives kudos that
    count for nothing."""
    program = services.program.reputation
    other, given = await store.select_giver_day(conn, giver.uid, kudos.source, kudos.post_id, kudos.kind, day)
    if other is not None:
        raise errors.DuplicateKudos(
            f"{kudos.giver_id!r} already gave a {kudos.kind} to post {kudos.post_id!r} of {kudos.source!r} "
            f"(kudos_id {other!r}); retract it first"
        )
    if given >= program.giver_daily_limit:
        raise errors.GiverLimitReached(
            f"{kudos.giver_id!r} gave {given} kudos on {day}, the most allowed per day ({program.giver_daily_limit})"
        )
    giver_counts = True
    if program.giver_min_reputation or program.giver_min_account_age_days:
        since = await store.select_member_since(conn, giver.uid)
        giver_counts = rules.giver_has_standing(program, giver.reputation, since, now)
    return rules.kudos_worth(program, kudos.kind, author_uid == giver.uid, giver_counts)


async def _share_day(credits: Credits, author_uid: int, day: date) -> None:
    """Share the author's daily cap among the day's standing likes and helpful marks again."""
    cap = credits.services.program.reputation.daily_cap
    for row in await store.select_day_shares(credits.conn, author_uid, day, cap):
        change = rules.capped_credit(row["value"], row["worth_before"], cap) - row["author_credited"]
        if change:
            reason = (
                "award"
                if row["kudos_pk"] == credits.cause["kudos_pk"]
                else ("cap_freed" if change > 0 else "cap_taken")
            )
            credits.plan({**row, "day": day}, author_uid, "author", reason, change)


async def _supersede(credits: Credits, current: asyncpg.Record, by: Row) -> None:
    await store.update_kudos_status(credits.conn, current, "superseded", superseded_by_pk=by["kudos_pk"])
    await _reverse_accepted(credits, current, "superseded")


async def _reverse_accepted(credits: Credits, kudos: asyncpg.Record, reason: str) -> None:
    credits.plan(kudos, kudos["author_uid"], "author", reason, -kudos["author_credited"])
    credits.plan(kudos, kudos["giver_uid"], "accepter", reason, -kudos["accepter_credited"])
    if kudos["bridge_points"]:
        await bridge_clawback(credits, kudos)


# --- retracting -----------------------------------------------------------------------------


async def retract_kudos(services: Services, kudos_id: str) -> Outcome:
    """Retract a kudos by its kudos_id: reverse exactly what it credits. Retracting again replays."""

    async def find(conn: Connection) -> asyncpg.Record | None:
        return await store.select_kudos(conn, kudos_id)

    return await _write(services, lambda book: _retract(services, book, find, f"no kudos {kudos_id!r}"))


async def retract_kudos_by_key(services: Services, key: RetractionIn) -> Outcome:
    """Retract the kudos a giver gave to a post (the standing one, else replay the last retraction)."""

    async def find(conn: Connection) -> asyncpg.Record | None:
        giver_uid = await select_member_uid(conn, key.giver_id)
        if giver_uid is None:
            return None
        return await store.select_kudos_by_key(conn, key.source, key.post_id, giver_uid, key.kind)

    missing = f"no {key.kind} from {key.giver_id!r} for post {key.post_id!r} of {key.source!r}"
    return await _write(services, lambda book: _retract(services, book, find, missing))


async def _retract(
    services: Services,
    book: Book,
    find: Callable[[Connection], Awaitable[asyncpg.Record | None]],
    missing: str,
) -> _Written:
    conn = book.conn
    found = await find(conn)
    if found is None:
        raise errors.KudosNotFound(missing)
    members = {m.uid: m for m in await book.lock(uids={found["author_uid"], found["giver_uid"]})}
    kudos = await find(conn)  # again, under the locks
    if kudos is None or kudos["kudos_pk"] != found["kudos_pk"]:
        raise _StartOver
    if kudos["status"] == "retracted":
        return _Written(bytes(kudos["retraction_response"]), replayed=True)
    accepted = kudos["kind"] == "accepted_answer"
    was_standing = kudos["status"] == "standing"
    await store.update_kudos_status(conn, kudos, "retracted")
    credits = Credits(services, book, members, kudos)
    if was_standing:
        if accepted:
            await _reverse_accepted(credits, kudos, "retraction")
        else:
            credits.plan(kudos, kudos["author_uid"], "author", "retraction", -kudos["author_credited"])
            await _share_day(credits, kudos["author_uid"], kudos["day"])
    # A superseded kudos credits nothing any more: its retraction only records that it is gone.
    changes, deltas = await credits.post()
    out = _kudos_out(
        await store.select_kudos_by_pk(conn, kudos["author_uid"], kudos["kudos_pk"]),
        members[kudos["giver_uid"]].id,
        changes,
    )
    author = book.current(members[kudos["author_uid"]])
    retracted = events.KudosRetracted(
        kudos_id=out.kudos_id,
        kind=out.kind,
        source=out.source,
        post_id=out.post_id,
        reputation_delta=_delta_of(changes, author.id),
        reputation=author.reputation,
    )
    book.announce(author, "kudos.retracted", retracted)
    body = _encode(out)
    await store.set_retraction_response(conn, kudos["author_uid"], kudos["kudos_pk"], body)
    return _Written(body, deltas=deltas)


def _delta_of(changes: list[ReputationChange], member_id: str) -> int:
    """How much a member's reputation moved by these changes."""
    return sum(change.reputation_delta for change in changes if change.member_id == member_id)


def _kudos_out(kudos: asyncpg.Record, giver_id: str, changes: list[ReputationChange]) -> KudosOut:
    status = kudos["status"]
    reason = kudos["not_counted_reason"] or (None if status == "standing" else status)
    return KudosOut(
        kudos_id=kudos["kudos_id"],
        source=kudos["source"],
        post_id=kudos["post_id"],
        thread_id=kudos["thread_id"],
        author_id=kudos["author_id"],
        giver_id=giver_id,
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


async def member_reputation(services: Services, member_id: str, now: datetime | None = None) -> MemberReputation:
    """A member's reputation, rank, what the next rank needs, where it comes from, and today's cap."""
    program = services.program.reputation
    row = await store.select_member_reputation(services.pool, member_id)
    if row is None:
        raise errors.MemberNotFound(f"no member {member_id!r}")
    today = rules.utc_day(now or services.clock())
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
