"""Posting purchases: the points they earn, once per (partner, purchase_id), group-committed.

Concurrent postings are written together, one transaction per batch (konvert.batching), in five
round trips whatever the batch's size: lock the batch's members, read which purchase ids are
recorded and the members' points qualifying for tiers, post every earn through the ledger core,
record the purchases, commit. Each posting still gets its own outcome, and a 2xx means committed.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, NamedTuple

import msgspec

from konvert import errors
from konvert.batching import GroupCommit
from konvert.earning import rules, store
from konvert.earning.model import EarningResult, PurchaseIn, PurchaseOut
from konvert.idempotency import Outcome, replayed, request_hash
from konvert.ledger import events
from konvert.ledger.accounts import issued
from konvert.ledger.batches import Earn, Earned
from konvert.ledger.book import Book, InTransaction, Member, writing
from konvert.ledger.rules import expiry_for
from konvert.ledger.store import TierStanding
from konvert.tiers import rules as tier_rules

if TYPE_CHECKING:
    from konvert.services import Services

_encode = msgspec.json.Encoder(decimal_format="number").encode

# A purchase may be posted late, but not from the future beyond clock skew.
_FUTURE_SKEW = timedelta(minutes=10)


def check_purchase(services: Services, purchase: PurchaseIn) -> None:
    """Everything that can refuse a purchase without the database, checked once before it is
    queued: the batch that writes it then cannot refuse it for these reasons."""
    if purchase.occurred_at > services.clock() + _FUTURE_SKEW:
        raise errors.ValidationFailed(
            "occurred_at is in the future", errors=[{"field": "occurred_at", "message": "must not be later than now"}]
        )
    rules.earning_rate(services.program, purchase)


def preview(services: Services, purchase: PurchaseIn) -> EarningResult:
    """The points a purchase would earn, with the rules applied. Writes nothing."""
    check_purchase(services, purchase)
    return rules.compute_earning(services.program, purchase)


class Purchases:
    """This process's purchase postings, group-committed in batches sorted by member."""

    def __init__(self, services: Services) -> None:
        settings = services.settings

        async def write(postings: list[tuple[PurchaseIn, InTransaction | None]]) -> list[Outcome | errors.KonvertError]:
            return await write_purchases(services, [p for p, _ in postings], [also for _, also in postings])

        self._batches: GroupCommit[tuple[PurchaseIn, InTransaction | None], Outcome] = GroupCommit(
            write,
            sort_key=lambda posting: (posting[0].member_id, posting[0].partner, posting[0].purchase_id),
            batch_size_max=settings.write_batch_size_max,
            batches_in_flight_max=settings.write_batches_in_flight_max,
            overlap_after_seconds=settings.write_batch_overlap_after_seconds,
        )

    async def post(self, purchase: PurchaseIn, also: InTransaction | None = None) -> Outcome:
        return await self._batches.submit((purchase, also))

    async def aclose(self) -> None:
        await self._batches.aclose()


async def post_purchase(services: Services, purchase: PurchaseIn, also: InTransaction | None = None) -> Outcome:
    """Record a purchase and credit its points, once per (partner, purchase_id). ``also`` runs in
    the same transaction, with the purchase's outcome (or its refusal as a replay)."""
    check_purchase(services, purchase)
    return await services.shared(Purchases).post(purchase, also)


class _New(NamedTuple):
    """A posting to record, with the digest of its request."""

    position: int
    purchase: PurchaseIn
    digest: bytes


