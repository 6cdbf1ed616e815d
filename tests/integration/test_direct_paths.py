"""Plain balance reads, purchase postings and liveness probes are answered without the framework
(app.KonvertApp, konvert.direct): the answers must be the routes' answers, byte for byte, and
anything else must reach the routes.

Each request goes to the app as configured and to the same app with its direct paths turned
off (the routes only), against the same PostgreSQL and Redis.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import httpx
import pytest

import konvert.app
from konvert.app import create_app
from konvert.health import serve_live_directly
from konvert.ledger.api import serve_balance_directly
from konvert.program import Program
from konvert.settings import Settings
from tests.conftest import AppClient, make_settings, purchase_body, serve

NewId = Callable[[str], str]


@pytest.fixture
async def routes_only(settings: Settings, program: Program) -> AsyncIterator[AppClient]:
    app = create_app(settings, program)
    app.direct_paths = False
    async with serve(app) as client:
        yield client


def comparable(response: httpx.Response) -> tuple[int, list[tuple[str, str]], Any]:
    """Status, headers (in order) and body, without what differs between any two responses
    anyway (the request id, the date)."""
    headers = []
    for raw_name, raw_value in response.headers.raw:
        name, value = raw_name.decode().lower(), raw_value.decode()
        if name in ("x-request-id", "date"):
            continue
        if name == "allow":  # the same methods, in whichever order the app's router lists them
            value = ", ".join(sorted(value.split(", ")))
        headers.append((name, value))
    body: Any = response.content
    if response.content and response.headers.get("content-type", "").startswith(
        ("application/json", "application/problem+json")
    ):
        body = json.loads(response.content)
        if isinstance(body, dict):
            body.pop("request_id", None)
    return response.status_code, headers, body


@pytest.fixture
async def member_with_points(post: Callable[..., Awaitable[httpx.Response]], new_id: NewId) -> str:
    member_id = new_id("direct")
    adjustment = {"adjustment_id": new_id("adj"), "points": 42, "reason_code": "goodwill"}
    created = await post(f"/v1/members/{member_id}/adjustments", adjustment)
    assert created.status_code == 201, created.text
    return member_id


async def test_every_kind_of_balance_request_gets_the_routes_answer(
    client: AppClient,
    routes_only: AppClient,
    admin_headers: dict[str, str],
    make_key: Callable[..., Awaitable[str]],
    member_with_points: str,
    new_id: NewId,
) -> None:
    reader = {"Authorization": f"Bearer {await make_key('members:read')}"}
    writer_only = {"Authorization": f"Bearer {await make_key('purchases:write')}"}
    balance = f"/v1/members/{member_with_points}/balance"
    cases = [
        ("GET", balance, admin_headers),  # the first read: PostgreSQL, then cached
        ("GET", balance, reader),  # a cache hit
        ("GET", f"{balance}?expiring_within_days=30", reader),
        ("GET", f"{balance}?expiring_within_days=-1", reader),
        ("GET", f"/v1/members/{new_id('nobody')}/balance", reader),  # 404
        ("GET", balance, {}),  # 401
        ("GET", balance, {"Authorization": "Bearer kvt_not-a-key"}),  # 401
        ("GET", balance, {"Authorization": "Basic dXNlcjpwYXNz"}),  # 401
        ("GET", balance, writer_only),  # 403
        ("GET", f"/v1/members/{'x' * 129}/balance", reader),  # too long
        ("GET", "/v1/members/bad%01id/balance", reader),  # a control character
        ("GET", "/v1/members/a%2Fb/balance", reader),  # a slash in the id
        ("GET", f"{balance}%0A", reader),  # a newline after the path
        ("GET", "/v1/members/ends-in-newline%0A/balance", reader),
        ("GET", balance, reader | {"Host": "a b/c"}),  # the framework refuses the Host header
        ("GET", "/health/live", {"Host": "<x>"}),
        ("GET", f"{balance}/", reader),
        ("HEAD", balance, reader),
        ("POST", balance, reader),
        ("GET", "/health/live", {}),
        ("HEAD", "/health/live", {}),
        ("POST", "/health/live", {}),
        ("GET", "/health/live/", {}),
        ("GET", "/health/live?via=router", {}),
    ]
    for method, path, headers in cases:
        direct = await client.request(method, path, headers=headers)
        routed = await routes_only.request(method, path, headers=headers)
        assert comparable(direct) == comparable(routed), (method, path)
        assert direct.headers["x-request-id"]


async def test_a_plain_read_is_answered_directly_and_a_refused_one_is_left_to_the_route(
    client: AppClient, admin_headers: dict[str, str], member_with_points: str, new_id: NewId
) -> None:
    services = client.app.state.services
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    def scope(path: str, authorization: str | None = admin_headers["Authorization"]) -> dict[str, Any]:
        headers = [(b"authorization", authorization.encode())] if authorization else []
        return {"type": "http", "method": "GET", "path": path, "query_string": b"", "headers": headers}

    assert await serve_balance_directly(services, scope(f"/v1/members/{member_with_points}/balance"), send)
    assert sent[0]["status"] == 200
    assert json.loads(sent[1]["body"])["available"] == 42

    # Taken on, so answered here, once: an unknown member's 404 (not read twice).
    sent.clear()
    assert await serve_balance_directly(services, scope(f"/v1/members/{new_id('nobody')}/balance"), send)
    assert sent[0]["status"] == 404
    assert json.loads(sent[1]["body"])["code"] == "member_not_found"

    sent.clear()
    assert not await serve_balance_directly(
        services, scope(f"/v1/members/{member_with_points}/balance", None), send
    )
    assert not await serve_live_directly(scope("/health/ready"), send)
    assert sent == []  # nothing sent: the routes answer those


async def test_direct_answers_are_counted_under_their_route(
    client: AppClient, admin_headers: dict[str, str], member_with_points: str
) -> None:
    assert (
        await client.get(f"/v1/members/{member_with_points}/balance", headers=admin_headers)
    ).status_code == 200
    assert (await client.get("/health/live")).status_code == 200
    posting = purchase_body(member_with_points, f"p-{member_with_points}")
    assert (await client.post("/v1/purchases", json=posting, headers=admin_headers)).status_code == 201

    metrics = (await client.get("/metrics")).text

    assert 'route="/v1/members/{member_id}/balance",status="200"' in metrics
    assert 'route="/health/live",status="200"' in metrics
    assert 'route="/v1/purchases",status="201"' in metrics


def record_direct_answers(
    monkeypatch: pytest.MonkeyPatch, name: str, answered: Callable[[Any], bool]
) -> list[bool]:
    """Whether each call of the app's direct answer ``name`` answered its request."""
    seen: list[bool] = []
    original = getattr(konvert.app, name)

    async def recording(*args: Any) -> Any:
        result = await original(*args)
        seen.append(answered(result))
        return result

    monkeypatch.setattr(konvert.app, name, recording)
    return seen


