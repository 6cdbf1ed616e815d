"""Events out, against a real local HTTP receiver started by each test, real PostgreSQL and Redis.

Each test has a database of its own and drives its publishers itself (``publish_all``), with
the time of konvert's clock moved where retries, dead letters, grace periods and pruning need it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import msgspec
import pytest
import redis.asyncio as redis
import uvicorn
from cryptography.fernet import Fernet
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from konvert import auth, composition
from konvert.app import create_app
from konvert.events import publisher, service, store
from konvert.ledger import events
from konvert.ledger.book import writing
from konvert.program import Program
from konvert.services import Services
from konvert.settings import Settings
from tests.conftest import AppClient, make_settings, purchase_body, serve
from tests.integration.test_purchases import until_waiting_for_locks

# --- a real webhook receiver ------------------------------------------------------------------


class Receiver:
    """An ASGI app that records every request and answers with ``status`` (a list of statuses is
    used up one per request first)."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.status = 204
        self.script: list[int] = []
        self.arrived = asyncio.Event()
        # While set, requests wait for it to be set before they are answered (``entered`` says
        # one is waiting).
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        if self.gate is not None:
            self.entered.set()
            await self.gate.wait()
        status = self.script.pop(0) if self.script else self.status
        if 200 <= status < 300:
            self.received.append((headers, body))
            self.arrived.set()
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.received]

    def verify(self, secret: str) -> list[dict[str, Any]]:
        """Every received message, verified with ``secret`` the way a receiver would."""
        return [Webhook(secret).verify(body, headers) for headers, body in self.received]


@contextlib.asynccontextmanager
async def running(receiver: Receiver) -> AsyncIterator[str]:
    """Serve the receiver on a loopback port; yields its URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(receiver, lifespan="on", log_config=None, access_log=False)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/hooks"
    finally:
        server.should_exit = True
        await task
        sock.close()


# --- a konvert of the test's own ----------------------------------------------------------------


class Konvert:
    """A test's konvert: its app (served), its services for the publisher, a movable clock."""

    def __init__(self, client: AppClient, services: Services, headers: dict[str, str]) -> None:
        self.client = client
        self.services = services
        self.headers = headers
        self.offset = datetime.timedelta()

    def advance(self, **delta: float) -> None:
        self.offset += datetime.timedelta(**delta)

    def now(self) -> datetime.datetime:
        return datetime.datetime.now(datetime.UTC) + self.offset

    async def call(self, method: str, path: str, body: Any = None, expect: int | None = None) -> Any:
        response = await self.client.request(method, path, json=body, headers=self.headers)
        if expect is not None:
            assert response.status_code == expect, response.text
        return response.json() if response.content else None

    async def endpoint(self, url: str, endpoint_id: str = "crm", **fields: Any) -> dict[str, Any]:
        return await self.call("PUT", f"/v1/webhook-endpoints/{endpoint_id}", {"url": url, **fields}, expect=201)

    async def purchase(self, member_id: str, **changes: Any) -> dict[str, Any]:
        return await self.call("POST", "/v1/purchases", purchase_body(member_id, **changes), expect=201)

    async def publish(self) -> int:
        return await publisher.publish_all(self.services)

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return await self.services.pool.fetch(sql, *args)

    async def readable(self) -> None:
        """Every committed event numbered: the feed and the publishers read only those."""
        while (await publisher.sequence(self.services)).numbered:
            pass


@pytest.fixture
def events_settings(fresh_database_url: str, redis_url: str) -> Settings:
    return make_settings(
        fresh_database_url,
        redis_url,
        webhook_retry_seconds=3600.0,
        webhook_backoff_base_seconds=1.0,
        webhook_backoff_max_seconds=600.0,
        webhook_disable_after_seconds=3 * 86400.0,
        webhook_timeout_seconds=5.0,
        # The receiver is on this machine's loopback.
        webhook_allow_private_addresses=True,
    )


StartKonvert = Callable[..., Awaitable[Konvert]]


@pytest.fixture
async def start_konvert(
    events_settings: Settings, program: Program, redis_client: redis.Redis
) -> AsyncIterator[StartKonvert]:
    """Start konverts on the test's database (a later one is konvert after a restart)."""
    stack = contextlib.AsyncExitStack()
    key: list[str] = []

    async def start(**overrides: Any) -> Konvert:
        settings = events_settings.replace(**overrides)
        client = await stack.enter_async_context(serve(create_app(settings, program)))
        services = await composition.open_services(settings, program)
        stack.push_async_callback(services.close)
        if not key:
            conn = await asyncpg.connect(settings.database_url)
            try:
                key.append((await auth.insert_key(conn, "test", ["admin"]))[0])
            finally:
                await conn.close()
        konvert = Konvert(client, services, {"Authorization": f"Bearer {key[0]}"})
        clock = services.clock
        services.clock = lambda: clock() + konvert.offset
        app_services = client.app.state.services
        app_clock = app_services.clock
        app_services.clock = lambda: app_clock() + konvert.offset
        return konvert

    async with stack:
        yield start


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    hooks = Receiver()
    async with running(hooks) as url:
        yield hooks, url


# --- tests --------------------------------------------------------------------------------------


async def test_a_purchase_is_announced_to_an_endpoint_signed_per_standard_webhooks(start_konvert, receiver, new_id):
    hooks, url = receiver
    konvert = await start_konvert()
    endpoint = await konvert.endpoint(url, description="CRM")
    member = new_id("m")

    purchase = await konvert.purchase(member)
    await konvert.publish()

    assert endpoint["secret"].startswith("whsec_")
    verified = hooks.verify(endpoint["secret"])
    assert [e["type"] for e in verified] == ["purchase.recorded", "points.earned"]
    recorded, earned = verified
    assert {recorded["member_id"], earned["member_id"]} == {member}
    assert (recorded["sequence"], earned["sequence"]) == (1, 2)
    assert recorded["data"]["purchase_id"] == purchase["purchase_id"]
    assert earned["data"]["points"] == purchase["points"] == 20
    assert earned["data"]["balance"] == {"available": 20, "pending": 0, "held": 0}
    assert earned["data"]["lot_id"] == purchase["lot_id"]
    headers = hooks.received[0][0]
    assert headers["webhook-id"] == recorded["id"] and headers["webhook-signature"].startswith("v1,")
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "A" * 43 + "=").verify(hooks.received[0][1], headers)
    # The secret is shown once.
    again = await konvert.call("GET", "/v1/webhook-endpoints/crm", expect=200)
    assert again["secret"] is None and again["url"] == url


