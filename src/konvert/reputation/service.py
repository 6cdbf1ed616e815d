"""Reputation use cases: give a kudos, retract one, read a member's reputation.

Each write is one PostgreSQL transaction that locks the rows of every member it touches first
(in member_uid order, through the ledger core) and anything else after; an
acceptance takes its thread's lock before that (see konvert.reputation.store). The balance cache
and the leaderboards are updated after it commits.

Likes and helpful marks are group-committed like purchases (``Likes``): the ones that arrive
while a batch is being written share the next transaction, which locks all their members at
once, decides every refusal before writing anything, and then records them in rounds in which
no member appears twice (each like after the earlier ones of its author and giver), each round
a few statements for all its likes. A round is what writing its likes one by one would do, so
every rule below holds for them as for a kudos written alone. Acceptances and retractions are a
transaction each.

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
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple

import asyncpg
import msgspec

from konvert import errors, idempotency
from konvert.batching import GroupCommit
from konvert.db import Connection, Row
from konvert.idempotency import Outcome, request_hash
from konvert.ledger import events
from konvert.ledger.book import Book, InTransaction, Member, writing
from konvert.ledger.store import select_member_uid
from konvert.reputation import rules, store
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
    transaction, after the kudos (or its replay). Likes and helpful marks are group-committed
    (``Likes``); an acceptance is a transaction of its own, after its thread's lock."""
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
    if kudos.kind in rules.CAPPED_KINDS:
        return await services.shared(Likes).give(Like(kudos, digest, also))
    return await _write(services, lambda book: _accept(services, book, kudos, digest, now), also)


async def _write(
    services: Services, work: Callable[[Book], Awaitable[_Written]], also: InTransaction | None = None
) -> Outcome:
    """Run a write in one transaction (starting over on the conflicts above); after it commits,
    the ledger core has refreshed the balance cache, and this adds the changes to the leaderboards."""
    boards = services.shared(Leaderboards)
    async with services.pool.acquire() as conn:
        for attempt in range(_ATTEMPTS):
            try:
                async with writing(services, conn) as book:
                    generation = await boards.hold(conn)
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
            await boards.add(generation, written.deltas)
    return Outcome(written.body, replayed=written.replayed)


# How a conflicting replay names the key.
_KUDOS_ID = "this kudos_id"


def _replay(existing: Row, digest: bytes) -> _Written:
    return _Written(idempotency.replay(existing, digest, _KUDOS_ID).body, replayed=True)


class _GiverDay(NamedTuple):
    """What a giver's limits look at for one kudos: the kudos_id of their standing kudos of its
    kind for its post (None: none stands), how many kudos they gave on its day, and since when
    they have been a member."""

    standing: str | None
    given: int
    since: datetime


def _giver_day(givers: store.Givers, giver: Member | None, kudos: KudosIn, now: datetime) -> _GiverDay:
    """What ``givers`` (read from the database) says for the kudos; nothing for a new giver."""
    if giver is None:
        return _GiverDay(None, 0, now)
    key = store.GiverKey(giver.uid, kudos.source, kudos.post_id, kudos.kind)
    given = givers.given.get((giver.uid, rules.utc_day(kudos.occurred_at)), 0)
    return _GiverDay(givers.standing.get(key), given, givers.since.get(giver.uid, now))


def _worth(
    services: Services, kudos: KudosIn, giver_day: _GiverDay, giver: Member | None, now: datetime
) -> rules.KudosWorth:
    """What the kudos is worth, or its refusal: one standing kudos per giver, post and kind, and
    at most the program's number per giver and day. A giver without standing gives kudos that
    count for nothing."""
    program = services.program.reputation
    if giver_day.standing is not None:
        raise errors.DuplicateKudos(
            f"{kudos.giver_id!r} already gave a {kudos.kind} to post {kudos.post_id!r} of {kudos.source!r} "
            f"(kudos_id {giver_day.standing!r}); retract it first"
        )
    if giver_day.given >= program.giver_daily_limit:
        day = rules.utc_day(kudos.occurred_at)
        raise errors.GiverLimitReached(
            f"{kudos.giver_id!r} gave {giver_day.given} kudos on {day}, "
            f"the most allowed per day ({program.giver_daily_limit})"
        )
    giver_counts = True
    if program.giver_min_reputation or program.giver_min_account_age_days:
        reputation = giver.reputation if giver else 0
        giver_counts = rules.giver_has_standing(program, reputation, giver_day.since, now)
    return rules.kudos_worth(program, kudos.kind, kudos.author_id == kudos.giver_id, giver_counts)


