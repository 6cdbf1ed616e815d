"""Kudos, retractions, the daily cap, accepted answers, ranks and leaderboards, against real
PostgreSQL and Redis.

The shared app runs the test program's default reputation rules: like and helpful 10,
accepted answer 15 (+2 to the accepter), daily cap 200, 50 kudos per giver per day, floor 0,
no points bridge. Tests that need other rules start an app of their own (``app_with``).
Leaderboard tests use a source of their own, so their boards hold only their members.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import asyncpg
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st
from litestar.testing import AsyncTestClient

from konvert import auth
from konvert.app import create_app
from konvert.ledger.audit import run_audit
from konvert.ledger.service import spend_points
from konvert.program import Program
from konvert.reputation import leaderboard, rules
from konvert.services import Services
from tests.conftest import make_settings

NOW = datetime.now(UTC)
# Every kudos of a test happens on one UTC day in the past, so the day cannot change mid-test.
DAY = (NOW - timedelta(days=3)).replace(hour=0, minute=0, second=0, microsecond=0)


def at(minute: int, day: datetime = DAY) -> str:
    return (day + timedelta(minutes=minute)).isoformat()


def kudos(
    author: str,
    giver: str,
    kind: str = "like",
    *,
    post: str | None = None,
    thread: str | None = None,
    occurred_at: str | None = None,
    source: str = "forum",
    kudos_id: str | None = None,
) -> dict[str, Any]:
    return {
        "kudos_id": kudos_id or f"k-{uuid.uuid4().hex[:12]}",
        "source": source,
        "post_id": post or f"post-of-{author}",
        "thread_id": thread or f"thread-{uuid.uuid4().hex[:12]}",
        "author_id": author,
        "giver_id": giver,
        "kind": kind,
        "occurred_at": occurred_at or at(0),
    }


class Api:
    """The app's client with an admin key, and the database behind it."""

    def __init__(self, client: AsyncTestClient, headers: dict[str, str], database_url: str) -> None:
        self.client = client
        self.headers = headers
        self.database_url = database_url

    async def give(self, body: dict[str, Any], expect: int | None = 201):
        response = await self.client.post("/v1/kudos", json=body, headers=self.headers)
        if expect is not None:
            assert response.status_code == expect, response.text
        return response

    async def retract(self, kudos_id: str, expect: int | None = 200):
        response = await self.client.delete(f"/v1/kudos/{kudos_id}", headers=self.headers)
        if expect is not None:
            assert response.status_code == expect, response.text
        return response

    async def retract_by_key(self, body: dict[str, Any], expect: int | None = 200):
        key = {k: body[k] for k in ("source", "post_id", "giver_id", "kind")}
        response = await self.client.post("/v1/kudos/retractions", json=key, headers=self.headers)
        if expect is not None:
            assert response.status_code == expect, response.text
        return response

    async def reputation(self, member: str) -> dict[str, Any]:
        response = await self.client.get(f"/v1/members/{member}/reputation", headers=self.headers)
        assert response.status_code == 200, response.text
        return response.json()

    async def balance(self, member: str) -> dict[str, Any]:
        response = await self.client.get(f"/v1/members/{member}/balance", headers=self.headers)
        assert response.status_code == 200, response.text
        return response.json()

    async def board(self, **params: Any) -> dict[str, Any]:
        response = await self.client.get("/v1/leaderboards/reputation", params=params, headers=self.headers)
        assert response.status_code == 200, response.text
        return response.json()

    async def position(self, member: str, **params: Any) -> dict[str, Any]:
        response = await self.client.get(
            f"/v1/leaderboards/reputation/members/{member}", params=params, headers=self.headers
        )
        assert response.status_code == 200, response.text
        return response.json()

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.database_url)
        try:
            return await conn.fetch(query, *args)
        finally:
            await conn.close()

    async def transfers_of(self, member: str) -> list[asyncpg.Record]:
        return await self.fetch(
            """
            select t.transfer_id, t.code, t.asset, t.amount, t.cause_ref, t.reverses_transfer_id
            from transfers t join members m using (member_uid) where m.member_id = $1 order by t.transfer_id
            """,
            member,
        )

    async def credits(self, kudos_ids: list[str]) -> dict[str, int]:
        rows = await self.fetch(
            "select kudos_id, author_credited from kudos where kudos_id = any($1::text[])", kudos_ids
        )
        return {r["kudos_id"]: r["author_credited"] for r in rows}