async def test_delivery_is_at_least_once_across_an_outage_and_a_restart(start_konvert, receiver, new_id):
    hooks, url = receiver
    konvert = await start_konvert()
    await konvert.endpoint(url, event_types=["points.earned"])
    member = new_id("m")
    await konvert.purchase(member)

    hooks.status = 503
    await konvert.publish()
    (message,) = (await konvert.call("GET", "/v1/webhook-endpoints/crm/messages", expect=200))["items"]
    assert (message["status"], message["attempts"], message["last_status"]) == ("pending", 1, 503)
    assert hooks.received == []

    # A second attempt is leased, and konvert stops before it is made: the lease runs out and
    # the konvert started afterwards makes it.
    konvert.advance(seconds=601)
    leased = await store.claim_messages(
        konvert.services.pool, "crm", konvert.now(), 10, konvert.now() + datetime.timedelta(seconds=60)
    )
    assert len(leased) == 1
    hooks.status = 200
    restarted = await start_konvert()
    restarted.advance(seconds=601)
    assert await restarted.publish() == 0  # still leased
    restarted.advance(seconds=61)
    await restarted.publish()

    assert [e["type"] for e in hooks.events()] == ["points.earned"]
    (message,) = (await restarted.call("GET", "/v1/webhook-endpoints/crm/messages", expect=200))["items"]
    assert (message["status"], message["attempts"], message["last_status"]) == ("delivered", 3, 200)


async def test_an_attempt_cut_short_by_a_stop_is_made_again_after_the_restart(start_konvert, receiver, new_id):
    hooks, url = receiver
    konvert = await start_konvert()
    endpoint = await konvert.endpoint(url, event_types=["points.earned"])
    await konvert.purchase(new_id("m"))
    hooks.status = 503
    await konvert.publish()  # the receiver is down: the first attempt fails

    # It is up again, but slow: the second attempt is in flight when konvert stops.
    hooks.status, hooks.gate = 200, asyncio.Event()
    konvert.advance(seconds=601)
    publishing = asyncio.create_task(konvert.publish())
    await asyncio.wait_for(hooks.entered.wait(), 30)
    publishing.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await publishing
    await konvert.services.shared(publisher.Publisher).aclose()  # as a stopping process does
    hooks.gate.set()
    (cut_short,) = await konvert.fetch("select status, attempts from webhook_messages")

    restarted = await start_konvert()
    restarted.advance(seconds=601)
    assert await restarted.publish() == 0  # still leased by the stopped process
    restarted.advance(seconds=5 * 5 + 31)  # past the lease: five timeouts and a margin
    await restarted.publish()

    assert (cut_short["status"], cut_short["attempts"]) == ("pending", 2)
    (message,) = (await restarted.call("GET", "/v1/webhook-endpoints/crm/messages", expect=200))["items"]
    assert (message["status"], message["attempts"]) == ("delivered", 3)
    # At least once: the receiver may have taken the cut-short attempt too, always the same event.
    verified = hooks.verify(endpoint["secret"])
    assert len(verified) in (1, 2) and {e["id"] for e in verified} == {message["event_id"]}


# Both ways of taking the leases and pruning (KONVERT_LOCK_MEMBERS).
LOCK_MODES = pytest.mark.parametrize("lock_members", ["together", "one_by_one"])


@LOCK_MODES
async def test_a_members_events_arrive_in_order_and_other_members_are_not_held_up(
    start_konvert, receiver, new_id, lock_members
):
    hooks, url = receiver
    konvert = await start_konvert(lock_members=lock_members)
    endpoint = await konvert.endpoint(url, event_types=["purchase.recorded"])
    first, second = new_id("a"), new_id("b")
    for n in range(3):
        await konvert.purchase(first, purchase_id=f"{first}-{n}")
    await konvert.purchase(second)

    hooks.script = [500]  # the first attempt fails: the first member's first purchase
    await konvert.publish()
    assert [(e["member_id"], e["sequence"]) for e in hooks.verify(endpoint["secret"])] == [(second, 1)]

    konvert.advance(seconds=601)
    await konvert.publish()
    ordered = [(e["member_id"], e["data"]["purchase_id"]) for e in hooks.events() if e["member_id"] == first]
    assert ordered == [(first, f"{first}-{n}") for n in range(3)]


async def test_leasing_one_by_one_passes_over_messages_others_hold_and_takes_each_once(start_konvert, new_id):
    konvert = await start_konvert(lock_members="one_by_one")
    await konvert.endpoint("http://127.0.0.1:9/hooks", event_types=["purchase.recorded"])
    members = sorted(new_id("m") for _ in range(3))
    for member in members:
        await konvert.purchase(member)
    await konvert.readable()
    await publisher.fan_out(konvert.services)
    messages = await konvert.fetch(
        "select w.member_uid, w.message_id from webhook_messages w join members m using (member_uid)"
        " order by m.member_id"
    )
    now, lease_until = konvert.now(), konvert.now() + datetime.timedelta(seconds=60)

    def claim() -> Awaitable[list[asyncpg.Record]]:
        return store.claim_messages(konvert.services.pool, "crm", now, 10, lease_until, one_by_one=True)

    async with konvert.services.pool.acquire() as holder, holder.transaction():
        await holder.execute(
            "select 1 from webhook_messages where member_uid = $1 and message_id = $2 for update", *messages[0]
        )
        leased = await asyncio.wait_for(claim(), 10)  # never waits for the held one
    again = await claim()  # the others are leased already
    after = await claim()

    assert sorted(m["message_id"] for m in leased) == sorted(m["message_id"] for m in messages[1:])
    assert [m["message_id"] for m in again] == [messages[0]["message_id"]]
    assert after == []
    assert {r["attempts"] for r in await konvert.fetch("select attempts from webhook_messages")} == {1}


async def _finish_while_a_later_message_is_fanned_out(konvert: Konvert, member: str) -> int:
    """The member's first message finished in a transaction that a fan-out of their next one does
    not see (and that does not see it): the later message is left waiting. Returns its id."""
    await konvert.purchase(member, purchase_id=f"{member}-0")
    await konvert.readable()
    await publisher.fan_out(konvert.services)
    await konvert.purchase(member, purchase_id=f"{member}-1")
    await konvert.readable()
    ((uid, first),) = await konvert.fetch("select member_uid, message_id from webhook_messages")
    async with konvert.services.pool.acquire() as conn:
        finishing = conn.transaction()
        await finishing.start()
        await store.record_outcomes(conn, [store.Outcome(uid, first, "delivered", None, 200, None, konvert.now())])
        await publisher.fan_out(konvert.services)
        await finishing.commit()
    ((later,),) = await konvert.fetch("select message_id from webhook_messages where status = 'pending'")
    return int(later)