def _new_kudos(
    kudos: KudosIn, digest: bytes, uids: tuple[int, int], worth: rules.KudosWorth, status: str = "standing"
) -> store.NewKudos:
    return store.NewKudos(
        kudos_id=kudos.kudos_id,
        source=kudos.source,
        post_id=kudos.post_id,
        thread_id=kudos.thread_id,
        author_uid=uids[0],
        giver_uid=uids[1],
        kind=kudos.kind,
        occurred_at=kudos.occurred_at,
        day=rules.utc_day(kudos.occurred_at),
        status=status,
        not_counted_reason=worth.not_counted_reason,
        value=worth.value,
        accepter_value=worth.accepter_value,
        superseded_by_pk=None,
        request_hash=digest,
    )


def _announce_received(book: Book, author: Member, out: KudosOut) -> None:
    author = book.current(author)
    received = events.KudosReceived(
        kudos_id=out.kudos_id,
        kind=out.kind,
        source=out.source,
        post_id=out.post_id,
        counted=out.counted,
        reputation_delta=_delta_of(out.changes, author.id),
        reputation=author.reputation,
    )
    book.announce(author, "kudos.received", received)


def _plan_shares(credits: Credits, rows: Sequence[Row], cause: Row) -> None:
    """Plan the new shares of the daily cap of one author's day (its ``select_day_shares`` rows,
    in canonical order) after ``cause`` arrived or was retracted."""
    cap = credits.services.program.reputation.daily_cap
    for row in rows:
        change = rules.capped_credit(row["value"], row["worth_before"], cap) - row["author_credited"]
        if change:
            reason = "award" if row["kudos_pk"] == cause["kudos_pk"] else ("cap_freed" if change > 0 else "cap_taken")
            credits.plan(row, row["author_uid"], "author", reason, change, cause)


# --- likes and helpful marks, group-committed --------------------------------------------------


class Like(NamedTuple):
    """A checked like or helpful mark waiting for its batch."""

    kudos: KudosIn
    digest: bytes
    also: InTransaction | None


class _Decided(NamedTuple):
    """A like to record: its position in the batch and what it is worth."""

    position: int
    like: Like
    worth: rules.KudosWorth


class Likes:
    """This process's likes and helpful marks, group-committed like purchases: those that arrive
    while a batch is being written go into the next one, one transaction for them all
    (konvert.batching.GroupCommit)."""

    def __init__(self, services: Services) -> None:
        settings = services.settings

        async def write(likes: list[Like]) -> list[Outcome | errors.KonvertError]:
            return await write_likes(services, likes)

        self._batches: GroupCommit[Like, Outcome] = GroupCommit(
            write,
            sort_key=lambda like: (like.kudos.author_id, like.kudos.occurred_at, like.kudos.kudos_id),
            batch_size_max=settings.write_batch_size_max,
            batches_in_flight_max=settings.write_batches_in_flight_max,
            overlap_after_seconds=settings.write_batch_overlap_after_seconds,
        )

    async def give(self, like: Like) -> Outcome:
        return await self._batches.submit(like)

    async def aclose(self) -> None:
        await self._batches.aclose()


async def write_likes(services: Services, likes: Sequence[Like]) -> list[Outcome | errors.KonvertError]:
    """Write checked likes and helpful marks in one transaction; return each one's outcome in
    order: recorded, a replay (of what was recorded under its kudos_id, earlier or in this batch),
    or its refusal. A refusal is decided before anything is written, so it fails that like alone
    and creates no member. After the commit the batch's changes go to the leaderboards.

    Raises ConcurrentWrite (nothing is committed) when a concurrent write got in the way (a
    kudos_id claimed meanwhile by another author); GroupCommit then writes each like alone."""
    try:
        boards = services.shared(Leaderboards)
        async with services.pool.acquire() as conn, writing(services, conn) as book:
            generation = await boards.hold(conn)
            outcomes, deltas = await _write_likes(services, book, likes)
        await boards.add(generation, deltas)
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name not in _RETRY_CONSTRAINTS:
            raise
        raise errors.ConcurrentWrite("a concurrent kudos took this kudos' id or key; retry it") from exc
    except asyncpg.DeadlockDetectedError as exc:
        raise errors.ConcurrentWrite("the kudos met concurrent ones; retry it") from exc
    return outcomes