@pytest.fixture
def api(client, admin_headers, database_url) -> Api:
    return Api(client, admin_headers, database_url)


def program_with(program: Program, **reputation: Any) -> Program:
    return msgspec.structs.replace(program, reputation=msgspec.structs.replace(program.reputation, **reputation))


@pytest.fixture
def app_with(settings, program, admin_headers, database_url) -> Callable[..., contextlib.AbstractAsyncContextManager[Api]]:
    """An app of its own with other reputation rules, on the run's database."""

    @contextlib.asynccontextmanager
    async def start(**reputation: Any) -> AsyncIterator[Api]:
        async with AsyncTestClient(create_app(settings, program_with(program, **reputation))) as client:
            yield Api(client, admin_headers, database_url)

    return start


# --- giving ---------------------------------------------------------------------------------


async def test_a_like_credits_its_author(api, new_id):
    author, giver = new_id("author"), new_id("giver")

    response = await api.give(kudos(author, giver))

    body = response.json()
    assert body["status"] == "standing" and body["counted"] is True
    assert body["author_reputation"] == 10
    assert [(c["member_id"], c["role"], c["reason"], c["amount"]) for c in body["changes"]] == [
        (author, "author", "award", 10)
    ]
    assert "idempotent-replayed" not in response.headers
    assert (await api.balance(author))["reputation"] == 10
    assert (await api.balance(giver))["reputation"] == 0
    reputation = await api.reputation(author)
    assert reputation["reputation"] == 10
    assert (reputation["rank"], reputation["next_rank"], reputation["needed_for_next_rank"]) == (
        "Newcomer",
        "Contributor",
        40,
    )
    assert reputation["breakdown"] == [{"source": "forum", "kind": "like", "reputation": 10}]


async def test_helpful_credits_the_helpful_value_and_the_breakdown_splits_kinds_and_sources(api, new_id):
    author = new_id("author")
    await api.give(kudos(author, new_id("g"), "helpful"))
    await api.give(kudos(author, new_id("g"), "like", source="other-forum"))
    await api.give(kudos(author, new_id("g"), "like", post="second-post"))

    reputation = await api.reputation(author)

    assert reputation["reputation"] == 30
    assert reputation["breakdown"] == [
        {"source": "forum", "kind": "helpful", "reputation": 10},
        {"source": "forum", "kind": "like", "reputation": 10},
        {"source": "other-forum", "kind": "like", "reputation": 10},
    ]


async def test_a_self_like_is_refused_and_writes_nothing(api, client, admin_headers, new_id):
    member = new_id("m")
    for kind in ("like", "helpful"):
        response = await api.give(kudos(member, member, kind), expect=422)
        assert response.json()["code"] == "self_kudos"
    assert (await client.get(f"/v1/members/{member}/balance", headers=admin_headers)).status_code == 404


async def test_a_double_like_is_one_award(api, new_id):
    author, giver = new_id("author"), new_id("giver")
    body = kudos(author, giver)
    first = await api.give(body)

    replay = await api.give(body)
    again = await api.give(body | {"kudos_id": new_id("k")}, expect=409)

    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == first.content
    assert again.json()["code"] == "duplicate_kudos"
    assert (await api.reputation(author))["reputation"] == 10
    assert [t["code"] for t in await api.transfers_of(author)] == ["kudos"]


async def test_the_same_kudos_id_with_another_body_is_a_conflict(api, new_id):
    author = new_id("author")
    body = kudos(author, new_id("giver"))
    await api.give(body)

    conflict = await api.give(body | {"kind": "helpful"}, expect=409)

    assert conflict.json()["code"] == "idempotency_conflict"
    assert (await api.reputation(author))["reputation"] == 10