async def test_a_message_fanned_out_while_its_predecessor_finishes_becomes_due(start_konvert, receiver, new_id):
    hooks, url = receiver
    konvert = await start_konvert()
    endpoint = await konvert.endpoint(url, event_types=["purchase.recorded"])
    member = new_id("m")
    later = await _finish_while_a_later_message_is_fanned_out(konvert, member)
    (waiting,) = await konvert.fetch("select message_id from webhook_messages where next_attempt_at = 'infinity'")
    assert waiting["message_id"] == later  # neither transaction saw the other's row
    listed = (await konvert.call("GET", "/v1/webhook-endpoints/crm/messages?status=pending", expect=200))["items"]
    assert [(m["message_id"], m["next_attempt_at"]) for m in listed] == [(later, None)]

    # What a publisher does after writing outcomes, once they are committed.
    finished = await konvert.fetch("select member_uid, message_id from webhook_messages where status = 'delivered'")
    finished_keys = [store.MessageKey(*r) for r in finished]
    assert await store.make_next_due(konvert.services.pool, finished_keys, konvert.now()) == 1
    assert await konvert.fetch("select 1 from webhook_messages where next_attempt_at = 'infinity'") == []
    await konvert.publish()
    assert [e["data"]["purchase_id"] for e in hooks.verify(endpoint["secret"])] == [f"{member}-1"]


async def test_a_message_fanned_out_after_its_predecessor_finished_unseen_becomes_due(start_konvert, new_id):
    # The other order: the outcome commits (and looks for a waiting message, finding none) while
    # the fan-out, its snapshot taken before, is still running. The fan-out is held up by a row
    # the outcome's transaction also inserted (one of the batch's messages, left to it).
    konvert = await start_konvert()
    await konvert.endpoint("https://hooks.example.com/konvert", event_types=["purchase.recorded", "points.earned"])
    member = new_id("m")
    await konvert.purchase(member, purchase_id=f"{member}-0")
    await konvert.readable()
    await publisher.fan_out(konvert.services)
    await konvert.purchase(member, purchase_id=f"{member}-1")
    await konvert.readable()
    ((earned,),) = await konvert.fetch(
        "select event_id from outbox_events where type = 'points.earned' order by event_id desc limit 1"
    )
    pending = [
        store.MessageKey(*r)
        for r in await konvert.fetch("select member_uid, message_id from webhook_messages where status = 'pending'")
    ]
    async with konvert.services.pool.acquire() as conn:
        finishing = conn.transaction()
        await finishing.start()
        await conn.execute(
            "insert into webhook_messages (endpoint_id, event_id, member_uid, status, next_attempt_at, finished_at) "
            "select 'crm', event_id, member_uid, 'delivered', now(), now() from outbox_events where event_id = $1",
            earned,
        )
        outcomes = [store.Outcome(*key, "delivered", None, 200, None, konvert.now()) for key in pending]
        await store.record_outcomes(conn, outcomes)
        fanning = asyncio.create_task(publisher.fan_out(konvert.services))
        await until_waiting_for_locks(konvert.services.pool, 1)  # the fan-out, for this transaction's row
        # The outcome looks for a waiting message before the fan-out can commit one (after its
        # commit, the fan-out resumes at once and may have committed it already): it finds none.
        assert await store.make_next_due(conn, pending, konvert.now()) == 0
        await finishing.commit()
    await fanning

    (later,) = await konvert.fetch("select next_attempt_at from webhook_messages where status = 'pending'")
    assert later["next_attempt_at"] <= konvert.now()


async def test_a_message_left_waiting_by_a_process_that_died_is_swept_up(start_konvert, receiver, new_id):
    hooks, url = receiver
    konvert = await start_konvert()
    endpoint = await konvert.endpoint(url, event_types=["purchase.recorded"])
    member = new_id("m")
    # The process that finished the first message died before making the next one due.
    await _finish_while_a_later_message_is_fanned_out(konvert, member)

    await konvert.publish()  # a publisher's first round sweeps

    assert [e["data"]["purchase_id"] for e in hooks.verify(endpoint["secret"])] == [f"{member}-1"]
    assert await konvert.fetch("select 1 from webhook_messages where status = 'pending'") == []


async def test_a_rolled_back_change_announces_nothing(start_konvert, receiver, new_id):
    hooks, url = receiver
    konvert = await start_konvert()
    await konvert.endpoint(url)
    member = new_id("m")
    await konvert.purchase(member)
    before = await konvert.fetch("select count(*) from outbox_events")

    refused = await konvert.client.post(
        f"/v1/members/{member}/redemptions",
        json={"redemption_id": new_id("r"), "points": 10_000},
        headers=konvert.headers,
    )
    with pytest.raises(RuntimeError):
        async with writing(konvert.services) as book:
            (locked,) = await book.lock(ids=[member])
            book.announce(locked, "member.erased", events.MemberErased())
            raise RuntimeError("the use case fails after announcing")
    await konvert.publish()

    assert refused.status_code == 409
    assert await konvert.fetch("select count(*) from outbox_events") == before
    assert [e["type"] for e in hooks.events()] == ["purchase.recorded", "points.earned"]