async def write_purchases(
    services: Services, postings: Sequence[PurchaseIn], hooks: Sequence[InTransaction | None] = ()
) -> list[Outcome | errors.KonvertError]:
    """Write checked postings (sorted by member) in one transaction; return each one's outcome,
    in order: recorded, a replay of what was recorded for its purchase id, or its refusal.
    A refused posting changes nothing: its member is not even created. Each posting's hook (by
    position in ``hooks``) runs in the transaction with its outcome.

    Raises ConcurrentWrite (nothing is committed) when a purchase id this batch found free was
    taken meanwhile by a concurrent request for another member: the tier carried through that
    member's later purchases would be wrong. The batch is then written one posting at a time.
    """
    digests = [request_hash(p) for p in postings]
    outcomes: list[Outcome | errors.KonvertError | None] = [None] * len(postings)
    tiers = services.program.tiers
    now = services.clock()
    window_start = now - timedelta(days=tiers.window_days) if tiers.levels else None
    async with writing(services) as book:
        members, recorded, qualifying = await _read_batch(book, postings, window_start)
        new: list[_New] = []
        first: dict[tuple[str, str], int] = {}
        for index, (purchase, digest) in enumerate(zip(postings, digests, strict=True)):
            key = (purchase.partner, purchase.purchase_id)
            if (found := recorded.get(key)) is not None:
                outcomes[index] = replayed(found._asdict(), digest)
                # Its purchase may be one whose batch committed without its answer arriving (a
                # connection lost after the commit): make sure no older balance stays cached.
                if (member := members.get(purchase.member_id)) is not None and member.uid == found.member_uid:
                    book.invalidate_cached(member)
            elif key not in first:
                first[key] = index
                new.append(_New(index, purchase, digest))
        unknown = {n.purchase.member_id for n in new} - members.keys()
        if unknown:
            members |= {m.id: m for m in await book.lock(ids=unknown, create=True)}
        for index, body in (await _record(services, book, new, members, qualifying, now)).items():
            outcomes[index] = Outcome(body)
        # Repeats of a posting within the batch answer as its replay would.
        for index, (purchase, digest) in enumerate(zip(postings, digests, strict=True)):
            if outcomes[index] is None:
                earlier = first[(purchase.partner, purchase.purchase_id)]
                recorded_outcome = outcomes[earlier]
                assert isinstance(recorded_outcome, Outcome)
                first_one = {"request_hash": digests[earlier], "response": recorded_outcome.body}
                outcomes[index] = replayed(first_one, digest)
        done = [outcome for outcome in outcomes if outcome is not None]
        for hook, outcome in zip(hooks, done, strict=False):
            if hook is not None:
                await hook(book, outcome)
    return done


async def _read_batch(
    book: Book, postings: Sequence[PurchaseIn], window_start: datetime | None
) -> tuple[dict[str, Member], dict[tuple[str, str], store.Recorded], dict[int, int]]:
    """Lock the batch's members that exist and read what its postings need, in three statements:
    the ids' claims, the members' locks, their recorded purchases and points qualifying for tiers.
    A purchase id claimed by another member comes back with an empty request hash, which no
    posting can replay."""
    claims = await store.select_claims(
        book.conn, sorted({p.member_id for p in postings}), [(p.partner, p.purchase_id) for p in postings]
    )
    # A member erased since its id was read is locked under its pseudonym, and left out.
    locked = await book.lock(uids=claims.members.values())
    members = {m.id: m for m in locked if claims.members.get(m.id) == m.uid}
    keys = [(p.partner, p.purchase_id, members[p.member_id].uid) for p in postings if p.member_id in members]
    recorded, qualifying = await store.read_for_batch(book.conn, keys, [m.uid for m in members.values()], window_start)
    for posting in postings:
        key = (posting.partner, posting.purchase_id)
        owner = claims.purchases.get(key)
        member = members.get(posting.member_id)
        if owner is not None and (member is None or member.uid != owner):
            recorded.setdefault(key, store.Recorded(owner, b"", b""))
    return members, recorded, qualifying


async def _record(
    services: Services,
    book: Book,
    new: list[_New],
    members: dict[str, Member],
    qualifying: dict[int, int],
    now: datetime,
) -> dict[int, bytes]:
    """Earn and record the new postings; return each one's response by its index. ``qualifying``
    holds the locked members' points qualifying for tiers (members created since have none)."""
    if not new:
        return {}
    tiered = bool(services.program.tiers.levels)
    standings: dict[int, TierStanding] = {}
    earnings = []
    for posting in new:
        member = members[posting.purchase.member_id]
        standing = standings.get(member.uid) or TierStanding(
            member.uid,
            member.tier,
            member.tier_below_since,
            qualifying.get(member.uid, 0) if tiered else member.tier_qualifying_points,
            False,
        )
        earning, standing = _earn(services, posting.purchase, standing, now, tiered)
        standings[member.uid] = standing
        earnings.append(earning)
    accounts = {partner: await book.system_account(issued(partner)) for partner in {p.purchase.partner for p in new}}
    earns = [
        _earn_row(services, p.purchase, members[p.purchase.member_id], e, accounts[p.purchase.partner], now)
        for p, e in zip(new, earnings, strict=True)
    ]
    earned = await book.post_earns(earns, list(standings.values()) if tiered else [])
    rows = [
        _purchase_row(p, members[p.purchase.member_id], earning, earn, lot.lot_id, lot.transfer_id)
        for p, earning, earn, lot in zip(new, earnings, earns, earned, strict=True)
    ]
    if await store.insert_purchases(book.conn, rows) != len(rows):
        raise errors.ConcurrentWrite("a purchase id of this batch was posted concurrently for another member")
    _announce(book, new, members, earns, earned)
    return {p.position: row.response for p, row in zip(new, rows, strict=True)}


