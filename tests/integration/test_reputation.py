"""Kudos, retractions, the daily cap, accepted answers, ranks and leaderboards, against real
PostgreSQL and Redis.

The shared app runs the test program's default reputation rules: like and helpful 10,
accepted answer 15 (+2 to the accepter), daily cap 200, 50 kudos per giver per day, floor 0,
no points bridge. Tests that need other rules start an app of their own (``app_with``).
Leaderboard tests use a source of their own, so their boards hold only their members.
Concurrency tests call the use cases directly, since the test client serves one request at a
time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import asyncpg
import msgspec
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from litestar.testing import AsyncTestClient

from konvert import auth, composition
from konvert.app import create_app
from konvert.idempotency import request_hash
from konvert.ledger.audit import run_audit
from konvert.program import Program
from konvert.reputation import leaderboard, rules, service
from konvert.reputation.model import KudosIn
from konvert.services import Services
from tests.conftest import make_settings, spend_points

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
def app_with(
    settings, program, admin_headers, database_url
) -> Callable[..., contextlib.AbstractAsyncContextManager[Api]]:
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


async def test_a_duplicate_kudos_naming_a_new_author_creates_no_member(api, client, admin_headers, new_id):
    giver = new_id("giver")
    like = kudos(new_id("author"), giver)
    await api.give(like)
    # The forum sends the giver's like of the same post again, under another id and naming
    # another author (the post changed hands): the author would be a new member.
    newcomer = new_id("author")

    refused = await api.give(like | {"kudos_id": new_id("k"), "author_id": newcomer}, expect=409)

    assert refused.json()["code"] == "duplicate_kudos"
    missing = await client.get(f"/v1/members/{newcomer}/balance", headers=admin_headers)
    assert (missing.status_code, missing.json()["code"]) == (404, "member_not_found")
    assert (await api.fetch("select 1 from members where member_id = $1", newcomer)) == []


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
        # An unknown field is named at the object that has it; msgspec's message names the field.
        ({"extra": 1}, "body"),
        ({"kudos_id": ""}, "kudos_id"),
        ({"kudos_id": "forum/1"}, "kudos_id"),
    ],
)
async def test_invalid_kudos_are_refused_naming_the_field(api, new_id, change, field):
    response = await api.give(kudos(new_id("a"), new_id("g")) | change, expect=422)

    assert response.json()["code"] == "validation_failed"
    assert field in {e["field"] for e in response.json()["errors"]}
    if "extra" in change:
        assert any("`extra`" in e["message"] for e in response.json()["errors"] if e["field"] == "body")


async def test_a_kudos_from_the_future_is_refused(api, new_id):
    future = (NOW + timedelta(days=1)).isoformat()
    response = await api.give(kudos(new_id("a"), new_id("g"), occurred_at=future), expect=422)
    assert response.json()["errors"][0]["field"] == "occurred_at"


async def test_now_is_the_service_clock_s_for_kudos_as_for_purchases_and_jobs(api, clock, new_id):
    clock.advance(days=2)
    # In the real clock's future, and in the past (today, also just after midnight) of the
    # service's clock.
    service_now = datetime.now(UTC) + timedelta(days=2)
    midnight = service_now.replace(hour=0, minute=0, second=0, microsecond=0)
    today = max(service_now - timedelta(minutes=10), midnight).isoformat()
    author = new_id("a")

    await api.give(kudos(author, new_id("g"), occurred_at=today))

    assert (await api.reputation(author))["today_before_cap"] == 10
    later = (datetime.now(UTC) + timedelta(days=3)).isoformat()
    response = await api.give(kudos(author, new_id("g"), occurred_at=later), expect=422)
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
    assert (
        credits[likes[3]["kudos_id"]],
        credits[likes[20]["kudos_id"]],
        credits[likes[21]["kudos_id"]],
    ) == (0, 10, 0)


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

    assert (reputation["today_before_cap"], reputation["today_capped"], reputation["daily_cap"]) == (
        210,
        200,
        200,
    )


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


async def play(
    api: Api, kudos_set: list[tuple[str, int, bool]], events: list[tuple[str, int]]
) -> tuple[int, list[int]]:
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


# --- accepted answers -----------------------------------------------------------------------


async def test_an_accepted_answer_credits_its_author_and_the_accepter(api, new_id):
    author, asker = new_id("author"), new_id("asker")

    body = (await api.give(kudos(author, asker, "accepted_answer"))).json()

    assert (body["author_reputation"], body["accepter_reputation"]) == (15, 2)
    assert (await api.reputation(author))["reputation"] == 15
    asker_reputation = await api.reputation(asker)
    assert asker_reputation["reputation"] == 2
    assert asker_reputation["breakdown"] == [{"source": "forum", "kind": "accepter", "reputation": 2}]


async def test_accepting_ones_own_answer_awards_nothing_but_moves_the_accepted_answer(api, new_id):
    asker, helper, thread = new_id("asker"), new_id("helper"), new_id("t")
    await api.give(kudos(helper, asker, "accepted_answer", thread=thread, post="helpers-answer", occurred_at=at(1)))

    own = (
        await api.give(kudos(asker, asker, "accepted_answer", thread=thread, post="own-answer", occurred_at=at(2)))
    ).json()

    assert (own["status"], own["counted"], own["not_counted_reason"]) == ("standing", False, "self_accept")
    assert (await api.reputation(asker))["reputation"] == 0
    assert (await api.reputation(helper))["reputation"] == 0


async def test_accepting_another_answer_moves_the_award(api, new_id):
    asker, first, second, thread = new_id("asker"), new_id("first"), new_id("second"), new_id("t")
    accept_first = kudos(first, asker, "accepted_answer", thread=thread, post="p1", occurred_at=at(1))
    await api.give(accept_first)

    moved = (
        await api.give(kudos(second, asker, "accepted_answer", thread=thread, post="p2", occurred_at=at(2)))
    ).json()

    assert sorted((c["member_id"], c["reason"], c["amount"]) for c in moved["changes"]) == sorted(
        [(first, "superseded", -15), (asker, "superseded", -2), (second, "award", 15), (asker, "award", 2)]
    )
    assert [(await api.reputation(m))["reputation"] for m in (first, second, asker)] == [0, 15, 2]
    status = await api.fetch("select status from kudos where kudos_id = $1", accept_first["kudos_id"])
    assert status[0]["status"] == "superseded"

    # Accepting the first answer again is a new acceptance (a new kudos_id), and moves it back.
    await api.give(accept_first | {"kudos_id": new_id("k"), "occurred_at": at(3)})
    assert [(await api.reputation(m))["reputation"] for m in (first, second, asker)] == [15, 0, 2]


async def test_an_acceptance_arriving_after_a_later_one_does_not_replace_it(api, new_id):
    asker, first, second, thread = new_id("asker"), new_id("first"), new_id("second"), new_id("t")
    await api.give(kudos(second, asker, "accepted_answer", thread=thread, post="p2", occurred_at=at(10)))

    late = (await api.give(kudos(first, asker, "accepted_answer", thread=thread, post="p1", occurred_at=at(5)))).json()

    assert (late["status"], late["counted"], late["changes"]) == ("superseded", False, [])
    assert [(await api.reputation(m))["reputation"] for m in (first, second, asker)] == [0, 15, 2]


async def test_retracting_the_accepted_answer_leaves_the_thread_without_one(api, new_id):
    asker, first, second, thread = new_id("asker"), new_id("first"), new_id("second"), new_id("t")
    superseded = kudos(first, asker, "accepted_answer", thread=thread, post="p1", occurred_at=at(1))
    standing = kudos(second, asker, "accepted_answer", thread=thread, post="p2", occurred_at=at(2))
    await api.give(superseded)
    await api.give(standing)

    await api.retract(standing["kudos_id"])
    gone = (await api.retract(superseded["kudos_id"])).json()

    assert (gone["status"], gone["changes"]) == ("retracted", [])
    assert [(await api.reputation(m))["reputation"] for m in (first, second, asker)] == [0, 0, 0]


# --- givers ---------------------------------------------------------------------------------


async def test_a_giver_may_give_only_so_many_kudos_a_day(app_with, client, admin_headers, new_id):
    giver = new_id("giver")
    async with app_with(giver_daily_limit=3) as api:
        bodies = [kudos(new_id("a"), giver) for _ in range(3)]
        for body in bodies:
            await api.give(body)
        await api.retract(bodies[0]["kudos_id"])  # retracted kudos still count

        refused = await api.give(kudos(author := new_id("a"), giver), expect=429)

        assert refused.json()["code"] == "giver_limit_reached"
        assert "retry-after" not in refused.headers  # a quota of that day's kudos: retrying cannot help
        assert (await client.get(f"/v1/members/{author}/balance", headers=admin_headers)).status_code == 404
        # Replays are not new kudos, and another day has its own limit.
        assert (await api.give(bodies[1])).headers["idempotent-replayed"] == "true"
        await api.give(kudos(new_id("a"), giver, occurred_at=at(0, DAY + timedelta(days=1))))


async def test_a_giver_without_enough_reputation_is_recorded_but_gives_nothing(api, app_with, new_id):
    giver, author = new_id("giver"), new_id("author")
    async with app_with(giver_min_reputation=20) as strict:
        first = (await strict.give(kudos(author, giver))).json()
        assert (first["counted"], first["not_counted_reason"], first["author_reputation"]) == (
            False,
            "giver_without_standing",
            0,
        )
        # The giver earns standing elsewhere; from then on their kudos count.
        await give_likes(api, giver, range(2))
        await strict.give(kudos(author, giver, "helpful"))

    assert (await api.reputation(author))["reputation"] == 10


async def test_a_giver_must_be_known_long_enough_when_the_program_says_so(app_with, new_id):
    giver, author = new_id("giver"), new_id("author")
    async with app_with(giver_min_account_age_days=7) as strict:
        assert (await strict.give(kudos(author, giver))).json()["counted"] is False
        await strict.fetch("update members set created_at = now() - interval '8 days' where member_id = $1", giver)
        assert (await strict.give(kudos(author, giver, "helpful"))).json()["counted"] is True
        assert (await strict.reputation(author))["reputation"] == 10


# --- concurrency: the service on separate connections, really at once ------------------------
#
# The test client hands requests to the app one at a time, so these call the use cases
# directly: each call takes its own pooled connection and commits for real.


@pytest.fixture
def services_with(settings, program) -> Callable[..., contextlib.AbstractAsyncContextManager[Services]]:
    @contextlib.asynccontextmanager
    async def start(**reputation: Any) -> AsyncIterator[Services]:
        opened = await composition.open_services(settings, program_with(program, **reputation))
        try:
            yield opened
        finally:
            await opened.close()

    return start


def kudos_in(body: dict[str, Any]) -> KudosIn:
    return msgspec.convert(body, KudosIn)


async def at_once(*calls: Awaitable[Any]) -> list[Any]:
    """Run the calls concurrently; return each one's result or exception."""
    return await asyncio.gather(*calls, return_exceptions=True)