async def test_the_same_instant_with_another_offset_is_a_replay(api, new_id):
    body = kudos(new_id("author"), new_id("giver"))
    await api.give(body)
    shifted = datetime.fromisoformat(body["occurred_at"]).astimezone(timezone(timedelta(hours=5)))

    replay = await api.give(body | {"occurred_at": shifted.isoformat()})

    assert replay.headers["idempotent-replayed"] == "true"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"kind": "dislike"}, "kind"),
        ({"source": "bad:source"}, "source"),
        ({"occurred_at": "2026-01-01T10:00:00"}, "occurred_at"),
        ({"extra": 1}, "extra"),
        ({"kudos_id": ""}, "kudos_id"),
    ],
)
async def test_invalid_kudos_are_refused_naming_the_field(api, new_id, change, field):
    response = await api.give(kudos(new_id("a"), new_id("g")) | change, expect=422)

    assert response.json()["code"] == "validation_failed"
    assert field in {e["field"] for e in response.json()["errors"]}


async def test_a_kudos_from_the_future_is_refused(api, new_id):
    future = (NOW + timedelta(days=1)).isoformat()
    response = await api.give(kudos(new_id("a"), new_id("g"), occurred_at=future), expect=422)
    assert response.json()["errors"][0]["field"] == "occurred_at"


async def test_a_kudos_needs_the_kudos_write_scope(client, make_key, new_id):
    headers = {"Authorization": f"Bearer {await make_key('members:read')}"}
    response = await client.post("/v1/kudos", json=kudos(new_id("a"), new_id("g")), headers=headers)
    assert response.status_code == 403


# --- retracting -----------------------------------------------------------------------------


async def test_a_retraction_restores_the_exact_previous_reputation(api, new_id):
    author = new_id("author")
    await api.give(kudos(author, new_id("g"), "helpful"))
    await api.give(kudos(author, new_id("g"), "accepted_answer"))
    before = await api.reputation(author)
    like = kudos(author, new_id("g"))
    given = (await api.give(like)).json()

    retracted = await api.retract(like["kudos_id"])

    assert (await api.reputation(author)) == before
    body = retracted.json()
    assert body["status"] == "retracted" and body["author_reputation"] == 0
    assert [(c["reason"], c["amount"], c["reputation_delta"]) for c in body["changes"]] == [("retraction", -10, -10)]
    transfers = await api.transfers_of(author)
    assert transfers[-1]["code"] == "retract" and transfers[-1]["amount"] == 10
    assert transfers[-1]["reverses_transfer_id"] == given["changes"][0]["transfer_id"]
    assert transfers[-1]["cause_ref"] == like["kudos_id"]


async def test_retracting_twice_replays_the_first_retraction(api, new_id):
    author = new_id("author")
    like = kudos(author, new_id("g"))
    await api.give(like)
    first = await api.retract(like["kudos_id"])

    again = await api.retract(like["kudos_id"])
    by_key = await api.retract_by_key(like)

    assert again.headers["idempotent-replayed"] == "true" and by_key.headers["idempotent-replayed"] == "true"
    assert again.content == first.content == by_key.content
    assert (await api.reputation(author))["reputation"] == 0
    assert [t["code"] for t in await api.transfers_of(author)] == ["kudos", "retract"]


async def test_a_kudos_can_be_retracted_by_source_post_giver_and_kind(api, new_id):
    author = new_id("author")
    like = kudos(author, new_id("g"))
    await api.give(like)
    await api.give(kudos(author, like["giver_id"], "helpful", post=like["post_id"]))

    response = await api.retract_by_key(like)

    assert response.json()["kudos_id"] == like["kudos_id"]
    assert (await api.reputation(author))["breakdown"] == [{"source": "forum", "kind": "helpful", "reputation": 10}]


async def test_retracting_an_unknown_kudos_is_404(api, new_id):
    assert (await api.retract(new_id("k"), expect=404)).json()["code"] == "kudos_not_found"
    missing = kudos(new_id("a"), new_id("g"))
    assert (await api.retract_by_key(missing, expect=404)).json()["code"] == "kudos_not_found"