async def test_a_message_failing_past_its_retries_is_dead_lettered_and_can_be_resent(start_konvert, receiver, new_id):
    hooks, url = receiver
    konvert = await start_konvert()
    endpoint = await konvert.endpoint(url, event_types=["points.earned"])
    await konvert.purchase(new_id("m"))
    hooks.status = 500

    attempts = 0
    while not (await konvert.call("GET", "/v1/webhook-endpoints/crm/messages?status=failed"))["items"]:
        await konvert.publish()
        attempts += 1
        assert attempts < 50, "never dead-lettered"
        konvert.advance(seconds=600)  # the back-off's maximum
    (failed,) = (await konvert.call("GET", "/v1/webhook-endpoints/crm/messages?status=failed"))["items"]
    assert failed["attempts"] > 3 and failed["last_status"] == 500 and failed["finished_at"] is not None
    first, last = (datetime.datetime.fromisoformat(failed[k]) for k in ("first_attempt_at", "last_attempt_at"))
    assert last - first >= datetime.timedelta(seconds=3600)  # retried for the whole retry period

    hooks.status = 200
    resent = await konvert.call("POST", f"/v1/webhook-endpoints/crm/messages/{failed['message_id']}/retry", expect=200)
    assert resent["status"] == "pending"
    await konvert.publish()
    assert [e["type"] for e in hooks.verify(endpoint["secret"])] == ["points.earned"]
    again = await konvert.client.post(
        f"/v1/webhook-endpoints/crm/messages/{failed['message_id']}/retry", headers=konvert.headers
    )
    assert again.status_code == 409 and again.json()["code"] == "webhook_message_not_failed"
    missing = await konvert.client.post("/v1/webhook-endpoints/crm/messages/999999/retry", headers=konvert.headers)
    assert missing.status_code == 404 and missing.json()["code"] == "webhook_message_not_found"


async def test_after_a_rotation_both_secrets_sign_until_the_grace_period_ends(start_konvert, receiver, new_id):
    hooks, url = receiver
    konvert = await start_konvert(webhook_secret_grace_seconds=3600.0)
    old = (await konvert.endpoint(url, event_types=["purchase.recorded"]))["secret"]

    rotated = await konvert.call("POST", "/v1/webhook-endpoints/crm/rotate-secret", expect=200)
    new = rotated["secret"]
    await konvert.purchase(new_id("m"))
    await konvert.publish()
    konvert.advance(seconds=3601)
    await konvert.purchase(new_id("m"))
    await konvert.publish()

    assert new.startswith("whsec_") and new != old
    during, after = hooks.received
    assert len(during[0]["webhook-signature"].split(" ")) == 2
    Webhook(old).verify(during[1], during[0])
    Webhook(new).verify(during[1], during[0])
    Webhook(new).verify(after[1], after[0])
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(after[1], after[0])
    assert (await konvert.call("GET", "/v1/webhook-endpoints/crm"))["secret"] is None


@LOCK_MODES
async def test_delivered_events_are_pruned_after_the_retention_period_and_undelivered_ones_kept(
    start_konvert, receiver, new_id, lock_members
):
    hooks, url = receiver
    konvert = await start_konvert(events_retention_days=7.0, lock_members=lock_members)
    await konvert.endpoint(url, event_types=["points.earned"])
    await konvert.purchase(new_id("m"))
    await konvert.publish()
    await konvert.endpoint(url, "down", event_types=["purchase.recorded"])
    hooks.status = 503
    undelivered = await konvert.purchase(new_id("m"))
    await konvert.publish()

    assert await publisher.prune(konvert.services, konvert.now() + datetime.timedelta(days=6)) == 0
    pruned = await publisher.prune(konvert.services, konvert.now() + datetime.timedelta(days=8))

    left = await konvert.fetch("select type, data->>'purchase_id' as purchase_id from outbox_events order by event_id")
    assert pruned == 2  # the first purchase's events; the second's are still being retried
    assert [r["type"] for r in left] == ["purchase.recorded", "points.earned"]
    assert left[0]["purchase_id"] == undelivered["purchase_id"]
    assert await konvert.fetch("select 1 from webhook_messages where status <> 'pending'") == []


async def test_the_redis_stream_holds_every_event_in_order_for_consumer_groups(start_konvert, redis_client, new_id):
    konvert = await start_konvert()
    member = new_id("m")
    key = konvert.services.settings.events_stream_key
    await redis_client.xgroup_create(key, "crm", id="0", mkstream=True)
    await konvert.purchase(member)
    await konvert.call(
        "POST",
        f"/v1/members/{member}/adjustments",
        {"adjustment_id": new_id("adj"), "points": 5, "reason_code": "goodwill"},
        expect=201,
    )

    await konvert.publish()
    ((_, entries),) = await redis_client.xreadgroup("crm", "worker-1", {key: ">"}, count=10)

    events = [json.loads(fields[b"event"]) for _, fields in entries]
    assert [e["type"] for e in events] == ["purchase.recorded", "points.earned", "points.adjusted"]
    assert [fields[b"type"].decode() for _, fields in entries] == [e["type"] for e in events]
    assert [e["sequence"] for e in events] == [1, 2, 3] and {e["member_id"] for e in events} == {member}
    assert events[2]["data"]["balance"]["available"] == 20 + 5
    await redis_client.delete(key)


async def test_the_feed_pages_through_events_in_commit_order(start_konvert, new_id):
    konvert = await start_konvert()
    members = [new_id("m") for _ in range(3)]
    for member in members:
        await konvert.purchase(member)
    await konvert.readable()

    first = await konvert.call("GET", "/v1/events?limit=4", expect=200)
    rest = await konvert.call("GET", f"/v1/events?after={first['next_cursor']}&limit=4", expect=200)
    empty = await konvert.call("GET", f"/v1/events?after={rest['next_cursor']}", expect=200)
    await konvert.purchase(members[0])
    await konvert.readable()
    later = await konvert.call("GET", f"/v1/events?after={rest['next_cursor']}", expect=200)
    earned = await konvert.call("GET", "/v1/events?types=points.earned", expect=200)

    seen = first["items"] + rest["items"]
    assert [(e["member_id"], e["type"]) for e in seen] == [
        (m, t) for m in members for t in ("purchase.recorded", "points.earned")
    ]
    assert len({e["id"] for e in seen}) == 6
    assert empty["items"] == [] and empty["next_cursor"] == rest["next_cursor"]
    assert [(e["member_id"], e["sequence"]) for e in later["items"]] == [(members[0], 3), (members[0], 4)]
    assert [e["type"] for e in earned["items"]] == ["points.earned"] * 4
    bad = await konvert.client.get("/v1/events?after=nonsense", headers=konvert.headers)
    assert bad.status_code == 422 and bad.json()["code"] == "validation_failed"


