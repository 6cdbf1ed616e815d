"""The ledger through the API against a model of it: hypothesis drives random purchases, refunds,
redemptions (at once and held; captured, released, cancelled), adjustments, kudos and their
retractions, and time moving on (pending points vest, holds time out, lots expire), against a small in-test model of
each member's lots, debt, held points, lifetime earnings and reputation. After every step the
members' balances equal the model's; after every example ``konvert audit``'s checks pass.

The machine runs in a thread (hypothesis's stateful tests are synchronous) and talks to a server
of its own over HTTP; the jobs and the audit run on the tests' event loop, where the app lives.
Examples and steps come from the ``KONVERT_HYPOTHESIS_PROFILE`` profile (``ci``: few, and
derandomized; ``dev``: more).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import uuid
from collections.abc import AsyncIterator, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from konvert import auth, jobs
from konvert.app import create_app
from konvert.composition import AUDIT_CHECKS
from konvert.ledger.audit import run_audit
from konvert.program import Program
from konvert.services import Services
from tests.conftest import AppClient, make_settings, serve

T = TypeVar("T")

settings.register_profile(
    "ci", max_examples=20, stateful_step_count=20, derandomize=True, deadline=None, print_blob=True
)
settings.register_profile("dev", max_examples=200, stateful_step_count=40, deadline=None)
PROFILE = settings.get_profile(os.environ.get("KONVERT_HYPOTHESIS_PROFILE", "ci"))

EXPIRE_AFTER_DAYS = 365  # the tests' program
RETURN_WINDOW_DAYS = 14
DAILY_CAP = 200  # reputation from likes and helpful marks per member and UTC day (the default)
KUDOS_VALUE = 10  # a like or a helpful mark (the default)
MEMBERS = 2


@dataclasses.dataclass(eq=False)
class Lot:
    remaining: int
    # The model day (days the clock was moved on) it expires on.
    expires_day: int
    # Inside the return window until this model day (None: available from the start).
    vests_day: int | None = None
    expired: bool = False
    # What it held when it expired: a later refund of its purchase has lost that much already.
    expired_points: int = 0


@dataclasses.dataclass
class Member:
    id: str
    lots: list[Lot] = dataclasses.field(default_factory=list)  # made in order: soonest expiring first
    debt: int = 0
    held: int = 0
    lifetime_earned: int = 0
    # Standing likes and helpful marks by kudos id: (UTC date of occurred_at, value).
    kudos: dict[str, tuple[str, int]] = dataclasses.field(default_factory=dict)

    @property
    def available(self) -> int:
        return sum(lot.remaining for lot in self.lots if not lot.expired and lot.vests_day is None) - self.debt

    @property
    def pending(self) -> int:
        return sum(lot.remaining for lot in self.lots if not lot.expired and lot.vests_day is not None)

    @property
    def reputation(self) -> int:
        by_day: dict[str, int] = {}
        for day, value in self.kudos.values():
            by_day[day] = by_day.get(day, 0) + value
        return sum(min(DAILY_CAP, total) for total in by_day.values())

    def take(self, points: int, exclude: Lot | None = None) -> tuple[list[tuple[Lot, int]], int]:
        """Up to ``points`` from the live lots, soonest expiring first: the takes, and what is missing."""
        takes, missing = [], points
        for lot in self.lots:
            if missing == 0:
                break
            if lot is exclude or lot.expired or lot.vests_day is not None or lot.remaining == 0:
                continue
            amount = min(missing, lot.remaining)
            lot.remaining -= amount
            takes.append((lot, amount))
            missing -= amount
        return takes, missing

    def repay_debt(self) -> None:
        _, missing = self.take(self.debt)
        self.debt = missing

    def credit(self, points: int, day: int, vests_day: int | None = None) -> Lot:
        lot = Lot(points, day + EXPIRE_AFTER_DAYS, vests_day)
        self.lots.append(lot)
        if vests_day is None:  # pending points repay no debt until they vest
            self.repay_debt()
        return lot

    def give_back(self, takes: list[tuple[Lot, int]]) -> None:
        """Points back to the lots they came from; those of expired lots expire instead."""
        for lot, amount in takes:
            if not lot.expired:
                lot.remaining += amount
        self.repay_debt()


@dataclasses.dataclass
class Purchase:
    member: Member
    lot: Lot
    points_per_unit: int
    units_left: int
    expiry_refunded: int = 0


@dataclasses.dataclass
class Redemption:
    member: Member
    points: int
    takes: list[tuple[Lot, int]]
    status: str


@dataclasses.dataclass
class World:
    """What the machine drives: a served app on the tests' loop, and its clock."""

    base_url: str
    headers: dict[str, str]
    loop: asyncio.AbstractEventLoop
    services: Services
    database_url: str

    def on_loop(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=60)

    def move_clock(self, days: int) -> None:
        real = self.services.clock
        self.services.clock = lambda: real() + timedelta(days=days)

    async def audit(self) -> list[str]:
        conn = await asyncpg.connect(self.database_url)
        try:
            return [f"{v.invariant}: {v.detail}" for v in await run_audit(conn, AUDIT_CHECKS)]
        finally:
            await conn.close()


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class LedgerMachine(RuleBasedStateMachine):
    world: World  # set by the test

    def __init__(self) -> None:
        super().__init__()
        self.http = httpx.Client(base_url=self.world.base_url, headers=self.world.headers, timeout=30)
        self.members = [Member(_id(f"lm{n}")) for n in range(MEMBERS)]
        self.purchases: dict[str, Purchase] = {}
        self.redemptions: dict[str, Redemption] = {}
        self.day = 0  # how many days the clock has been moved on in this example
        self.real_clock = self.world.services.clock

    def teardown(self) -> None:
        self.http.close()
        self.world.services.clock = self.real_clock
        violations = self.world.on_loop(self.world.audit())
        assert violations == []

    def now(self) -> datetime:
        return self.world.services.clock().astimezone(UTC)

    def post(self, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        return self.http.post(path, json=body) if body is not None else self.http.post(path)

    def expect(self, response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
        assert response.status_code == status, response.text
        body: dict[str, Any] = response.json()
        if code is not None:
            assert body["code"] == code, body
        return body

    # --- points in --------------------------------------------------------------------------

    @initialize()
    def first_purchases(self) -> None:
        for member in self.members:  # every member exists from the start
            self.purchase(member, units=1, euros=10, pending=False)

    @rule(n=st.integers(0, MEMBERS - 1), units=st.integers(1, 5), euros=st.integers(1, 60), pending=st.booleans())
    def purchase_something(self, n: int, units: int, euros: int, pending: bool) -> None:
        self.purchase(self.members[n], units, euros, pending)

    def purchase(self, member: Member, units: int, euros: int, pending: bool) -> None:
        purchase_id = _id("p")
        # A minute ago: pending for the return window; a month ago: available at once.
        occurred_at = self.now() - (timedelta(minutes=1) if pending else timedelta(days=30))
        line = {"line_id": "1", "sku": "S", "category": "toys", "quantity": units, "unit_price": euros * 100}
        body = {
            "purchase_id": purchase_id,
            "member_id": member.id,
            "partner": "webshop",
            "currency": "EUR",
            "occurred_at": occurred_at.isoformat(),
            "lines": [line],
        }
        self.expect(self.post("/v1/purchases", body), 201)
        points = units * euros
        member.lifetime_earned += points
        lot = member.credit(points, self.day, self.day + RETURN_WINDOW_DAYS if pending else None)
        self.purchases[purchase_id] = Purchase(member, lot, euros, units)

    @rule(n=st.integers(0, MEMBERS - 1), points=st.integers(-150, 150).filter(bool))
    def adjust(self, n: int, points: int) -> None:
        member = self.members[n]
        body = {"adjustment_id": _id("a"), "points": points, "reason_code": "goodwill" if points > 0 else "correction"}
        response = self.post(f"/v1/members/{member.id}/adjustments", body)
        if points > 0:
            self.expect(response, 201)
            member.credit(points, self.day)
        elif -points > member.available:
            self.expect(response, 409, "insufficient_points")
        else:
            self.expect(response, 201)
            member.take(-points)

    # --- refunds ----------------------------------------------------------------------------

    @precondition(lambda self: any(p.units_left for p in self.purchases.values()))
    @rule(pick=st.integers(0, 10_000), units=st.integers(1, 5))
    def refund(self, pick: int, units: int) -> None:
        refundable = [(pid, p) for pid, p in self.purchases.items() if p.units_left]
        purchase_id, purchase = refundable[pick % len(refundable)]
        units = min(units, purchase.units_left)
        body = {"refund_id": _id("r"), "lines": [{"line_id": "1", "quantity": units}]}
        self.expect(self.post(f"/v1/purchases/{purchase_id}/refunds", body), 201)
        purchase.units_left -= units
        points = units * purchase.points_per_unit
        # What the purchase's lot lost to expiry was taken from the member once already.
        already_expired = min(points, purchase.lot.expired_points - purchase.expiry_refunded)
        purchase.expiry_refunded += already_expired
        clawed = points - already_expired
        member = purchase.member
        own = 0 if purchase.lot.expired else min(clawed, purchase.lot.remaining)
        purchase.lot.remaining -= own
        _, missing = member.take(clawed - own, exclude=purchase.lot)
        member.debt += missing  # the tests' program allows negative balances
        member.lifetime_earned -= clawed

    # --- redemptions ------------------------------------------------------------------------

    @rule(n=st.integers(0, MEMBERS - 1), points=st.integers(1, 200), hold=st.booleans())
    def redeem(self, n: int, points: int, hold: bool) -> None:
        member = self.members[n]
        redemption_id = _id("x")
        body = {"redemption_id": redemption_id, "points": points, "hold": hold}
        response = self.post(f"/v1/members/{member.id}/redemptions", body)
        if points > member.available:
            self.expect(response, 409, "insufficient_points")
            return
        status = self.expect(response, 201)["status"]
        assert status == ("held" if hold else "captured")
        takes, missing = member.take(points)
        assert missing == 0
        member.held += points if hold else 0
        self.redemptions[redemption_id] = Redemption(member, points, takes, status)

    def _pick_redemption(self, pick: int) -> tuple[str, Redemption]:
        ids = sorted(self.redemptions)
        return ids[pick % len(ids)], self.redemptions[ids[pick % len(ids)]]

    @precondition(lambda self: self.redemptions)
    @rule(pick=st.integers(0, 10_000), action=st.sampled_from(["capture", "release", "cancel"]))
    def settle_redemption(self, pick: int, action: str) -> None:
        redemption_id, redemption = self._pick_redemption(pick)
        response = self.post(f"/v1/redemptions/{redemption_id}/{action}")
        done = {"capture": "captured", "release": "released", "cancel": "cancelled"}[action]
        allowed_from = {"capture": "held", "release": "held", "cancel": "captured"}[action]
        # Settling again answers what it was settled as (a timed-out hold counts as released).
        again = {"capture": {"captured"}, "release": {"released", "expired"}, "cancel": {"cancelled"}}[action]
        if redemption.status in again:
            assert self.expect(response, 200)["status"] == redemption.status
            return
        if redemption.status != allowed_from:
            self.expect(response, 409, "conflict" if action == "cancel" else "hold_not_active")
            return
        assert self.expect(response, 200)["status"] == done
        member = redemption.member
        if action == "capture":
            member.held -= redemption.points
        else:
            member.held -= redemption.points if action == "release" else 0
            member.give_back(redemption.takes)
        redemption.status = done

    # --- reputation -------------------------------------------------------------------------

    @rule(author=st.integers(0, MEMBERS - 1), kind=st.sampled_from(["like", "helpful"]))
    def kudos(self, author: int, kind: str) -> None:
        member, giver = self.members[author], self.members[(author + 1) % MEMBERS]
        kudos_id, occurred_at = _id("k"), self.now() - timedelta(minutes=1)
        body = {
            "kudos_id": kudos_id,
            "source": "forum",
            "post_id": _id("post"),
            "thread_id": _id("t"),
            "author_id": member.id,
            "giver_id": giver.id,
            "kind": kind,
            "occurred_at": occurred_at.isoformat(),
        }
        self.expect(self.post("/v1/kudos", body), 201)
        member.kudos[kudos_id] = (occurred_at.date().isoformat(), KUDOS_VALUE)

    @precondition(lambda self: any(m.kudos for m in self.members))
    @rule(pick=st.integers(0, 10_000))
    def retract_kudos(self, pick: int) -> None:
        standing = sorted((kudos_id, m) for m in self.members for kudos_id in m.kudos)
        kudos_id, member = standing[pick % len(standing)]
        self.expect(self.http.delete(f"/v1/kudos/{kudos_id}"), 200)
        del member.kudos[kudos_id]

    # --- time -------------------------------------------------------------------------------

    @rule(days=st.sampled_from([1, 13, 14, 30, 200, 364, 365, 400]))
    def time_passes(self, days: int) -> None:
        """The clock moves on and the jobs run, in their order: pending lots vest, every hold
        times out, lots reach their expiry."""
        self.day += days
        self.world.move_clock(days)
        self.world.on_loop(jobs.run_once(self.world.services))
        for member in self.members:
            for lot in member.lots:
                if lot.vests_day is not None and lot.vests_day <= self.day and not lot.expired:
                    lot.vests_day = None
            member.repay_debt()
        for redemption in self.redemptions.values():
            if redemption.status == "held":
                redemption.member.held -= redemption.points
                redemption.member.give_back(redemption.takes)
                redemption.status = "expired"
        for member in self.members:
            for lot in member.lots:
                if not lot.expired and lot.expires_day <= self.day:
                    lot.expired, lot.expired_points, lot.remaining = True, lot.remaining, 0

    # --- after every step -------------------------------------------------------------------

    @invariant()
    def balances_agree(self) -> None:
        for member in self.members:
            response = self.http.get(f"/v1/members/{member.id}/balance", params={"expiring_within_days": 3650})
            if response.status_code == 404:  # before its first purchase
                continue
            balance = self.expect(response, 200)
            model = {
                "available": member.available,
                "pending": member.pending,
                "held": member.held,
                "lifetime_earned": member.lifetime_earned,
                "reputation": member.reputation,
                # Pending points expire too.
                "expiring": sum(lot.remaining for lot in member.lots if not lot.expired),
            }
            seen = {name: balance[name] for name in model if name != "expiring"}
            seen["expiring"] = sum(e["points"] for e in balance["expiring"])
            assert seen == model, member.id


@pytest.fixture
async def world(fresh_database_url: str, redis_url: str, program: Program) -> AsyncIterator[World]:
    conn = await asyncpg.connect(fresh_database_url)
    try:
        key = (await auth.insert_key(conn, "model", ["admin"]))[0]
    finally:
        await conn.close()
    async with serve(create_app(make_settings(fresh_database_url, redis_url), program)) as client:
        yield _world(client, key, fresh_database_url)


def _world(client: AppClient, key: str, database_url: str) -> World:
    return World(
        base_url=str(client.base_url),
        headers={"Authorization": f"Bearer {key}"},
        loop=asyncio.get_running_loop(),
        services=client.app.state.services,
        database_url=database_url,
    )


async def test_the_ledger_through_the_api_agrees_with_a_model_of_it(world: World) -> None:
    machine = type("Ledger", (LedgerMachine,), {"world": world})
    run_settings = settings(PROFILE, suppress_health_check=[HealthCheck.too_slow])
    await asyncio.to_thread(run_state_machine_as_test, machine, settings=run_settings)