async def test_many_givers_liking_one_post_at_once_fill_the_cap_exactly(api, services: Services, new_id):
    author = new_id("author")
    bodies = [kudos(author, new_id("g"), occurred_at=at(i), post="popular") for i in range(30)]

    results = await at_once(*(service.give_kudos(services, kudos_in(b)) for b in bodies))

    assert [type(r).__name__ for r in results] == ["Outcome"] * 30
    assert (await api.reputation(author))["reputation"] == 200
    credits = await api.credits([b["kudos_id"] for b in bodies])
    assert [credits[b["kudos_id"]] for b in bodies] == [10] * 20 + [0] * 10


async def test_concurrent_duplicates_award_once(api, services: Services, new_id):
    author, giver = new_id("author"), new_id("giver")
    body = kudos(author, giver)
    others = [body | {"kudos_id": new_id("k")} for _ in range(5)]

    replays = await at_once(*(service.give_kudos(services, kudos_in(body)) for _ in range(10)))
    duplicates = await at_once(*(service.give_kudos(services, kudos_in(other)) for other in others))

    assert sorted(r.replayed for r in replays) == [False] + [True] * 9
    assert {r.body for r in replays} == {replays[0].body}
    assert [type(r).__name__ for r in duplicates] == ["DuplicateKudos"] * 5
    assert (await api.reputation(author))["reputation"] == 10