async def test_a_transaction_left_open_holds_back_none_of_the_events_committed_meanwhile(
    start_konvert, redis_client, new_id
):
    konvert = await start_konvert()
    key = konvert.services.settings.events_stream_key
    member = new_id("m")
    held = await asyncpg.connect(konvert.services.settings.database_url)
    try:
        # A transaction with an event of its own, open while other changes commit.
        await held.execute("begin")
        await held.execute(
            "insert into outbox_events (member_uid, type, data, occurred_at) "
            "values (0, 'webhook_endpoint.disabled', '{\"endpoint_id\": \"late\"}', now())"
        )
        await konvert.purchase(member)
        await konvert.publish()
        meanwhile = await redis_client.xrange(key)
        await held.execute("commit")
        await konvert.publish()
        after = await redis_client.xrange(key)
    finally:
        await held.close()

    assert [fields[b"type"] for _, fields in meanwhile] == [b"purchase.recorded", b"points.earned"]
    # The late event is published once it commits, after the cursor rather than behind it.
    assert [fields[b"type"] for _, fields in after[2:]] == [b"webhook_endpoint.disabled"]
    await redis_client.delete(key)


async def test_numbering_takes_members_in_turn_and_each_members_events_in_order(start_konvert, new_id):
    konvert = await start_konvert(events_batch_size=2)
    first, second = new_id("m"), new_id("m")
    await konvert.purchase(first)
    await konvert.purchase(second)  # a member_uid above the first's
    batch = await publisher.sequence(konvert.services)
    await konvert.purchase(first)
    # The next batch starts past the member numbered last, so the first's new events wait their
    # turn behind the second's older ones, and a member's events are never taken out of order.
    while batch.numbered:
        batch = await publisher.sequence(konvert.services, past_member_uid=batch.last_member_uid)

    numbered = await konvert.fetch(
        "select m.member_id, e.sequence from outbox_events e join members m using (member_uid) order by e.position"
    )
    assert [tuple(row) for row in numbered] == [
        (first, 1),
        (first, 2),
        (second, 1),
        (second, 2),
        (first, 3),
        (first, 4),
    ]


async def test_an_event_numbered_late_by_an_earlier_batch_is_not_numbered_again(start_konvert, new_id):
    # On Citus a batch's commit may reach one shard late, after the sequencer's cursor moved: the
    # next batch then finds that shard's events without a position, and waits on their rows until
    # the late commit lands. It must not number them again (and leave their numbers missing), but
    # start over from what committed.
    konvert = await start_konvert()
    await konvert.purchase(new_id("m"))  # two events
    first, second = await konvert.fetch("select event_id from outbox_events order by event_id")
    await konvert.fetch("update event_cursors set position = 1 where name = 'sequencer'")
    late = await asyncpg.connect(konvert.services.settings.database_url)
    try:
        async with late.transaction():
            await late.execute("update outbox_events set position = 1 where event_id = $1", first["event_id"])
            numbering = asyncio.create_task(publisher.sequence(konvert.services))
            await until_waiting_for_locks(konvert.services.pool, 1)
        starting_over = await numbering
    finally:
        await late.close()
    afterwards = await publisher.sequence(konvert.services)

    numbered = await konvert.fetch("select event_id, position from outbox_events order by position")
    assert starting_over.numbered == 0 and afterwards.numbered == 1
    assert [tuple(row) for row in numbered] == [(first["event_id"], 1), (second["event_id"], 2)]


async def test_numbering_is_one_process_at_a_time_and_publishing_all_waits_for_it(start_konvert, new_id):
    konvert = await start_konvert()
    await konvert.purchase(new_id("m"))
    holder = await asyncpg.connect(konvert.services.settings.database_url)
    try:
        async with holder.transaction():
            assert await store.lock_cursor(holder, "sequencer") == 0  # another process numbering
            passed_over = await publisher.sequence(konvert.services)
            waiting = await store.unpublished(konvert.services.pool)
    finally:
        await holder.close()
    await konvert.publish()

    assert passed_over.numbered == 0 and waiting
    assert not await store.unpublished(konvert.services.pool)
    assert await konvert.fetch("select count(*) from outbox_events where position is null") == [(0,)]


async def _event_at(conn: asyncpg.Connection, position: int) -> None:
    await conn.execute(
        "insert into outbox_events (member_uid, type, data, occurred_at, position) "
        "values (0, 'webhook_endpoint.disabled', json_build_object('endpoint_id', $1::bigint::text), now(), $1::bigint)",
        position,
    )


async def test_readers_wait_at_a_position_not_visible_yet_and_take_it_when_it_is(start_konvert, receiver, redis_client):
    # On Citus a batch of positions commits shard by shard: a reader may see 4 and 5 before 3.
    # Nothing may read past 3 until it shows (the stream, the fan-out, the feed), or 3 would be
    # left behind their cursors. A position missing that both publishers have passed is pruned.
    hooks, url = receiver
    konvert = await start_konvert()
    await konvert.endpoint(url)
    key = konvert.services.settings.events_stream_key
    late = await asyncpg.connect(konvert.services.settings.database_url)
    try:
        async with konvert.services.pool.acquire() as conn:
            for position in (1, 2, 4, 5):
                await _event_at(conn, position)
            await conn.execute("update event_cursors set position = 5 where name = 'sequencer'")
        async with late.transaction():
            await _event_at(late, 3)
            # Not waiting for what it cannot see.
            await publisher.publish_all(konvert.services, wait_seconds=0)
            streamed = [json.loads(f[b"event"])["data"]["endpoint_id"] for _, f in await redis_client.xrange(key)]
            fanned = await konvert.fetch("select count(*) from webhook_messages")
            page = await konvert.call("GET", "/v1/events", expect=200)
        await konvert.publish()
        then = await konvert.call("GET", f"/v1/events?after={page['next_cursor']}", expect=200)
        streamed_then = [json.loads(f[b"event"])["data"]["endpoint_id"] for _, f in await redis_client.xrange(key)]
        await konvert.fetch("delete from outbox_events where position = 2")  # as pruning does
        again = await konvert.call("GET", "/v1/events", expect=200)
    finally:
        await late.close()

    assert streamed == ["1", "2"] and fanned == [(2,)]
    assert [e["data"]["endpoint_id"] for e in page["items"]] == ["1", "2"]
    assert [e["data"]["endpoint_id"] for e in then["items"]] == ["3", "4", "5"]
    assert streamed_then == ["1", "2", "3", "4", "5"]
    assert sorted(e["data"]["endpoint_id"] for e in hooks.events()) == ["1", "2", "3", "4", "5"]
    assert [e["data"]["endpoint_id"] for e in again["items"]] == ["1", "3", "4", "5"]
    await redis_client.delete(key)