async def test_the_app_takes_the_direct_path_for_plain_reads_only(
    client: AppClient, admin_headers: dict[str, str], member_with_points: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    answered = record_direct_answers(monkeypatch, "serve_balance_directly", lambda taken: taken)
    path = f"/v1/members/{member_with_points}/balance"
    assert (await client.get(path, headers=admin_headers)).status_code == 200
    assert (await client.get(path)).status_code == 401
    assert (await client.get(f"{path}?expiring_within_days=7", headers=admin_headers)).status_code == 200

    assert answered == [True, False, False]


async def test_every_kind_of_purchase_request_gets_the_routes_answer(
    client: AppClient,
    routes_only: AppClient,
    admin_headers: dict[str, str],
    make_key: Callable[..., Awaitable[str]],
    new_id: NewId,
) -> None:
    writer = {"Authorization": f"Bearer {await make_key('purchases:write')}"}
    reader_only = {"Authorization": f"Bearer {await make_key('members:read')}"}
    member_id = new_id("direct-p")
    line = {"line_id": "1", "sku": "A", "category": "books", "quantity": 1, "unit_price": 1000}
    # (headers, body changes or raw bytes, content type, path): each sent to both apps with a
    # purchase id of its own, so that neither answer is the other's replay.
    cases: list[tuple[dict[str, str], Any, str, str]] = [
        (
            writer,
            {"lines": [line | {"quantity": "2"}]},
            "application/json",
            "/v1/purchases",
        ),  # lax, as the route
        (writer, {"shipping": -1}, "application/json", "/v1/purchases"),  # 422
        (writer, {"unknown": 1}, "application/json", "/v1/purchases"),  # 422
        (writer, {"occurred_at": "2026-01-01T10:00:00"}, "application/json", "/v1/purchases"),  # no offset
        (
            writer,
            {"occurred_at": "2999-01-01T10:00:00Z"},
            "application/json",
            "/v1/purchases",
        ),  # future: the service
        (writer, {"partner": "nobody"}, "application/json", "/v1/purchases"),  # the service refuses
        (writer, {"currency": "JPY"}, "application/json", "/v1/purchases"),  # no rate: the service
        (writer, b'{"purchase_id": ', "application/json", "/v1/purchases"),  # malformed
        (writer, b"", "application/json", "/v1/purchases"),  # empty
        (writer, b"[1, 2]", "application/json", "/v1/purchases"),  # not an object
        (writer, b"x" * (300 * 1024), "application/json", "/v1/purchases"),  # too large
        (writer, {}, "text/plain", "/v1/purchases"),  # 415
        (writer, {}, "application/json; charset=utf-8", "/v1/purchases"),
        ({}, {}, "application/json", "/v1/purchases"),  # 401
        (reader_only, {}, "application/json", "/v1/purchases"),  # 403
        (writer, {}, "application/json", "/v1/purchases?x=1"),
        (writer, {}, "application/json", "/v1/purchases/"),
        (writer, {"member_id": "ends-in-newline\n"}, "application/json", "/v1/purchases"),  # 422
        (writer, b"[" * 5000 + b"]" * 5000, "application/json", "/v1/purchases"),  # nested too deep
        (writer | {"Host": "a/b"}, {}, "application/json", "/v1/purchases"),  # the framework refuses the Host
    ]
    for headers, changes, content_type, path in cases:
        answers = []
        for app_client in (client, routes_only):
            if isinstance(changes, bytes):
                content = changes
            else:
                content = json.dumps(purchase_body(member_id, new_id("p"), **changes)).encode()
            answers.append(
                await app_client.post(path, content=content, headers=headers | {"content-type": content_type})
            )
        direct, routed = answers
        status, direct_headers, direct_body = comparable(direct)
        _, routed_headers, routed_body = comparable(routed)
        assert status == routed.status_code, (path, changes, direct.text, routed.text)
        if status >= 400:
            assert (direct_headers, direct_body) == (routed_headers, routed_body), (path, changes)
        else:  # two postings of their own: the same headers, the same points, other ids
            assert [n for n, _ in direct_headers] == [n for n, _ in routed_headers]
            same = ("points", "status", "lines", "bonus_points", "rules", "cap_applied")
            assert {k: direct_body[k] for k in same} == {k: routed_body[k] for k in same}, (path, changes)
    newline = purchase_body("ends-in-newline\n", new_id("p"))
    assert (await client.post("/v1/purchases", json=newline, headers=writer)).status_code == 422


async def test_a_direct_posting_replays_and_conflicts_as_the_route_does(
    client: AppClient, routes_only: AppClient, admin_headers: dict[str, str], new_id: NewId
) -> None:
    body = purchase_body(new_id("direct-r"), new_id("p"))
    first = await client.post("/v1/purchases", json=body, headers=admin_headers)
    assert first.status_code == 201 and "idempotent-replayed" not in first.headers

    replays = [await c.post("/v1/purchases", json=body, headers=admin_headers) for c in (client, routes_only)]
    assert comparable(replays[0]) == comparable(replays[1])
    assert replays[0].headers["idempotent-replayed"] == "true"
    assert replays[0].content == first.content

    changed = body | {"shipping": 100}
    conflicts = [
        await c.post("/v1/purchases", json=changed, headers=admin_headers) for c in (client, routes_only)
    ]
    assert conflicts[0].status_code == 409
    assert comparable(conflicts[0]) == comparable(conflicts[1])


async def test_the_app_takes_the_direct_path_for_well_formed_postings_only(
    client: AppClient, admin_headers: dict[str, str], new_id: NewId, monkeypatch: pytest.MonkeyPatch
) -> None:
    answered = record_direct_answers(monkeypatch, "serve_purchase_directly", lambda receive: receive is None)
    member_id = new_id("direct-w")
    ok = await client.post("/v1/purchases", json=purchase_body(member_id, new_id("p")), headers=admin_headers)
    future = purchase_body(member_id, new_id("p"), occurred_at="2999-01-01T10:00:00Z")
    refused = await client.post("/v1/purchases", json=future, headers=admin_headers)
    unknown = await client.post(
        "/v1/purchases", json=purchase_body(member_id, new_id("p"), extra=1), headers=admin_headers
    )

    assert (ok.status_code, refused.status_code, unknown.status_code) == (201, 422, 422)
    # Taken on: the posting, and the one the service refuses; left to the route: the bad body.
    assert answered == [True, True, False]


async def test_when_the_database_fails_the_answers_are_the_routes_answers(
    database_url: str, redis_url: str, program: Program, admin_headers: dict[str, str], new_id: NewId
) -> None:
    # Both apps wait at most 0.3 s for a statement; a lock held meanwhile makes them time out.
    settings = make_settings(database_url, redis_url, db_statement_timeout_seconds=0.3)
    direct_app, routed_app = create_app(settings, program), create_app(settings, program)
    routed_app.direct_paths = False
    locker = await asyncpg.connect(database_url)
    try:
        async with serve(direct_app) as direct, serve(routed_app) as routed:
            for table, path in (
                ("api_keys", f"/v1/members/{new_id('locked')}/balance"),  # the key cannot be looked up
                ("members", f"/v1/members/{new_id('locked')}/balance"),  # the balance cannot be read
            ):
                async with locker.transaction():
                    await locker.execute(f"lock table {table} in access exclusive mode")
                    answers = [await c.get(path, headers=admin_headers) for c in (direct, routed)]
                assert answers[0].status_code == 503, (table, answers[0].text)
                assert comparable(answers[0]) == comparable(answers[1]), table
    finally:
        await locker.close()


def test_the_app_configures_nothing_the_direct_answers_would_skip(
    settings: Settings, program: Program
) -> None:
    # Direct answers bypass the framework: a middleware, hook, CORS, host or header setting
    # added to the app would silently not apply to them. Adding one must fail here first, and
    # the direct answers must then do the same (or stop).
    app = create_app(settings, program)
    assert (
        app.middleware,
        app.allowed_hosts,
        app.response_headers,
        app.response_cookies,
        app.before_send,
    ) == ([], [], [], [], [])
    assert (app.before_request, app.after_request, app.after_response) == (None, None, None)
    assert (app.cors_config, app.csrf_config, app.compression_config) == (None, None, None)