async def test_a_burst_from_one_giver_stops_exactly_at_the_limit(api, services_with, new_id):
    giver = new_id("giver")
    async with services_with(giver_daily_limit=5) as limited:
        results = await at_once(*(service.give_kudos(limited, kudos_in(kudos(new_id("a"), giver))) for _ in range(20)))

    assert sorted(type(r).__name__ for r in results) == ["GiverLimitReached"] * 15 + ["Outcome"] * 5
    given = await api.fetch(
        "select count(*) from kudos k join members m on m.member_uid = k.giver_uid where m.member_id = $1",
        giver,
    )
    assert given[0]["count"] == 5


def batch_scenario(prefix: str) -> list[dict[str, Any]]:
    """Likes that meet every rule at once (daily cap 25, like 10, giver limit 2): the cap reached
    and a late like taking room, a duplicate, a repeat of a kudos_id with the same and with another
    body, the giver's limit, members new and old. Every id starts with ``prefix``."""
    author, giver, other = f"{prefix}-author", f"{prefix}-giver", f"{prefix}-other"

    def like(n: int, author: str, giver: str, minute: int, post: str, kind: str = "like") -> dict[str, Any]:
        post, thread, kudos_id = f"{prefix}-{post}", f"{prefix}-t{n}", f"{prefix}-k{n}"
        return kudos(author, giver, kind, post=post, thread=thread, occurred_at=at(minute), kudos_id=kudos_id)

    first = like(1, author, giver, 10, "p1")
    return [
        first,
        like(2, author, f"{prefix}-g2", 20, "p1"),
        like(3, author, f"{prefix}-g3", 30, "p1"),  # past the cap
        like(4, author, f"{prefix}-g4", 5, "p1"),  # late, but earlier that day: takes room
        like(5, author, giver, 40, "p1"),  # the giver's second like of the post
        first,  # a repeat: its replay
        first | {"post_id": f"{prefix}-p9"},  # its kudos_id with another body
        like(6, other, giver, 50, "p2", "helpful"),  # the giver's second kudos of the day
        like(7, other, giver, 51, "p3"),  # the third: over the limit
    ]


