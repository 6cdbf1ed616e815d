"""Plain balance reads and liveness probes are answered without the framework (app.KonvertApp):
the answers must be the routes' answers, byte for byte, and anything else must reach the routes.

Each request goes to the app as configured and to the same app with its direct paths turned
off (the routes only), against the same PostgreSQL and Redis.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

import konvert.app
from konvert.app import create_app
from konvert.health import serve_live_directly
from konvert.ledger.api import serve_balance_directly
from konvert.program import Program
from konvert.settings import Settings
from tests.conftest import AppClient, serve

NewId = Callable[[str], str]


@pytest.fixture
async def routes_only(settings: Settings, program: Program) -> AsyncIterator[AppClient]:
    app = create_app(settings, program)
    app.direct_paths = False
    async with serve(app) as client:
        yield client


def comparable(response: httpx.Response) -> tuple[int, dict[str, str], Any]:
    """Status, headers and body, without what differs between any two responses anyway."""
    headers = {k: v for k, v in response.headers.items() if k not in ("x-request-id", "date")}
    if "allow" in headers:  # the same methods, in whichever order the app's router lists them
        headers["allow"] = ", ".join(sorted(headers["allow"].split(", ")))
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


async def test_a_plain_read_is_answered_directly_and_an_error_is_left_to_the_route(
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

    sent.clear()
    assert not await serve_balance_directly(services, scope(f"/v1/members/{new_id('nobody')}/balance"), send)
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


async def test_the_app_takes_the_direct_path_for_plain_reads_only(
    client: AppClient, admin_headers: dict[str, str], member_with_points: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    answered: list[bool] = []
    original = konvert.app.serve_balance_directly

    async def recording(*args: Any) -> bool:
        answered.append(await original(*args))
        return answered[-1]

    monkeypatch.setattr(konvert.app, "serve_balance_directly", recording)
    path = f"/v1/members/{member_with_points}/balance"
    assert (await client.get(path, headers=admin_headers)).status_code == 200
    assert (await client.get(path)).status_code == 401
    assert (await client.get(f"{path}?expiring_within_days=7", headers=admin_headers)).status_code == 200

    assert answered == [True, False, False]


def purchase_body(member_id: str, purchase_id: str, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "purchase_id": purchase_id,
        "member_id": member_id,
        "partner": "webshop",
        "currency": "EUR",
        "occurred_at": "2026-01-01T10:00:00Z",
        "lines": [{"line_id": "1", "sku": "A", "category": "books", "quantity": 1, "unit_price": 1000}],
    }
    return body | changes


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
        assert status == routed.status_code, (path, changes, direct.text, routed.text)
        assert direct_headers.keys() == comparable(routed)[1].keys(), (path, changes)
        if status >= 400:
            assert direct_body == comparable(routed)[2], (path, changes)
        else:
            assert direct_body.keys() == comparable(routed)[2].keys()


async def test_a_direct_posting_replays_and_conflicts_as_the_route_does(
    client: AppClient, routes_only: AppClient, admin_headers: dict[str, str], new_id: NewId
) -> None:
    body = purchase_body(new_id("direct-r"), new_id("p"))
    first = await client.post("/v1/purchases", json=body, headers=admin_headers)
    assert first.status_code == 201 and "idempotent-replayed" not in first.headers

    replays = [await c.post("/v1/purchases", json=body, headers=admin_headers) for c in (client, routes_only)]
    assert [comparable(r) for r in replays][0] == comparable(replays[1])
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
    answered: list[bool] = []
    original = konvert.app.serve_purchase_directly

    async def recording(*args: Any) -> Any:
        receive = await original(*args)
        answered.append(receive is None)
        return receive

    monkeypatch.setattr(konvert.app, "serve_purchase_directly", recording)
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