async def _write_likes(
    services: Services, book: Book, likes: Sequence[Like]
) -> tuple[list[Outcome | errors.KonvertError], list[Delta]]:
    conn = book.conn
    ids = sorted({member_id for like in likes for member_id in (like.kudos.author_id, like.kudos.giver_id)})
    claims = await store.select_claims(conn, ids, [like.kudos.kudos_id for like in likes])
    # A member erased since its id was read is locked under its pseudonym, and left out.
    members = {m.id: m for m in await book.lock(uids=claims.members.values()) if claims.members.get(m.id) == m.uid}
    replays = await store.select_replays(conn, [(uid, k) for k, uid in claims.kudos.items()]) if claims.kudos else {}
    outcomes: list[Outcome | errors.KonvertError | None] = [None] * len(likes)
    for position, like in enumerate(likes):
        if (found := replays.get(like.kudos.kudos_id)) is not None:
            outcomes[position] = idempotency.replayed(found, like.digest, _KUDOS_ID)
    decided, repeats = await _decide(services, book, likes, members, outcomes)
    unknown = {i for d in decided for i in (d.like.kudos.author_id, d.like.kudos.giver_id)} - members.keys()
    if unknown:
        members |= {m.id: m for m in await book.lock(ids=unknown, create=True)}
    deltas: list[Delta] = []
    for round_ in _rounds(decided):
        deltas += await _record_likes(services, book, round_, members, outcomes)
    for position, earlier in repeats.items():
        recorded = outcomes[earlier]
        assert isinstance(recorded, Outcome)
        existing = {"request_hash": likes[earlier].digest, "response": recorded.body}
        outcomes[position] = idempotency.replayed(existing, likes[position].digest, _KUDOS_ID)
    done = [outcome for outcome in outcomes if outcome is not None]
    for like, outcome in zip(likes, done, strict=True):
        if like.also is not None:
            await like.also(book, outcome)
    return done, deltas


async def _decide(
    services: Services,
    book: Book,
    likes: Sequence[Like],
    members: dict[str, Member],
    outcomes: list[Outcome | errors.KonvertError | None],
) -> tuple[list[_Decided], dict[int, int]]:
    """Decide, in batch order, what each like not replayed yet is worth, or its refusal (into
    ``outcomes``), counting the earlier ones of the batch as the database counts recorded ones.
    Returns the likes to record, and the repeats of a kudos_id in the batch (position: the
    position of the one recorded for it)."""
    now = services.clock()
    wanted = [(i, like) for i, like in enumerate(likes) if outcomes[i] is None]
    existing = [(like.kudos, members[like.kudos.giver_id]) for _, like in wanted if like.kudos.giver_id in members]
    keys = [store.GiverKey(g.uid, k.source, k.post_id, k.kind) for k, g in existing]
    days = [rules.utc_day(k.occurred_at) for k, _ in existing]
    givers = await store.select_givers(book.conn, keys, days) if keys else store.Givers({}, {}, {})
    decided: list[_Decided] = []
    recorded: dict[str, int] = {}
    repeats: dict[int, int] = {}
    # What the batch's earlier likes add, by giver id (a new giver has no uid yet).
    standing: dict[tuple[str, str, str, str], str] = {}
    given: dict[tuple[str, date], int] = defaultdict(int)
    for position, like in wanted:
        kudos = like.kudos
        if (earlier := recorded.get(kudos.kudos_id)) is not None:
            repeats[position] = earlier
            continue
        giver = members.get(kudos.giver_id)
        key, day = (
            (kudos.giver_id, kudos.source, kudos.post_id, kudos.kind),
            (kudos.giver_id, rules.utc_day(kudos.occurred_at)),
        )
        known = _giver_day(givers, giver, kudos, now)
        known = known._replace(standing=standing.get(key, known.standing), given=known.given + given[day])
        try:
            worth = _worth(services, kudos, known, giver, now)
        except errors.KonvertError as refusal:
            outcomes[position] = refusal
            continue
        decided.append(_Decided(position, like, worth))
        recorded[kudos.kudos_id] = position
        standing[key] = kudos.kudos_id
        given[day] += 1
    return decided, repeats


def _rounds(decided: Sequence[_Decided]) -> list[list[_Decided]]:
    """The likes in rounds in which no member appears twice, each like after the earlier ones of
    its author and giver: a round is then what writing its likes one by one would do."""
    rounds: list[list[_Decided]] = []
    last: dict[str, int] = {}
    for d in decided:
        who = (d.like.kudos.author_id, d.like.kudos.giver_id)
        index = max((last.get(member_id, -1) for member_id in who), default=-1) + 1
        if index == len(rounds):
            rounds.append([])
        rounds[index].append(d)
        for member_id in who:
            last[member_id] = index
    return rounds