async def what_a_scenario_left(api: Api, prefix: str, results: list[Any]) -> dict[str, Any]:
    """The outcomes, credits, entries and reputations a scenario left, with its ids made neutral."""

    def neutral(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: neutral(v) for k, v in value.items() if k != "transfer_id"}
        if isinstance(value, list):
            return [neutral(v) for v in value]
        return value.replace(prefix, "P") if isinstance(value, str) else value

    outcomes = [
        (type(r).__name__, r.replayed, neutral(msgspec.json.decode(r.body))) if hasattr(r, "body") else type(r).__name__
        for r in results
    ]
    entries = await api.fetch(
        """
        select m.member_id, k.kudos_id, e.role, e.reason, e.change, e.posted, c.kudos_id as cause
        from reputation_entries e join members m using (member_uid)
        join kudos k on k.kudos_pk = e.kudos_pk join kudos c on c.kudos_pk = e.cause_kudos_pk
        where m.member_id like $1 || '-%' order by m.member_id, e.entry_id
        """,
        prefix,
    )
    reputations = await api.fetch(
        "select member_id, reputation from members where member_id like $1 || '-%' order by member_id", prefix
    )
    return neutral(
        {
            "outcomes": outcomes,
            "entries": [dict(e) for e in entries],
            "reputations": [dict(r) for r in reputations],
        }
    )


async def test_likes_written_in_one_batch_are_what_writing_them_one_by_one_is(api, services_with, new_id):
    together, alone = new_id("together"), new_id("alone")
    async with services_with(daily_cap=25, giver_daily_limit=2) as limited:
        for prefix in (together, alone):  # the giver is a member already, the others are new
            body = kudos(f"{prefix}-giver", f"{prefix}-author", kudos_id=f"{prefix}-k0", thread=f"{prefix}-t0")
            await service.give_kudos(limited, kudos_in(body))
        likes = [kudos_in(b) for b in batch_scenario(together)]
        batch = await service.write_likes(limited, [service.Like(k, request_hash(k), None) for k in likes])
        one_by_one = [(await at_once(service.give_kudos(limited, kudos_in(b))))[0] for b in batch_scenario(alone)]

    assert [type(r).__name__ for r in batch] == [
        *["Outcome"] * 4,
        "DuplicateKudos",
        "Outcome",
        "IdempotencyConflict",
        "Outcome",
        "GiverLimitReached",
    ]
    assert await what_a_scenario_left(api, together, batch) == await what_a_scenario_left(api, alone, one_by_one)
    # One transaction wrote them all.
    written = await api.fetch(
        "select distinct xmin::text from kudos where kudos_id like $1 || '-k%' and kudos_id <> $1 || '-k0'", together
    )
    assert len(written) == 1


async def test_kudos_and_retractions_at_once_leave_the_cap_of_what_stands(api, services: Services, new_id):
    author = new_id("author")
    first = [kudos(author, new_id("g"), occurred_at=at(2 * i)) for i in range(25)]
    for body in first:
        await api.give(body)
    retracted, late = first[:10], [kudos(author, new_id("g"), occurred_at=at(2 * i + 1)) for i in range(12)]

    results = await at_once(
        *(service.retract_kudos(services, b["kudos_id"]) for b in retracted),
        *(service.give_kudos(services, kudos_in(b)) for b in late),
    )

    assert [type(r).__name__ for r in results] == ["Outcome"] * 22
    standing = sorted(first[10:] + late, key=lambda b: b["occurred_at"])
    credits = await api.credits([b["kudos_id"] for b in first + late])
    assert [credits[b["kudos_id"]] for b in standing] == rules.allocate_daily_cap([10] * len(standing), 200)
    assert all(credits[b["kudos_id"]] == 0 for b in retracted)
    assert (await api.reputation(author))["reputation"] == 200
    assert (await api.balance(author))["reputation"] == 200


async def test_concurrent_acceptances_in_one_thread_leave_the_latest_standing(api, services: Services, new_id):
    thread = new_id("t")
    helpers = [new_id("helper") for _ in range(12)]
    # Accepted by different members (asker, moderators): nothing but the thread links them.
    accepters = [new_id("accepter") for _ in helpers]
    bodies = [
        kudos(helper, accepter, "accepted_answer", thread=thread, post=f"p{i}", occurred_at=at(i))
        for i, (helper, accepter) in enumerate(zip(helpers, accepters, strict=True))
    ]

    results = await at_once(*(service.give_kudos(services, kudos_in(b)) for b in reversed(bodies)))

    assert [type(r).__name__ for r in results] == ["Outcome"] * len(bodies)
    assert [(await api.reputation(h))["reputation"] for h in helpers] == [0] * 11 + [15]
    assert [(await api.reputation(a))["reputation"] for a in accepters] == [0] * 11 + [2]
    standing = await api.fetch("select kudos_id from kudos where thread_id = $1 and status = 'standing'", thread)
    assert [r["kudos_id"] for r in standing] == [bodies[-1]["kudos_id"]]


# --- the floor ------------------------------------------------------------------------------