async def test_the_feed_takes_an_events_read_key_only(start_konvert):
    konvert = await start_konvert()
    conn = await asyncpg.connect(konvert.services.settings.database_url)
    try:
        reader, _ = await auth.insert_key(conn, "feed", ["events:read"])
        other, _ = await auth.insert_key(conn, "members", ["members:read"])
    finally:
        await conn.close()

    allowed = await konvert.client.get("/v1/events", headers={"Authorization": f"Bearer {reader}"})
    refused = await konvert.client.get("/v1/events", headers={"Authorization": f"Bearer {other}"})
    endpoints = await konvert.client.get("/v1/webhook-endpoints", headers={"Authorization": f"Bearer {reader}"})

    assert (allowed.status_code, refused.status_code, endpoints.status_code) == (200, 403, 403)


async def test_an_erased_members_undelivered_events_carry_the_pseudonym(start_konvert, receiver, new_id):
    hooks, url = receiver
    konvert = await start_konvert()
    await konvert.endpoint(url)
    member = new_id("m")
    delivered = await konvert.purchase(member)
    await konvert.publish()
    undelivered = await konvert.purchase(member)
    hooks.status = 503
    await konvert.publish()

    await konvert.call("DELETE", f"/v1/members/{member}", expect=204)
    hooks.status = 200
    konvert.advance(seconds=601)
    await konvert.publish()

    received = hooks.events()
    assert [(e["type"], e["sequence"]) for e in received] == [
        ("purchase.recorded", 1),
        ("points.earned", 2),
        ("purchase.recorded", 3),
        ("points.earned", 4),
        ("member.erased", 5),
    ]
    # Delivered before the erasure: under the member's id, and not sent again.
    assert [e["member_id"] for e in received[:2]] == [member, member]
    assert received[0]["data"]["purchase_id"] == delivered["purchase_id"]
    # Undelivered then: under the pseudonym, with nothing of the member's in them.
    pseudonyms = {e["member_id"] for e in received[2:]}
    assert len(pseudonyms) == 1 and member not in pseudonyms
    assert received[2]["data"]["purchase_id"] == undelivered["purchase_id"]
    assert member not in json.dumps(received[2:])


async def test_a_members_export_holds_their_kept_events_and_where_each_stands(start_konvert, receiver, new_id):
    hooks, url = receiver
    konvert = await start_konvert()
    await konvert.endpoint(url, "crm", event_types=["points.earned"])
    member, other = new_id("m"), new_id("o")
    purchase = await konvert.purchase(member)
    await konvert.purchase(other)
    await konvert.publish()
    await konvert.endpoint(url, "down", event_types=["purchase.recorded"])
    hooks.status = 503
    later = await konvert.purchase(member)
    await konvert.publish()

    export = await konvert.call("GET", f"/v1/members/{member}/export", expect=200)

    kept = export["other"]["events"]
    assert [(e["type"], e["sequence"]) for e in kept] == [
        ("purchase.recorded", 1),
        ("points.earned", 2),
        ("purchase.recorded", 3),
        ("points.earned", 4),
    ]
    assert kept[0]["data"]["purchase_id"] == purchase["purchase_id"] and kept[0]["id"].startswith("evt_")
    assert kept[2]["data"]["purchase_id"] == later["purchase_id"]
    states = [[(d["endpoint_id"], d["status"]) for d in e["webhook_deliveries"]] for e in kept]
    assert states == [[], [("crm", "delivered")], [("down", "pending")], [("crm", "pending")]]
    assert kept[3]["webhook_deliveries"][0]["attempts"] == 1


async def test_an_endpoint_failing_for_days_is_disabled_with_an_event(start_konvert, receiver, new_id):
    hooks, url = receiver
    konvert = await start_konvert()
    await konvert.endpoint(url, "dead", event_types=["points.earned"])
    await konvert.endpoint(url, "alive", event_types=["webhook_endpoint.disabled"])
    hooks.script = [500] * 1000
    await konvert.purchase(new_id("m"))
    await konvert.publish()
    failing = await konvert.call("GET", "/v1/webhook-endpoints/dead")

    hooks.script = [500] * 1000
    for _ in range(3):
        konvert.advance(days=1)
        await konvert.purchase(new_id("m"))
        await konvert.publish()
    disabled = await konvert.call("GET", "/v1/webhook-endpoints/dead")
    hooks.script = []
    konvert.advance(seconds=601)
    await konvert.publish()

    assert failing["enabled"] and failing["failing_since"] is not None
    assert not disabled["enabled"] and "failed" in disabled["disabled_reason"]
    (announced,) = hooks.events()
    assert announced["type"] == "webhook_endpoint.disabled" and announced["member_id"] is None
    assert announced["data"]["endpoint_id"] == "dead"
    enabled = await konvert.call("PUT", "/v1/webhook-endpoints/dead", {"url": url}, expect=200)
    assert enabled["enabled"] and enabled["failing_since"] is None and enabled["secret"] is None


@LOCK_MODES
async def test_publishers_in_several_processes_send_each_event_once(start_konvert, receiver, new_id, lock_members):
    hooks, url = receiver
    konvert = await start_konvert(lock_members=lock_members)
    other = await start_konvert(lock_members=lock_members)
    await konvert.endpoint(url)
    for _ in range(20):
        await konvert.purchase(new_id("m"))

    await asyncio.gather(konvert.publish(), other.publish(), konvert.publish())

    ids = [e["id"] for e in hooks.events()]
    assert len(ids) == 40 and len(set(ids)) == 40


async def test_the_service_process_publishes_by_itself(start_konvert, receiver, new_id):
    hooks, url = receiver
    konvert = await start_konvert(events_publish=True, events_poll_interval_seconds=0.05)
    await konvert.endpoint(url, event_types=["points.earned"])
    await konvert.purchase(new_id("m"))

    await asyncio.wait_for(hooks.arrived.wait(), 30)

    assert [e["type"] for e in hooks.events()] == ["points.earned"]


async def test_konvert_events_publish_publishes_everything_due_and_stops(start_konvert, receiver, new_id):
    hooks, url = receiver
    konvert = await start_konvert()
    endpoint = await konvert.endpoint(url, event_types=["points.earned"])
    await konvert.purchase(new_id("m"))
    settings = konvert.services.settings
    env = {name: value for name, value in os.environ.items() if not name.startswith("KONVERT_")} | {
        "KONVERT_DATABASE_URL": settings.database_url,
        "KONVERT_REDIS_URL": settings.redis_url,
        "KONVERT_REDIS_KEY_PREFIX": settings.redis_key_prefix,
        "KONVERT_LOG_LEVEL": "warning",
        "KONVERT_WEBHOOK_ALLOW_PRIVATE_ADDRESSES": "true",
    }

    # Not subprocess.run: the receiver answers on this test's event loop meanwhile.
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "konvert", "events", "publish", env=env, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 120)

    assert process.returncode == 0 and b"events published" in stderr
    assert [e["type"] for e in hooks.verify(endpoint["secret"])] == ["points.earned"]
    stream = await konvert.services.redis.xlen(settings.events_stream_key)
    assert stream == 2
    await konvert.services.redis.delete(settings.events_stream_key)