async def _record_likes(
    services: Services,
    book: Book,
    round_: Sequence[_Decided],
    members: dict[str, Member],
    outcomes: list[Outcome | errors.KonvertError | None],
) -> list[Delta]:
    """Record a round's likes and share their authors' days again, each like the cause of its
    author's changes; put each like's response into ``outcomes``."""
    conn = book.conn
    by_uid = {m.uid: m for m in members.values()}
    new = [
        _new_kudos(
            d.like.kudos,
            d.like.digest,
            (members[d.like.kudos.author_id].uid, members[d.like.kudos.giver_id].uid),
            d.worth,
        )
        for d in round_
    ]
    records: list[dict[str, Any]] = [
        {"kudos_pk": kudos_pk, "kudos_id": k.kudos_id, "source": k.source, "day": k.day, "author_uid": k.author_uid}
        for kudos_pk, k in zip(await store.insert_kudos(conn, new), new, strict=True)
    ]
    credits = Credits(services, book, by_uid)
    days = [(k.author_uid, k.day) for k in new]
    arrived = [record["kudos_pk"] for record in records]
    shares = await store.select_day_shares(conn, days, services.program.reputation.daily_cap, arrived)
    for record in records:
        _plan_shares(credits, [r for r in shares if r["author_uid"] == record["author_uid"]], record)
    posted = await credits.post()
    responses = []
    for d, k, record in zip(round_, new, records, strict=True):
        changes = posted.changes.get(record["kudos_pk"], [])
        own = sum(c.amount for c in changes if c.kudos_id == k.kudos_id and c.role == "author")
        row = {
            **k._asdict(),
            "author_id": d.like.kudos.author_id,
            "author_credited": own,
            "accepter_credited": 0,
            "bridge_points": 0,
        }
        out = _kudos_out(row, d.like.kudos.giver_id, changes)
        _announce_received(book, by_uid[k.author_uid], out)
        body = _encode(out)
        responses.append((k.author_uid, record["kudos_pk"], body))
        outcomes[d.position] = Outcome(body)
    await store.set_kudos_responses(conn, responses)
    return posted.deltas


# --- accepted answers ----------------------------------------------------------------------


async def _accept(services: Services, book: Book, kudos: KudosIn, digest: bytes, now: datetime) -> _Written:
    conn = book.conn
    # The thread's lock names its last standing acceptance, which no other acceptance replaces
    # while this one holds it.
    thread = await store.lock_thread(conn, kudos.source, kudos.thread_id)
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
    key = store.GiverKey(giver_uid, kudos.source, kudos.post_id, kudos.kind)
    giver_day = _giver_day(await store.select_givers(conn, [key], [day]), members[giver_uid], kudos, now)
    worth = _worth(services, kudos, giver_day, members[giver_uid], now)

    kudos_pk, status = await _record(conn, kudos, digest, (author_uid, giver_uid), worth, current)
    # As recorded, crediting nothing yet (what Credits and the bridge read of it).
    record = {"kudos_pk": kudos_pk, "kudos_id": kudos.kudos_id, "source": kudos.source, "day": day}
    record |= {"author_uid": author_uid, "giver_uid": giver_uid}
    credits = Credits(services, book, members, record)
    if status == "standing":
        if current is not None:
            await _supersede(credits, current, record)
        credits.plan(record, author_uid, "author", "award", worth.value)
        credits.plan(record, giver_uid, "accepter", "award", worth.accepter_value)
        if services.program.reputation.accepted_answer_points and worth.value:
            await bridge_award(credits, record, now)
    posted = await credits.post()
    changes = posted.changes.get(kudos_pk, [])
    out = _kudos_out(await store.select_kudos_by_pk(conn, author_uid, kudos_pk), members[giver_uid].id, changes)
    _announce_received(book, members[author_uid], out)
    body = _encode(out)
    await store.set_kudos_responses(conn, [(author_uid, kudos_pk, body)])
    return _Written(body, deltas=posted.deltas)


async def _record(
    conn: Connection,
    kudos: KudosIn,
    digest: bytes,
    uids: tuple[int, int],
    worth: rules.KudosWorth,
    current: asyncpg.Record | None,
) -> tuple[int, str]:
    """Insert the acceptance (author and giver ``uids``) crediting nothing yet; return its
    kudos_pk and status. An acceptance after the thread's standing one (``current``) replaces it,
    and is the thread's from now on; one before it is superseded at once."""
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
    new = _new_kudos(kudos, digest, uids, worth, status)._replace(superseded_by_pk=superseded_by)
    (kudos_pk,) = await store.insert_kudos(conn, [new])
    if status == "standing":
        await store.set_thread_accepted(conn, kudos.source, kudos.thread_id, store.Thread(*uids, kudos_pk))
    return kudos_pk, status


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
            cap = services.program.reputation.daily_cap
            _plan_shares(
                credits, await store.select_day_shares(conn, [(kudos["author_uid"], kudos["day"])], cap), kudos
            )
    # A superseded kudos credits nothing any more: its retraction only records that it is gone.
    posted = await credits.post()
    changes = posted.changes.get(kudos["kudos_pk"], [])
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
    return _Written(body, deltas=posted.deltas)


def _delta_of(changes: list[ReputationChange], member_id: str) -> int:
    """How much a member's reputation moved by these changes."""
    return sum(change.reputation_delta for change in changes if change.member_id == member_id)


def _kudos_out(kudos: Row, giver_id: str, changes: list[ReputationChange]) -> KudosOut:
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