async def test_the_floor_holds_reputation_and_a_later_award_is_not_counted_twice(app_with, new_id):
    author = new_id("author")
    async with app_with(floor=5) as api:
        like = kudos(author, new_id("g"))
        await api.give(like)

        retracted = (await api.retract(like["kudos_id"])).json()

        assert [(c["amount"], c["reputation_delta"]) for c in retracted["changes"]] == [(-10, -5)]
        reputation = await api.reputation(author)
        assert (reputation["reputation"], reputation["kept_by_floor"], reputation["breakdown"]) == (5, 5, [])

        again = (await api.give(kudos(author, new_id("g")))).json()

        assert [(c["amount"], c["reputation_delta"]) for c in again["changes"]] == [(10, 5)]
        reputation = await api.reputation(author)
        assert (reputation["reputation"], reputation["kept_by_floor"]) == (10, 0)
        # Above the floor a retraction takes everything it gave.
        third = kudos(author, new_id("g"), "helpful")
        await api.give(third)
        await api.retract(third["kudos_id"])
        assert (await api.reputation(author))["reputation"] == 10
        assert sum(t["amount"] if t["code"] == "kudos" else -t["amount"] for t in await api.transfers_of(author)) == 10


# --- the points bridge ----------------------------------------------------------------------


async def test_the_bridge_credits_points_for_an_accepted_answer_and_takes_them_back(app_with, new_id):
    asker, first, second, thread = new_id("asker"), new_id("first"), new_id("second"), new_id("t")
    async with app_with(accepted_answer_points=50) as api:
        accepted = (
            await api.give(kudos(first, asker, "accepted_answer", thread=thread, post="p1", occurred_at=at(1)))
        ).json()

        assert accepted["bridge_points"] == 50
        balance = await api.balance(first)
        assert (balance["available"], balance["lifetime_earned"], balance["reputation"]) == (50, 0, 15)
        assert (await api.balance(asker))["available"] == 0  # the accepter gets reputation only

        await api.give(kudos(second, asker, "accepted_answer", thread=thread, post="p2", occurred_at=at(2)))

        assert ((await api.balance(first))["available"], (await api.balance(second))["available"]) == (0, 50)
        points = [(t["code"], t["amount"]) for t in await api.transfers_of(first) if t["asset"] == "points"]
        assert points == [("bonus", 50), ("retract", 50)]


async def test_taking_back_spent_bridge_points_leaves_a_debt(app_with, services: Services, new_id):
    author = new_id("author")
    async with app_with(accepted_answer_points=50) as api:
        accepted = kudos(author, new_id("asker"), "accepted_answer")
        await api.give(accepted)
        await spend_points(services, author, 50, code="redeem", cause_type="test", cause_ref=author, reason="spent")

        await api.retract(accepted["kudos_id"])

        assert (await api.balance(author))["available"] == -50


# --- ranks ----------------------------------------------------------------------------------


async def test_rank_changes_are_announced_as_events(api, new_id):
    author = new_id("author")
    likes = await give_likes(api, author, range(5))
    await api.retract(likes[0]["kudos_id"])

    events = await api.fetch(
        """
        select e.type, e.data::text from outbox_events e join members m using (member_uid)
        where m.member_id = $1 and e.type = 'reputation.rank_changed' order by e.sequence
        """,
        author,
    )

    payloads = [msgspec.json.decode(e["data"]) for e in events]
    assert [(p["from"], p["to"], p["reputation"]) for p in payloads] == [
        ("Newcomer", "Contributor", 50),
        ("Contributor", "Newcomer", 40),
    ]
    assert payloads[1]["kudos_id"] == likes[0]["kudos_id"]
    reputation = await api.reputation(author)
    assert (reputation["rank"], reputation["next_rank"], reputation["needed_for_next_rank"]) == (
        "Newcomer",
        "Contributor",
        10,
    )


async def test_the_reputation_of_an_unknown_member_is_404(client, admin_headers, new_id):
    response = await client.get(f"/v1/members/{new_id('nobody')}/reputation", headers=admin_headers)
    assert (response.status_code, response.json()["code"]) == (404, "member_not_found")


# --- leaderboards ---------------------------------------------------------------------------


def entries(board: dict[str, Any]) -> list[tuple[int, str, int]]:
    """(rank, member, reputation), members of equal rank in name order."""
    return sorted((e["rank"], e["member_id"], e["reputation"]) for e in board["entries"])