async def test_endpoints_are_managed_by_an_admin(start_konvert, receiver):
    _, url = receiver
    konvert = await start_konvert()
    created = await konvert.endpoint(url, event_types=["points.earned", "tier.changed"])
    changed = await konvert.call("PUT", "/v1/webhook-endpoints/crm", {"url": url + "/v2", "enabled": False}, expect=200)
    listed = await konvert.call("GET", "/v1/webhook-endpoints", expect=200)
    bad = await konvert.client.put(
        "/v1/webhook-endpoints/x", json={"url": "ftp://nope", "event_types": ["nope"]}, headers=konvert.headers
    )
    await konvert.call("DELETE", "/v1/webhook-endpoints/crm", expect=204)
    await konvert.call("DELETE", "/v1/webhook-endpoints/crm", expect=204)
    gone = await konvert.client.get("/v1/webhook-endpoints/crm", headers=konvert.headers)

    assert created["event_types"] == ["points.earned", "tier.changed"]
    assert (changed["url"], changed["enabled"], changed["event_types"], changed["secret"]) == (
        url + "/v2",
        False,
        [],
        None,
    )
    assert [e["endpoint_id"] for e in listed["items"]] == ["crm"]
    assert (
        bad.status_code == 422 and await konvert.fetch("select 1 from webhook_endpoints where endpoint_id = 'x'") == []
    )
    assert gone.status_code == 404 and gone.json()["code"] == "webhook_endpoint_not_found"


async def test_endpoint_secrets_are_stored_sealed_and_plain_ones_still_sign(start_konvert, receiver, new_id):
    hooks, url = receiver
    konvert = await start_konvert(secret_key=Fernet.generate_key().decode(), webhook_secret_grace_seconds=0.0)
    created = await konvert.endpoint(url, event_types=["purchase.recorded"])
    rotated = await konvert.call("POST", "/v1/webhook-endpoints/crm/rotate-secret", expect=200)
    ((stored, previous),) = await konvert.fetch("select secret, previous_secret from webhook_endpoints")
    await konvert.purchase(new_id("m"))
    await konvert.publish()
    # An endpoint whose secret was stored before secrets were sealed: read as it is, then resealed.
    plain = "whsec_" + "B" * 43 + "="
    await konvert.endpoint(url, "legacy", event_types=["points.earned"])
    await konvert.fetch("update webhook_endpoints set secret = $1 where endpoint_id = 'legacy'", plain)
    await konvert.purchase(new_id("m"))
    await konvert.publish()
    resealed = await service.reseal(konvert.services)
    (legacy,) = await konvert.fetch("select secret from webhook_endpoints where endpoint_id = 'legacy'")

    assert stored.startswith("fernet:") and previous.startswith("fernet:")
    assert rotated["secret"] not in stored and created["secret"] not in previous
    by_type = {json.loads(body)["type"]: (headers, body) for headers, body in hooks.received}
    headers, body = by_type["purchase.recorded"]
    Webhook(rotated["secret"]).verify(body, headers)
    headers, body = by_type["points.earned"]
    Webhook(plain).verify(body, headers)
    assert resealed == 2 and legacy["secret"].startswith("fernet:") and plain not in legacy["secret"]


async def test_endpoints_that_point_into_the_network_are_refused(start_konvert):
    konvert = await start_konvert(webhook_allow_private_addresses=False)
    refused = {}
    for url in (
        "http://127.0.0.1:9/hooks",
        "http://localhost/hooks",
        "http://10.0.0.7/hooks",
        "https://169.254.169.254/latest",
        "http://[::1]/hooks",
        "http://[::ffff:192.168.0.1]/hooks",
    ):
        answer = await konvert.client.put("/v1/webhook-endpoints/x", json={"url": url}, headers=konvert.headers)
        refused[url] = (answer.status_code, answer.json()["code"], answer.headers["content-type"])
    not_http = await konvert.client.put(
        "/v1/webhook-endpoints/x", json={"url": "file:///etc/passwd"}, headers=konvert.headers
    )

    assert set(refused.values()) == {(422, "webhook_url_refused", "application/problem+json")}, refused
    assert not_http.status_code == 422 and not_http.json()["code"] == "validation_failed"
    assert await konvert.fetch("select 1 from webhook_endpoints") == []


async def test_a_delivery_to_an_address_refused_by_then_is_not_made(start_konvert, receiver, new_id):
    hooks, url = receiver
    allowing = await start_konvert()
    await allowing.endpoint(url, "literal", event_types=["points.earned"])
    await allowing.endpoint(url.replace("127.0.0.1", "localhost"), "named", event_types=["points.earned"])
    await allowing.purchase(new_id("m"))
    refusing = await start_konvert(webhook_allow_private_addresses=False)

    await refusing.publish()

    assert hooks.received == []
    messages = await refusing.fetch("select endpoint_id, status, last_error from webhook_messages order by 1")
    assert [(m["endpoint_id"], m["status"]) for m in messages] == [("literal", "pending"), ("named", "pending")]
    literal, named = (m["last_error"] for m in messages)
    assert "127.0.0.1 is a loopback address" in literal
    assert "localhost resolves to" in named and "loopback address" in named


def _plan_nodes(plan: dict[str, Any]) -> list[tuple[str, str | None]]:
    return [
        (plan["Node Type"], plan.get("Index Name")),
        *(node for child in plan.get("Plans", ()) for node in _plan_nodes(child)),
    ]