def _announce(book: Book, new: list[_New], members: dict[str, Member], earns: list[Earn], earned: list[Earned]) -> None:
    """purchase.recorded and points.earned for each new posting, with the member's balance after
    each earn (carried through the member's postings in the batch, in their order)."""
    balances = {m.uid: events.Balance(available=m.available, pending=m.pending, held=m.held) for m in members.values()}
    for posting, earn, lot in zip(new, earns, earned, strict=True):
        purchase = posting.purchase
        member = members[purchase.member_id]
        recorded = events.PurchaseRecorded(
            partner=purchase.partner,
            purchase_id=purchase.purchase_id,
            currency=purchase.currency,
            occurred_at=purchase.occurred_at,
            points=earn.points,
        )
        book.announce(member, "purchase.recorded", recorded)
        if lot.lot_id is None or lot.transfer_id is None:
            continue
        before = balances[member.uid]
        after = msgspec.structs.replace(
            before,
            available=before.available + (earn.points if earn.state == "available" else 0),
            pending=before.pending + (earn.points if earn.state == "pending" else 0),
        )
        balances[member.uid] = after
        points = events.PointsEarned(
            points=earn.points,
            state="pending" if earn.state == "pending" else "available",
            cause_type=earn.cause_type,
            cause_ref=earn.cause_ref,
            lot_id=lot.lot_id,
            transfer_id=lot.transfer_id,
            vests_at=earn.vests_at,
            expires_at=earn.expires_at,
            balance=after,
        )
        book.announce(member, "points.earned", points)


def _earn(
    services: Services, purchase: PurchaseIn, standing: TierStanding, now: datetime, tiered: bool
) -> tuple[EarningResult, TierStanding]:
    """What a purchase earns at its member's tier, and the member's tier after it (carried from
    one of the member's purchases in the batch to the next, as if written one after another)."""
    program = services.program
    multiplier, tier_name = tier_rules.tier_multiplier(program, standing.tier)
    earning = rules.compute_earning(program, purchase, tier_multiplier=multiplier, tier_name=tier_name)
    if not tiered:
        return earning, standing
    qualifying = standing.qualifying_points + earning.points
    after = tier_rules.evaluate_tier(program.tiers, qualifying, standing.tier, standing.below_since, now)
    return earning, standing._replace(tier=after.tier, below_since=after.below_since, qualifying_points=qualifying)


def _earn_row(
    services: Services, purchase: PurchaseIn, member: Member, earning: EarningResult, issued_by: int, now: datetime
) -> Earn:
    """The earn of a purchase, from the partner's issued account (``issued_by``, its id)."""
    vests_at = purchase.occurred_at + timedelta(days=services.program.points.return_window_days)
    return Earn(
        member_uid=member.uid,
        points=earning.points,
        state="pending" if vests_at > now else "available",
        vests_at=vests_at,
        expires_at=expiry_for(now, services.program.points),
        source_account_id=issued_by,
        cause_type="purchase",
        cause_ref=f"{purchase.partner}/{purchase.purchase_id}",
        reason="points for purchase",
    )


def _purchase_row(
    posting: _New, member: Member, earning: EarningResult, earn: Earn, lot_id: int | None, transfer_id: int | None
) -> store.PurchaseRow:
    purchase = posting.purchase
    has_points = earning.points > 0
    response = PurchaseOut(
        purchase_id=purchase.purchase_id,
        partner=purchase.partner,
        member_id=purchase.member_id,
        currency=purchase.currency,
        points=earning.points,
        status=earn.state if has_points else "none",  # type: ignore[arg-type]
        vests_at=earn.vests_at if has_points else None,
        expires_at=earn.expires_at if has_points else None,
        lines=earning.lines,
        bonus_points=earning.bonus_points,
        bonuses=earning.bonuses,
        points_before_cap=earning.points_before_cap,
        cap_applied=earning.cap_applied,
        rules=earning.rules,
        lot_id=lot_id,
        transfer_id=transfer_id,
    )
    return store.PurchaseRow(
        partner=purchase.partner,
        purchase_id=purchase.purchase_id,
        member_uid=member.uid,
        currency=purchase.currency,
        occurred_at=purchase.occurred_at,
        total_amount=sum(line.amount for line in purchase.lines) + purchase.shipping + purchase.tax,
        points=earning.points,
        refund_state=_encode(rules.refund_state_for(purchase, earning)).decode(),
        lot_id=lot_id,
        transfer_id=transfer_id,
        request_hash=posting.digest,
        response=_encode(response),
    )