async def test_leaderboards_rank_densely_and_know_each_members_position(api, new_id):
    source = new_id("lb")
    a, b, c, d = (new_id(name) for name in "abcd")
    for member, likes in ((a, 3), (b, 3), (c, 1), (d, 2)):
        await give_likes(api, member, range(likes), source=source)

    board = await api.board(source=source, limit=10)

    assert (board["period"], board["period_key"], board["source"]) == ("all", "all", source)
    assert entries(board) == sorted([(1, a, 30), (1, b, 30), (2, d, 20), (3, c, 10)])
    assert [e["reputation"] for e in board["entries"]] == [30, 30, 20, 10]
    assert len((await api.board(source=source, limit=2))["entries"]) == 2
    position = await api.position(d, source=source)
    assert (position["rank"], position["reputation"]) == (2, 20)
    outsider = new_id("outsider")
    await api.give(kudos(outsider, new_id("g")))
    assert (await api.position(outsider, source=source))["rank"] is None
    missing = await api.client.get(f"/v1/leaderboards/reputation/members/{new_id('x')}", headers=api.headers)
    assert missing.status_code == 404


async def test_leaderboards_count_the_period_in_which_kudos_happened(api, new_id):
    source, member = new_id("lb"), new_id("m")
    today, long_ago = datetime.now(UTC), datetime.now(UTC) - timedelta(days=45)
    await api.give(kudos(member, new_id("g"), source=source, occurred_at=today.isoformat()))
    await api.give(kudos(member, new_id("g"), source=source, occurred_at=long_ago.isoformat(), post=new_id("p")))

    boards = {period: await api.board(source=source, period=period) for period in ("all", "week", "month")}

    assert {p: entries(b) for p, b in boards.items()} == {
        "all": [(1, member, 20)],
        "week": [(1, member, 10)],
        "month": [(1, member, 10)],
    }
    assert boards["week"]["period_key"] == rules.week_key(today.date())
    assert boards["month"]["period_key"] == rules.month_key(today.date())
    over_all_sources = await api.position(member, period="all")
    assert over_all_sources["reputation"] == 20


async def test_leaderboards_follow_retractions_and_the_cap(api, new_id):
    source, member, other = new_id("lb"), new_id("m"), new_id("o")
    likes = await give_likes(api, member, range(22), source=source)
    await give_likes(api, other, range(1), source=source)
    assert entries(await api.board(source=source)) == [(1, member, 200), (2, other, 10)]

    await api.retract(likes[0]["kudos_id"])  # the 21st like takes its room: still 200
    assert entries(await api.board(source=source)) == [(1, member, 200), (2, other, 10)]

    await api.retract(likes[1]["kudos_id"])
    await api.retract(likes[2]["kudos_id"])
    other_like = await api.fetch(
        "select kudos_id from kudos k join members m on m.member_uid = k.author_uid where m.member_id = $1",
        other,
    )
    await api.retract(other_like[0]["kudos_id"])
    assert entries(await api.board(source=source)) == [(1, member, 190)]