async def test_publishers_walk_their_indexes_however_many_events_are_kept(start_konvert, receiver):
    # A publisher looks for new events several times a second, and leases messages round after
    # round: neither may read every kept event or pending message (a scan, or a sort before the
    # limit), in the generic plan asyncpg's prepared statements come to.
    _, url = receiver
    konvert = await start_konvert()
    await konvert.endpoint(url)
    # 20,000 events numbered and published, and a few not numbered yet.
    await konvert.fetch(
        "insert into outbox_events (member_uid, type, data, occurred_at, position) "
        "select 0, 'webhook_endpoint.disabled', '{}', now(), p from generate_series(1, 20000) p"
    )
    await konvert.fetch(
        "insert into outbox_events (member_uid, type, data, occurred_at) "
        "select 0, 'webhook_endpoint.disabled', '{}', now() from generate_series(1, 5)"
    )
    await konvert.fetch(
        "insert into webhook_messages (endpoint_id, event_id, member_uid, next_attempt_at) "
        "select 'crm', event_id, member_uid, now() from outbox_events"
    )
    await konvert.fetch("update event_cursors set position = 20000")
    await konvert.fetch("analyze outbox_events")
    await konvert.fetch("analyze webhook_messages")
    now = konvert.now()
    plans = {}
    async with konvert.services.pool.acquire() as conn, conn.transaction():
        await conn.execute("set local plan_cache_mode = force_generic_plan")
        for name, statement, args in (
            ("look", store.LOOK_AFTER, (20000,)),
            ("look for unnumbered", store.LOOK_UNSEQUENCED, ()),
            ("number", store.SEQUENCE, (20000, 500, 0)),
            ("read", store.READ_AFTER, (19990, 500)),
            ("fan out", store.FAN_OUT, (19990, 500, now)),
            ("claim", store.CLAIM, ("crm", now, 64, now)),
            ("find", store.FIND_DUE_MESSAGES, ("crm", now, 64)),  # leasing one by one
        ):
            explained = await conn.fetchval(f"explain (format json) {statement}", *args)
            plans[name] = _plan_nodes(json.loads(explained)[0]["Plan"])

    # The look asks for the index's order with a limit: an exists() drops the order, and at other
    # statistics PostgreSQL then scans the table for a row that is not there.
    assert plans["look"][:2] == [("Limit", None), ("Index Only Scan", "outbox_events_position_idx")], plans["look"]
    for name in ("look for unnumbered", "number"):
        assert {"outbox_events_unsequenced_idx"} & {index for _, index in plans[name]}, plans[name]
    for name in ("read", "fan out"):
        assert ("Index Scan", "outbox_events_position_idx") in plans[name], plans[name]
    for name in ("claim", "find"):
        assert ("Index Scan", "webhook_messages_due_idx") in plans[name], plans[name]
    for name, nodes in plans.items():
        # The fan-out joins the endpoints, a table of a few rows, and sorts the batch's messages;
        # numbering sorts the two runs of its batch (past the last member numbered, then round).
        allowed = {"Seq Scan", "Sort"} if name == "fan out" else {"Sort"} if name == "number" else set()
        assert not {"Seq Scan", "Sort", "Incremental Sort"} - allowed & {node for node, _ in nodes}, (name, nodes)


# --- the catalogue ------------------------------------------------------------------------------


async def test_every_kind_of_change_is_announced(start_konvert, new_id):
    konvert = await start_konvert()
    member, fan = new_id("m"), new_id("fan")
    purchase = await konvert.purchase(member, occurred_at=konvert.now().isoformat())
    await konvert.purchase(
        member, lines=[{"line_id": "1", "sku": "B", "category": "books", "quantity": 1, "unit_price": 100_000}]
    )
    await konvert.call(
        "POST",
        f"/v1/purchases/{purchase['purchase_id']}/refunds",
        {"refund_id": "r1", "partner": "webshop", "amount": 500},
        expect=201,
    )
    await konvert.call(
        "POST",
        f"/v1/members/{member}/adjustments",
        {"adjustment_id": new_id("a"), "points": 100, "reason_code": "goodwill"},
        expect=201,
    )
    for n, hold in enumerate((False, True, True, True)):
        await konvert.call(
            "POST",
            f"/v1/members/{member}/redemptions",
            {"redemption_id": f"{member}-{n}", "points": 10, "hold": hold},
            expect=201,
        )
    await konvert.call("POST", f"/v1/redemptions/{member}-1/capture", expect=200)
    await konvert.call("POST", f"/v1/redemptions/{member}-2/release", expect=200)
    await konvert.call(
        "PUT", f"/v1/members/{member}/preferences/clothing_size", {"value": "M", "consent": ["support"]}, expect=200
    )
    await konvert.call("PUT", f"/v1/members/{member}/consents", {"purposes": {"marketing": True}}, expect=200)
    kudos = await konvert.call(
        "POST",
        "/v1/kudos",
        {
            "kudos_id": new_id("k"),
            "source": "forum",
            "kind": "like",
            "post_id": "p1",
            "thread_id": "t1",
            "author_id": member,
            "giver_id": fan,
            "occurred_at": konvert.now().isoformat(),
        },
        expect=201,
    )
    await konvert.call("DELETE", f"/v1/kudos/{kudos['kudos_id']}", expect=200)
    konvert.advance(days=200)  # the held redemption times out, and the first purchase vests
    await composition.JOBS["released_holds"](konvert.services)
    await composition.JOBS["vested_lots"](konvert.services)
    konvert.advance(days=160)
    await composition.JOBS["expiring_soon_announced"](konvert.services)
    konvert.advance(days=10)
    await composition.JOBS["expired_lots"](konvert.services)

    rows = await konvert.fetch(
        "select e.type, e.sequence, e.data::text as data from outbox_events e join members m using (member_uid) "
        "where m.member_id = $1 order by e.sequence",
        member,
    )
    types = [r["type"] for r in rows]
    assert [r["sequence"] for r in rows] == list(range(1, len(rows) + 1))
    for expected in (
        "purchase.recorded",
        "points.earned",
        "points.refunded",
        "points.adjusted",
        "points.redeemed",
        "redemption.held",
        "redemption.captured",
        "redemption.released",
        "redemption.expired",
        "preference.shared",
        "consent.changed",
        "kudos.received",
        "kudos.retracted",
        "points.vested",
        "points.expiring_soon",
        "points.expired",
    ):
        assert expected in types, expected
    for row in rows:  # every event's data is what the catalogue says it is
        msgspec.json.decode(row["data"], type=events.CATALOGUE[row["type"]])
    await composition.JOBS["expiring_soon_announced"](konvert.services)
    again = await konvert.fetch("select count(*) from outbox_events where type = 'points.expiring_soon'")
    assert again[0][0] == types.count("points.expiring_soon")  # once per lot