async def test_a_like_given_again_after_a_retraction_counts_again(api, new_id):
    author = new_id("author")
    like = kudos(author, new_id("g"))
    await api.give(like)
    await api.retract(like["kudos_id"])

    await api.give(like | {"kudos_id": new_id("k")})

    assert (await api.reputation(author))["reputation"] == 10


async def test_the_activity_explains_kudos_and_their_retraction(api, client, admin_headers, new_id):
    author = new_id("author")
    like = kudos(author, new_id("g"))
    await api.give(like)
    await api.retract(like["kudos_id"])

    items = (await client.get(f"/v1/members/{author}/activity", headers=admin_headers)).json()["items"]

    assert [(i["code"], i["asset"], i["delta"], i["cause"]) for i in items] == [
        ("retract", "reputation", -10, {"type": "kudos", "ref": like["kudos_id"]}),
        ("kudos", "reputation", 10, {"type": "kudos", "ref": like["kudos_id"]}),
    ]
    assert items[0]["reverses_transfer_id"] == items[1]["transfer_id"]


# --- the daily cap --------------------------------------------------------------------------


async def give_likes(api: Api, author: str, minutes: range, **extra: Any) -> list[dict[str, Any]]:
    """One like per minute, each from another giver; return the bodies."""
    bodies = [kudos(author, f"{author}-g{minute}", occurred_at=at(minute), **extra) for minute in minutes]
    for body in bodies:
        await api.give(body)
    return bodies


async def test_the_daily_cap_limits_likes_but_not_accepted_answers(api, new_id):
    author = new_id("author")
    likes = await give_likes(api, author, range(21))
    over = (await api.give(kudos(author, new_id("g"), occurred_at=at(30)))).json()

    assert over["author_reputation"] == 0 and over["counted"] is True and over["changes"] == []
    assert (await api.reputation(author))["reputation"] == 200
    credits = await api.credits([b["kudos_id"] for b in likes])
    assert [credits[b["kudos_id"]] for b in likes] == [10] * 20 + [0]

    await api.give(kudos(author, new_id("g"), "accepted_answer", occurred_at=at(40)))
    assert (await api.reputation(author))["reputation"] == 215


async def test_the_cap_is_per_utc_day(api, new_id):
    author = new_id("author")
    await give_likes(api, author, range(20))
    await api.give(kudos(author, new_id("g"), occurred_at=at(0, DAY + timedelta(days=1))))
    assert (await api.reputation(author))["reputation"] == 210


async def test_retracting_a_credited_like_gives_its_room_to_the_first_like_over_the_cap(api, new_id):
    author = new_id("author")
    likes = await give_likes(api, author, range(22))

    retracted = (await api.retract(likes[3]["kudos_id"])).json()

    assert [(c["kudos_id"], c["reason"], c["amount"]) for c in retracted["changes"]] == [
        (likes[20]["kudos_id"], "cap_freed", 10),
        (likes[3]["kudos_id"], "retraction", -10),
    ]
    assert (await api.reputation(author))["reputation"] == 200
    credits = await api.credits([b["kudos_id"] for b in likes])
    assert (credits[likes[3]["kudos_id"]], credits[likes[20]["kudos_id"]], credits[likes[21]["kudos_id"]]) == (0, 10, 0)


async def test_a_late_like_that_happened_earlier_takes_room_from_the_last_one(api, new_id):
    author = new_id("author")
    likes = await give_likes(api, author, range(10, 30))
    last_award = (await api.transfers_of(author))[-1]

    late = (await api.give(kudos(author, new_id("g"), occurred_at=at(0)))).json()

    assert [(c["kudos_id"], c["reason"], c["amount"]) for c in late["changes"]] == [
        (late["kudos_id"], "award", 10),
        (likes[-1]["kudos_id"], "cap_taken", -10),
    ]
    assert (await api.reputation(author))["reputation"] == 200
    taken = (await api.transfers_of(author))[-1]
    assert (taken["code"], taken["cause_ref"], taken["reverses_transfer_id"]) == (
        "retract",
        likes[-1]["kudos_id"],
        last_award["transfer_id"],
    )