def _cli(database_url: str, redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``konvert ...`` with the settings the tests' apps use on that database (its Redis keys too)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KONVERT_")}
    env |= {
        "KONVERT_DATABASE_URL": database_url,
        "KONVERT_REDIS_URL": redis_url,
        "KONVERT_REDIS_KEY_PREFIX": make_settings(database_url, redis_url).redis_key_prefix,
    }
    return subprocess.run(
        [sys.executable, "-m", "konvert", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_leaderboards_are_the_same_after_redis_is_flushed_and_rebuilt(
    api, services: Services, redis_client, database_url, redis_url, new_id
):
    source = new_id("lb")
    members = [new_id("m") for _ in range(4)]
    today = datetime.now(UTC)
    for n, member in enumerate(members):
        await give_likes(api, member, range(n + 1), source=source)
        await api.give(kudos(member, new_id("g"), "helpful", source=source, occurred_at=today.isoformat()))
    retracted = kudos(members[0], new_id("g"), source=source, post=new_id("p"))
    await api.give(retracted)
    await api.retract(retracted["kudos_id"])
    await api.give(kudos(members[1], members[2], "accepted_answer", source=source, occurred_at=today.isoformat()))

    async def snapshot() -> list[Any]:
        views = [
            await api.board(period=period, limit=100, **({"source": board_source} if board_source else {}))
            for period in ("all", "week", "month")
            for board_source in (source, None)
        ]
        positions = [await api.position(m, period=p) for m in members for p in ("all", "week", "month")]
        return views + positions

    before = await snapshot()
    assert [(e["rank"], e["member_id"], e["reputation"]) for e in before[0]["entries"]] == [
        (1, members[3], 50),
        (2, members[1], 45),
        (3, members[2], 42),
        (4, members[0], 20),
    ]

    # Redis loses everything of this database's (as a flush or an empty restart would).
    async for key in redis_client.scan_iter(match=f"{services.settings.redis_key_prefix}:*", count=1000):
        await redis_client.unlink(key)
    keys = await leaderboard.keyspace_of(services.pool, services.settings.redis_key_prefix)
    assert await redis_client.get(keys.marker) is None
    after_flush = await snapshot()  # the first read rebuilt them
    built = await redis_client.get(keys.marker)

    result = _cli(database_url, redis_url, "leaderboards", "rebuild")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "leaderboards rebuilt" in result.stdout
    assert await redis_client.get(keys.marker) != built  # the boards the app reads were rebuilt
    after_cli = await snapshot()

    assert after_flush == before and after_cli == before


async def test_a_change_that_could_not_reach_redis_makes_the_next_read_rebuild(api, services: Services, new_id):
    await leaderboard.rebuild(services)
    source, member = new_id("lb"), new_id("m")
    await api.give(kudos(member, new_id("g"), source=source))
    boards = services.shared(leaderboard.Leaderboards)
    # A write in another process (here: the test's own services) committed, but Redis missed it.
    boards.missed_change = True

    async with services.pool.acquire() as conn, conn.transaction():
        await boards.hold(conn)  # that process's next write drops the marker first

    assert await services.redis.get((await boards.keys(services.pool)).marker) is None
    assert entries(await api.board(source=source)) == [(1, member, 10)]


ADVISORY_LOCKS = """
select 1 from pg_locks
where locktype = 'advisory' and database = (select oid from pg_database where datname = current_database())
"""


async def test_a_rebuild_waits_for_writes_in_flight_and_their_increments_miss_it(api, services: Services, new_id):
    """A writing transaction holds the leaderboards' lock until it ends: a rebuild that starts
    meanwhile waits, and includes what it committed; the write's increment, for the generation it
    read, then changes nothing of the new build."""
    source, member = new_id("lb"), new_id("m")
    await api.give(kudos(member, new_id("g"), source=source))
    boards = services.shared(leaderboard.Leaderboards)
    member_uid = (await api.fetch("select member_uid from members where member_id = $1", member))[0][0]
    async with services.pool.acquire() as writer:
        async with writer.transaction():
            generation = await boards.hold(writer)
            assert generation is not None
            rebuild = asyncio.create_task(leaderboard.rebuild(services))
            async with asyncio.timeout(10):
                while not await api.fetch(ADVISORY_LOCKS + " and not granted"):  # noqa: ASYNC110 (PostgreSQL signals nothing)
                    await asyncio.sleep(0.01)
            assert not rebuild.done()
        await rebuild  # the writer committed: the rebuild went on

    await boards.add(generation, [leaderboard.Delta(member_uid, source, DAY.date(), 10)])

    assert entries(await api.board(source=source)) == [(1, member, 10)]
    assert await api.fetch(ADVISORY_LOCKS) == []


async def test_leaderboards_are_unavailable_without_redis_but_kudos_still_count(
    database_url, program, admin_headers, new_id
):
    settings = make_settings(database_url, "redis://127.0.0.1:1/0")
    async with AsyncTestClient(create_app(settings, program)) as client:
        api = Api(client, admin_headers, database_url)
        author = new_id("author")
        await api.give(kudos(author, new_id("g")))
        assert (await api.reputation(author))["reputation"] == 10

        response = await client.get("/v1/leaderboards/reputation", headers=admin_headers)

        assert (response.status_code, response.json()["code"]) == (503, "leaderboard_unavailable")
        assert response.headers["content-type"].startswith("application/problem+json")


@pytest.mark.parametrize(
    ("params", "field"),
    [({"period": "year"}, "period"), ({"limit": 1000}, "limit"), ({"source": "a:b"}, "source")],
)
async def test_leaderboard_queries_are_validated(api, params, field):
    response = await api.client.get("/v1/leaderboards/reputation", params=params, headers=api.headers)

    assert (response.status_code, response.json()["code"]) == (422, "validation_failed")
    assert response.json()["errors"][0]["field"] == field


# --- the audit ------------------------------------------------------------------------------


@pytest.fixture
async def reputation_ledger(fresh_database_url, redis_url, program) -> AsyncIterator[tuple[str, list[Any], Services]]:
    """A database of its own after every kind of reputation write, with the floor and the bridge
    on; yields its URL, its leaderboards as the writes left them, and its services."""
    rules_ = program_with(program, floor=5, daily_cap=30, accepted_answer_points=30, giver_daily_limit=6)
    settings = make_settings(fresh_database_url, redis_url)
    conn = await asyncpg.connect(fresh_database_url)
    key, _ = await auth.insert_key(conn, "audit", ["admin"])
    await conn.close()
    services = await composition.open_services(settings, rules_)
    try:
        # Boards of this database's own (see leaderboard.KeySpace), built while it is empty, so
        # that what the writes leave in them can be compared with a rebuild.
        await leaderboard.rebuild(services)
        async with AsyncTestClient(create_app(settings, rules_)) as client:
            api = Api(client, {"Authorization": f"Bearer {key}"}, fresh_database_url)
            # ann: likes over the cap, a late earlier one, a retraction that frees room, a replay.
            likes = [kudos("ann", f"fan{i}", occurred_at=at(10 + i)) for i in range(4)]
            for body in likes:
                await api.give(body)
            await api.give(likes[0])
            await api.give(kudos("ann", "late-fan", occurred_at=at(1)))
            await api.retract(likes[1]["kudos_id"])
            await api.retract_by_key(likes[1])
            # bob: the floor keeps 5 of a retracted helpful mark; the next like makes up for it.
            helpful = kudos("bob", "ann", "helpful")
            await api.give(helpful)
            await api.retract(helpful["kudos_id"])
            await api.give(kudos("bob", "fan0", post="bobs-second"))
            # An accepted answer with bridge points, spent, then moved to bob's answer; a self-accept.
            await api.give(kudos("cem", "dan", "accepted_answer", thread="q1", post="cems", occurred_at=at(5)))
            await spend_points(services, "cem", 30, code="redeem", cause_type="test", cause_ref="cem", reason="spent")
            await api.give(kudos("bob", "dan", "accepted_answer", thread="q1", post="bobs", occurred_at=at(6)))
            await api.give(kudos("dan", "dan", "accepted_answer", thread="q2", post="dans"))
            # Refused writes leave nothing behind.
            await api.give(kudos("eve", "eve"), expect=422)
            for n in range(7):
                await api.give(kudos(f"x{n}", "busy", post=f"p{n}"), expect=201 if n < 6 else 429)
            boards = [await api.board(period=p, limit=100) for p in ("all", "week", "month")]
        yield fresh_database_url, boards, services
    finally:
        await services.close()


async def _audit(database_url: str):
    conn = await asyncpg.connect(database_url)
    try:
        return await run_audit(conn, composition.AUDIT_CHECKS)
    finally:
        await conn.close()


async def test_the_audit_passes_after_every_kind_of_reputation_write(reputation_ledger, redis_url):
    database_url, boards, services = reputation_ledger

    assert await _audit(database_url) == []
    result = _cli(database_url, redis_url, "audit")
    assert result.returncode == 0, result.stdout + result.stderr
    # The all-time board over every source is everyone's reputation.
    reputations = await services.pool.fetch("select member_id, reputation from members where reputation <> 0")
    assert {e["member_id"]: e["reputation"] for e in boards[0]["entries"]} == {
        r["member_id"]: r["reputation"] for r in reputations
    }
    # What the writes left in Redis is what a rebuild from PostgreSQL makes.
    await leaderboard.rebuild(services)
    rebuilt = [await leaderboard.top(services, p, None, 100) for p in ("all", "week", "month")]
    assert [msgspec.to_builtins(b) for b in rebuilt] == boards


REPUTATION_CORRUPTIONS = {
    "R1 kudos credit what their entries add up to": (
        "update kudos set author_credited = author_credited - 1 where kudos_pk = (select min(kudos_pk) from kudos where author_credited > 0)"
    ),
    "R2 reputation entries match their transfers": (
        "update reputation_entries set posted = posted + 1 where entry_id = (select min(entry_id) from reputation_entries where posted > 0)"
    ),
    "R3 reputation equals what standing kudos credit plus what the floor kept": (
        "update reputation_members set floor_kept = floor_kept + 3"
        " where member_uid = (select min(member_uid) from reputation_members)"
    ),
    "R4 reputation never below zero": "update members set reputation = -1 where member_id = 'x0'",
    "R5 the daily cap is filled in the order kudos happened": (
        "update kudos set author_credited = 0 where kudos_pk = (select kudos_pk from kudos k join members m"
        " on m.member_uid = k.author_uid where m.member_id = 'ann' and k.status = 'standing'"
        " order by k.occurred_at limit 1)"
    ),
    "R6 one accepted answer per thread, credited in full": (
        "update kudos set accepter_credited = 0 where kind = 'accepted_answer' and status = 'standing' and accepter_value > 0"
    ),
    "R7 bridge points equal their transfers": "update kudos set bridge_points = bridge_points + 1 where bridge_points > 0",
}


@pytest.mark.parametrize("invariant", sorted(REPUTATION_CORRUPTIONS))
async def test_the_audit_names_the_broken_reputation_invariant(reputation_ledger, invariant):
    database_url, _, _ = reputation_ledger
    conn = await asyncpg.connect(database_url)
    try:
        status = await conn.execute(REPUTATION_CORRUPTIONS[invariant])
    finally:
        await conn.close()
    assert status.endswith(" 1"), status

    violations = await _audit(database_url)

    assert invariant in {v.invariant for v in violations}, violations


async def test_an_erased_member_leaves_the_leaderboards(api, new_id):
    source = new_id("forum")
    stays, leaves = new_id("m"), new_id("m")
    await api.give(kudos(stays, new_id("g"), source=source))
    await api.give(kudos(leaves, new_id("g"), source=source, post=new_id("post")))
    await api.give(kudos(leaves, new_id("g"), source=source, post=new_id("post")))
    before = await api.board(period="all", source=source)
    assert [e["member_id"] for e in before["entries"]] == [leaves, stays]

    erased = await api.client.delete(f"/v1/members/{leaves}", headers=api.headers)

    assert erased.status_code == 204
    after = await api.board(period="all", source=source)
    assert [(e["member_id"], e["rank"]) for e in after["entries"]] == [(stays, 1)]