async def test_the_reputation_shows_todays_capped_total(api, new_id):
    author = new_id("author")
    today = datetime.now(UTC)
    for _ in range(21):
        await api.give(kudos(author, new_id("g"), occurred_at=today.isoformat(), post=new_id("p")))

    reputation = await api.reputation(author)

    assert (reputation["today_before_cap"], reputation["today_capped"], reputation["daily_cap"]) == (210, 200, 200)


@pytest.fixture(scope="module")
async def capped_api(settings, program, admin_headers, database_url) -> AsyncIterator[Api]:
    """Like 10, helpful 7, cap 25: kudos often fill the cap only partly."""
    rules_ = program_with(program, daily_cap=25)
    rules_ = msgspec.structs.replace(
        rules_,
        reputation=msgspec.structs.replace(
            rules_.reputation, kudos=msgspec.structs.replace(rules_.reputation.kudos, like=10, helpful=7)
        ),
    )
    async with AsyncTestClient(create_app(settings, rules_)) as client:
        yield Api(client, admin_headers, database_url)


# (kind, minute of the day, retracted at the end): minutes repeat, so kudos_id breaks ties too.
KUDOS_SETS = st.lists(
    st.tuples(st.sampled_from(["like", "helpful"]), st.integers(0, 4), st.booleans()), min_size=1, max_size=6
)


async def play(api: Api, kudos_set: list[tuple[str, int, bool]], events: list[tuple[str, int]]) -> tuple[int, list[int]]:
    """Send the kudos and retractions in the order of ``events`` (a retraction that comes before
    its kudos waits for it; a second "give" is a webhook replayed); return the author's
    reputation and each kudos' credit."""
    prefix = uuid.uuid4().hex[:10]
    author = f"cap-{prefix}"
    bodies = [
        kudos(author, f"{prefix}-g{i}", kind, occurred_at=at(minute), kudos_id=f"{prefix}-{i:02d}")
        for i, (kind, minute, _) in enumerate(kudos_set)
    ]
    given: set[int] = set()
    waiting: set[int] = set()
    for action, i in events:
        if action == "give":
            response = await api.give(bodies[i], expect=None)
            assert response.status_code == 201, response.text
            given.add(i)
            if i in waiting:
                waiting.discard(i)
                await api.retract(bodies[i]["kudos_id"])
        elif i in given:
            await api.retract(bodies[i]["kudos_id"])
        else:
            waiting.add(i)
    reputation = (await api.reputation(author))["reputation"]
    credits = await api.credits([b["kudos_id"] for b in bodies])
    return reputation, [credits[b["kudos_id"]] for b in bodies]


@hypothesis_settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kudos_set=KUDOS_SETS, data=st.data())
async def test_the_daily_cap_depends_only_on_the_kudos_that_stand_not_on_arrival_order(capped_api, kudos_set, data):
    events = [("give", i) for i in range(len(kudos_set))]
    events += [("retract", i) for i, (_, _, retracted) in enumerate(kudos_set) if retracted]
    events += data.draw(st.lists(st.sampled_from(events[: len(kudos_set)]), max_size=3), label="replays")
    orders = [data.draw(st.permutations(events), label=f"order {n}") for n in range(3)]

    outcomes = [await play(capped_api, kudos_set, order) for order in orders]

    # What the cap rule says for the kudos left standing, in canonical order (minute, then id).
    worth = {"like": 10, "helpful": 7}
    standing = sorted((minute, i) for i, (_, minute, retracted) in enumerate(kudos_set) if not retracted)
    shares = rules.allocate_daily_cap([worth[kudos_set[i][0]] for _, i in standing], 25)
    expected = [0] * len(kudos_set)
    for (_, i), share in zip(standing, shares, strict=True):
        expected[i] = share
    assert outcomes == [(sum(expected), expected)] * len(orders)
