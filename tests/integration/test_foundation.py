"""The service foundation: problem+json errors, request ids, health, metrics, OpenAPI, house rules,
migrations and the keys CLI, all against real PostgreSQL and Redis.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import httpx
import msgspec
import pytest
from litestar import Litestar
from litestar.handlers import HTTPRouteHandler
from litestar.routes import HTTPRoute
from litestar.testing import AsyncTestClient
from prometheus_client.parser import text_string_to_metric_families

from konvert import auth, db, errors
from konvert.app import create_app
from konvert.errors import ConfigurationError
from konvert.events import rules
from konvert.events import store as events_store
from konvert.program import Program
from konvert.settings import Settings
from tests.conftest import AppClient, make_settings, purchase_body, serve

PROBLEM_MEDIA_TYPE = "application/problem+json"
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
SQL_DIR = Path(__file__).resolve().parents[2] / "sql"
UNREACHABLE_REDIS_URL = "redis://127.0.0.1:1/0"

MakeKey = Callable[..., Awaitable[str]]
NewId = Callable[[str], str]


def with_line(member_id: str, **line_changes: Any) -> dict[str, Any]:
    body = purchase_body(member_id)
    body["lines"] = [body["lines"][0] | line_changes]
    return body


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The response is RFC 9457 problem+json with konvert's stable code and the request id."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].split(";")[0] == PROBLEM_MEDIA_TYPE
    problem = response.json()
    assert problem["status"] == status
    assert problem["code"] == code
    assert problem["type"] == f"urn:konvert:problem:{code}"
    assert isinstance(problem["title"], str) and problem["title"]
    assert problem["request_id"]
    assert problem["request_id"] == response.headers["x-request-id"]
    return problem


def field_names(problem: dict[str, Any]) -> list[str]:
    return [error["field"] for error in problem.get("errors") or []]


async def key_id_of(conn: asyncpg.Connection, key: str) -> int:
    return await conn.fetchval("select key_id from api_keys where secret_hash = $1", auth.hash_key(key))


# Authentication and authorisation.


async def test_no_key_is_401(client: AppClient) -> None:
    response = await client.get("/v1/members/x/balance")

    assert_problem(response, 401, "unauthenticated")


@pytest.mark.parametrize(
    "authorization",
    [
        "Basic dXNlcjpwYXNz",
        "Bearer",
        "Bearer kvt_",
        "kvt_" + "a" * 43,
        "Bearer not-a-konvert-key",
        "Bearer kvt_" + "a" * 200,
    ],
)
async def test_a_malformed_authorization_header_is_401(client: AppClient, authorization: str) -> None:
    response = await client.get("/v1/members/x/balance", headers={"Authorization": authorization})

    assert_problem(response, 401, "unauthenticated")


async def test_an_unknown_key_is_401(client: AppClient) -> None:
    response = await client.get("/v1/members/x/balance", headers=bearer(auth.generate_key()))

    assert_problem(response, 401, "unauthenticated")


async def test_an_unknown_key_is_remembered_and_not_looked_up_again(
    database_url: str, redis_url: str, program: Program, make_key: MakeKey
) -> None:
    settings = make_settings(database_url, redis_url, auth_cache_seconds=60)
    key = auth.generate_key()
    async with serve(create_app(settings, program)) as client:
        assert_problem(await client.get("/v1/rewards", headers=bearer(key)), 401, "unauthenticated")
        # The key becomes valid in the database behind the process's back...
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(
                "insert into api_keys (name, prefix, secret_hash, scopes) values ('late', $1, $2, $3)",
                key[:12],
                auth.hash_key(key),
                ["members:read"],
            )
        finally:
            await conn.close()
        # ...and the process, which remembers it as unknown, does not look it up again.
        assert_problem(await client.get("/v1/rewards", headers=bearer(key)), 401, "unauthenticated")
    async with serve(create_app(settings, program)) as fresh:  # (a process that never saw it)
        assert (await fresh.get("/v1/rewards", headers=bearer(key))).status_code == 200


async def test_a_flood_of_unknown_keys_does_not_push_out_the_valid_ones(
    database_url: str, make_key: MakeKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "_CACHE_ENTRIES_MAX", 50)  # (small, so that the flood is cheap)
    key = await make_key("members:read", name="busy")
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        verifier = auth.KeyVerifier(pool, 60, failures_per_minute=1000)
        assert (await verifier.authenticate(f"Bearer {key}", "shop")).name == "busy"
        async with pool.acquire() as conn:  # revoked: only a remembered key still passes now
            assert await auth.revoke_key(conn, await key_id_of(conn, key))
        for _ in range(200):
            with pytest.raises(errors.Unauthenticated):
                await verifier.authenticate(f"Bearer {auth.generate_key()}", "attacker")

        assert (await verifier.authenticate(f"Bearer {key}", "shop")).name == "busy"
    finally:
        await pool.close()


async def test_a_client_whose_keys_keep_failing_is_429_with_retry_after(
    database_url: str, redis_url: str, program: Program, make_key: MakeKey
) -> None:
    settings = make_settings(database_url, redis_url, auth_cache_seconds=60, auth_failures_per_minute=5)
    valid = await make_key("members:read")
    async with serve(create_app(settings, program)) as client:
        assert (await client.get("/v1/rewards", headers=bearer(valid))).status_code == 200
        for _ in range(5):
            assert_problem(await client.get("/v1/rewards", headers=bearer(auth.generate_key())), 401, "unauthenticated")

        refused = await client.get("/v1/rewards", headers=bearer(auth.generate_key()))
        assert_problem(refused, 429, "rate_limited")
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        # A key the client used successfully lately still works.
        assert (await client.get("/v1/rewards", headers=bearer(valid))).status_code == 200


async def test_a_revoked_key_is_401(
    client: AppClient, make_key: MakeKey, database_url: str, settings: Settings
) -> None:
    assert settings.auth_cache_seconds == 0  # so revocation shows on the next request
    key = await make_key("members:read", name="soon revoked")
    assert (await client.get("/v1/members/x/balance", headers=bearer(key))).status_code != 401

    conn = await asyncpg.connect(database_url)
    try:
        assert await auth.revoke_key(conn, await key_id_of(conn, key))
    finally:
        await conn.close()

    assert_problem(await client.get("/v1/members/x/balance", headers=bearer(key)), 401, "unauthenticated")


async def test_a_key_lacking_the_scope_is_403(client: AppClient, make_key: MakeKey) -> None:
    key = await make_key("kudos:write")

    response = await client.get("/v1/members/x/balance", headers=bearer(key))

    problem = assert_problem(response, 403, "forbidden")
    assert "members:read" in problem["detail"]


async def test_an_admin_key_may_use_every_scope(client: AppClient, admin_headers: dict[str, str]) -> None:
    response = await client.get("/v1/members/nobody-here/balance", headers=admin_headers)

    assert_problem(response, 404, "member_not_found")


# Errors outside the handlers: routing, method, body size, media type, JSON, validation.


async def test_an_unknown_route_is_404(client: AppClient, admin_headers: dict[str, str]) -> None:
    response = await client.get("/v1/no-such-thing", headers=admin_headers)

    assert_problem(response, 404, "not_found")


async def test_a_wrong_method_is_405_with_allow(client: AppClient, admin_headers: dict[str, str]) -> None:
    response = await client.delete("/v1/members/x/balance", headers=admin_headers)

    assert_problem(response, 405, "method_not_allowed")
    assert "GET" in response.headers["allow"]


async def test_a_body_larger_than_the_limit_is_413(
    client: AppClient, admin_headers: dict[str, str], settings: Settings
) -> None:
    body = b'{"purchase_id": "' + b"x" * settings.request_max_body_bytes + b'"}'

    response = await client.post(
        "/v1/purchases", content=body, headers=admin_headers | {"content-type": "application/json"}
    )

    assert_problem(response, 413, "payload_too_large")


async def test_a_body_that_is_not_json_is_415(client: AppClient, admin_headers: dict[str, str], new_id: NewId) -> None:
    body = msgspec.json.encode(purchase_body(new_id("m")))

    response = await client.post("/v1/purchases", content=body, headers=admin_headers | {"content-type": "text/plain"})

    assert_problem(response, 415, "unsupported_media_type")


@pytest.mark.parametrize("body", [b"{bad", b'{"purchase_id": "p1"', b"", b"\xff\xfe"])
async def test_malformed_json_is_400(client: AppClient, admin_headers: dict[str, str], body: bytes) -> None:
    response = await client.post(
        "/v1/purchases", content=body, headers=admin_headers | {"content-type": "application/json"}
    )

    assert_problem(response, 400, "malformed_request")


# (body, the field the error names, what its message names): an unknown or missing field is
# reported at the object that has it (or lacks it), its message naming it.
INVALID_PURCHASES: dict[str, tuple[Callable[[str], dict[str, Any]], str, str]] = {
    "wrong type": (lambda m: purchase_body(m, partner=5), "partner", "str"),
    "unknown field": (lambda m: purchase_body(m, loyalty_tier="gold"), "body", "loyalty_tier"),
    "unknown field in a line": (lambda m: with_line(m, colour="red"), "lines[0]", "colour"),
    "negative quantity": (lambda m: with_line(m, quantity=-1), "lines[0].quantity", ">= 1"),
    "huge quantity": (lambda m: with_line(m, quantity=10**20), "lines[0].quantity", "<= 100000"),
    "huge unit price": (lambda m: with_line(m, unit_price=10**30), "lines[0].unit_price", "int"),
    "fractional price": (lambda m: with_line(m, unit_price=9.99), "lines[0].unit_price", "int"),
    "time without offset": (
        lambda m: purchase_body(m, occurred_at="2026-01-01T10:00:00"),
        "occurred_at",
        "timezone",
    ),
    "missing field": (lambda m: {k: v for k, v in purchase_body(m).items() if k != "currency"}, "body", "currency"),
    "missing field in a line": (lambda m: purchase_body(m, lines=[{"line_id": "1"}]), "lines[0]", "sku"),
}


@pytest.mark.parametrize("case", INVALID_PURCHASES)
async def test_an_invalid_body_is_422_naming_the_field(
    client: AppClient, admin_headers: dict[str, str], new_id: NewId, case: str
) -> None:
    make_body, field, named = INVALID_PURCHASES[case]

    response = await client.post("/v1/purchases", json=make_body(new_id("m")), headers=admin_headers)

    problem = assert_problem(response, 422, "validation_failed")
    assert [error["message"] for error in problem["errors"] if error["field"] == field]
    assert any(named in error["message"] for error in problem["errors"] if error["field"] == field), problem


async def test_json_types_are_not_coerced(client: AppClient, admin_headers: dict[str, str], new_id: NewId) -> None:
    # "1" for an integer, 0 for a boolean: refused as the OpenAPI document says, not converted.
    line = {"line_id": "1", "sku": "A", "category": "books", "quantity": "1", "unit_price": 1000}
    purchase = await client.post(
        "/v1/purchases", json=purchase_body(new_id("coerce"), lines=[line]), headers=admin_headers
    )
    endpoint = await client.put(
        f"/v1/webhook-endpoints/{new_id('coerce')}",
        json={"url": "https://crm.example.com/konvert", "enabled": 0},
        headers=admin_headers,
    )

    assert assert_problem(purchase, 422, "validation_failed")["errors"][0]["field"] == "lines[0].quantity"
    assert assert_problem(endpoint, 422, "validation_failed")["errors"][0]["field"] == "enabled"


@pytest.mark.parametrize("body", [[1, 2], None, "purchase"])
async def test_a_body_that_is_not_an_object_is_422(
    client: AppClient, admin_headers: dict[str, str], body: object
) -> None:
    response = await client.post(
        "/v1/purchases",
        content=msgspec.json.encode(body),
        headers=admin_headers | {"content-type": "application/json"},
    )

    problem = assert_problem(response, 422, "validation_failed")
    assert field_names(problem) == ["body"]


REFUSALS: dict[str, Callable[[str, dict[str, str]], dict[str, Any]]] = {
    "invalid body (422)": lambda m, h: {"json": with_line(m, quantity=-1), "headers": h},
    "text/plain body (415)": lambda m, h: {
        "content": msgspec.json.encode(purchase_body(m)),
        "headers": h | {"content-type": "text/plain"},
    },
    "no key (401)": lambda m, h: {"json": purchase_body(m)},
}


@pytest.mark.parametrize("refusal", REFUSALS)
async def test_a_refused_purchase_writes_nothing(
    client: AppClient, admin_headers: dict[str, str], new_id: NewId, refusal: str
) -> None:
    member_id = new_id("refused")

    response = await client.post("/v1/purchases", **REFUSALS[refusal](member_id, admin_headers))

    assert response.status_code in (401, 415, 422)
    assert_problem(await client.get(f"/v1/members/{member_id}/balance", headers=admin_headers), 404, "member_not_found")


async def test_a_key_without_the_write_scope_writes_nothing(
    client: AppClient, admin_headers: dict[str, str], make_key: MakeKey, new_id: NewId
) -> None:
    member_id = new_id("refused")
    reader = await make_key("members:read")

    response = await client.post("/v1/purchases", json=purchase_body(member_id), headers=bearer(reader))

    assert_problem(response, 403, "forbidden")
    assert_problem(await client.get(f"/v1/members/{member_id}/balance", headers=admin_headers), 404, "member_not_found")


# Request ids.


async def test_a_request_id_is_generated_when_absent(client: AppClient) -> None:
    first = await client.get("/health/live")
    second = await client.get("/health/live")

    assert len(first.headers["x-request-id"]) >= 16
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


async def test_a_valid_client_request_id_is_echoed(client: AppClient) -> None:
    request_id = f"checkout-{uuid.uuid4().hex}"

    response = await client.get("/v1/members/x/balance", headers={"X-Request-ID": request_id})

    assert response.headers["x-request-id"] == request_id
    assert assert_problem(response, 401, "unauthenticated")["request_id"] == request_id


@pytest.mark.parametrize("request_id", ["short", "has spaces in it", "x" * 129, "semi;colon;ids", "ünïcödé-id"])
async def test_an_invalid_client_request_id_is_replaced(client: AppClient, request_id: str) -> None:
    response = await client.get("/health/live", headers={"X-Request-ID": request_id.encode()})

    assert len(response.headers["x-request-id"]) >= 16
    assert response.headers["x-request-id"] != request_id


async def test_every_response_carries_exactly_one_request_id(client: AppClient) -> None:
    response = await client.get("/health/live", headers={"X-Request-ID": "client-supplied-id"})

    assert response.headers.get_list("x-request-id") == ["client-supplied-id"]


# Health, and running without Redis.


async def test_liveness_is_200(client: AppClient) -> None:
    response = await client.get("/health/live")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readiness_is_200_when_postgres_and_redis_answer(client: AppClient) -> None:
    response = await client.get("/health/ready")

    assert response.status_code == 200
    assert response.json() == {"status": "ok", "postgres": {"ok": True}, "redis": {"ok": True}}


@pytest.fixture(scope="module")
async def redisless_client(database_url: str, program: Program) -> AsyncIterator[AsyncTestClient]:
    """The real app with Redis pointing at a port nobody listens on."""
    settings = make_settings(database_url, UNREACHABLE_REDIS_URL)
    async with AsyncTestClient(create_app(settings, program)) as test_client:
        yield test_client


async def test_readiness_is_503_naming_redis_when_redis_is_unreachable(
    redisless_client: AppClient,
) -> None:
    response = await redisless_client.get("/health/ready")

    assert response.status_code == 503
    readiness = response.json()
    assert readiness["status"] == "unavailable"
    assert readiness["postgres"] == {"ok": True}
    assert readiness["redis"]["ok"] is False
    assert readiness["redis"]["error"]


async def test_writes_and_reads_work_without_redis(
    redisless_client: AppClient, admin_headers: dict[str, str], new_id: NewId
) -> None:
    member_id = new_id("no-redis")

    first = await redisless_client.post("/v1/purchases", json=purchase_body(member_id), headers=admin_headers)
    assert first.status_code == 201, first.text
    assert first.json()["points"] == 20
    balance = await redisless_client.get(f"/v1/members/{member_id}/balance", headers=admin_headers)
    assert balance.status_code == 200
    assert balance.json()["available"] == 20
    assert balance.json()["lifetime_earned"] == 20

    # A second write is read back at once: no stale cache stands in the way.
    second = await redisless_client.post("/v1/purchases", json=purchase_body(member_id), headers=admin_headers)
    assert second.status_code == 201, second.text
    balance = await redisless_client.get(f"/v1/members/{member_id}/balance", headers=admin_headers)
    assert balance.json()["available"] == 40


# Metrics.


def requests_total(metrics_text: str) -> list[dict[str, str]]:
    """The label sets of every konvert_http_requests_total sample."""
    return [
        sample.labels
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name == "konvert_http_requests_total"
    ]


async def test_metrics_count_requests_by_route_template_not_member_id(
    client: AppClient, admin_headers: dict[str, str], new_id: NewId
) -> None:
    member_id = new_id("metrics")
    await client.get(f"/v1/members/{member_id}/balance", headers=admin_headers)

    response = await client.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert member_id not in response.text
    assert {"method": "GET", "route": "/v1/members/{member_id}/balance", "status": "404"} in requests_total(
        response.text
    )


def balance_reads(metrics_text: str) -> dict[str, float]:
    return {
        sample.labels["source"]: sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name == "konvert_balance_reads_total"
    }


async def test_metrics_count_balance_reads_by_where_they_were_served_from(
    client: AppClient, admin_headers: dict[str, str], post: Any, new_id: NewId
) -> None:
    member_id = new_id("reads")
    adjustment = {"adjustment_id": new_id("adj"), "points": 5, "reason_code": "goodwill"}
    created = await post(f"/v1/members/{member_id}/adjustments", adjustment)
    assert created.status_code == 201, created.text
    before = balance_reads((await client.get("/metrics")).text)

    for _ in range(3):  # a miss (PostgreSQL, then cached), then two cache hits
        assert (await client.get(f"/v1/members/{member_id}/balance", headers=admin_headers)).status_code == 200

    after = balance_reads((await client.get("/metrics")).text)
    assert after["database"] - before.get("database", 0) == 1
    assert after["redis"] - before.get("redis", 0) == 2


async def test_metrics_label_unknown_urls_as_unmatched(client: AppClient, new_id: NewId) -> None:
    path = f"/{new_id('no-such-page')}"
    await client.get(path)

    response = await client.get("/metrics")

    assert path not in response.text
    assert {"method": "GET", "route": "unmatched", "status": "404"} in requests_total(response.text)


# Schema.

# Plain b-tree indexes whose key columns lead another index on the same table: every lookup the
# shorter one serves, the longer serves too, and each write pays for both.
_REDUNDANT_INDEXES = """
select a.indexrelid::regclass::text as redundant, b.indexrelid::regclass::text as covered_by
from pg_index a
join pg_index b on b.indrelid = a.indrelid and b.indexrelid <> a.indexrelid
join pg_class ia on ia.oid = a.indexrelid join pg_am ama on ama.oid = ia.relam
join pg_class ib on ib.oid = b.indexrelid join pg_am amb on amb.oid = ib.relam
join pg_class t on t.oid = a.indrelid join pg_namespace n on n.oid = t.relnamespace
where n.nspname = current_schema()
  and ama.amname = 'btree' and amb.amname = 'btree'
  and not a.indisunique and a.indpred is null and b.indpred is null
  and a.indexprs is null and b.indexprs is null
  and a.indnkeyatts <= b.indnkeyatts
  and (a.indkey::int2[])[0:a.indnkeyatts - 1] = (b.indkey::int2[])[0:a.indnkeyatts - 1]
"""


async def test_no_index_is_a_prefix_of_another(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        redundant = [dict(r) for r in await conn.fetch(_REDUNDANT_INDEXES)]
        # The check finds what it is for: a redundant index made here is reported.
        await conn.execute("create index check_redundant_idx on purchases (member_uid, created_at, purchase_pk)")
        try:
            found = {r["redundant"] for r in await conn.fetch(_REDUNDANT_INDEXES)}
        finally:
            await conn.execute("drop index check_redundant_idx")
    finally:
        await conn.close()
    assert redundant == []
    assert "purchases_member_created_points_idx" in found


# OpenAPI.


async def test_the_openapi_document_is_json_with_the_api_paths(client: AppClient) -> None:
    response = await client.get("/schema/openapi.json")

    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.")
    assert "/v1/members/{member_id}/balance" in document["paths"]
    assert "post" in document["paths"]["/v1/purchases"]
    assert "apiKey" in document["components"]["securitySchemes"]


async def test_the_interactive_api_docs_are_html(client: AppClient) -> None:
    response = await client.get("/schema")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "<html" in response.text.lower()


# House rules: a walk over every route of the real app.


@pytest.fixture(scope="module")
def app(settings: Settings, program: Program) -> Litestar:
    return create_app(settings, program)


def handlers(app: Litestar) -> Iterator[tuple[HTTPRoute, HTTPRouteHandler]]:
    """konvert's own route handlers, without the OPTIONS and OpenAPI handlers Litestar adds itself."""
    for route in app.routes:
        assert isinstance(route, HTTPRoute), f"{route.path}: only HTTP routes are expected"
        for handler in route.route_handlers:
            if not handler.fn.__module__.startswith("litestar."):
                yield route, handler


def api_handlers(app: Litestar) -> list[tuple[HTTPRoute, HTTPRouteHandler]]:
    # Webhook receivers are public: their signature is their authentication (tested on their own).
    found = [
        (route, handler)
        for route, handler in handlers(app)
        if route.path.startswith("/v1/") and not handler.opt.get("public")
    ]
    assert found, "no /v1 routes: the walk would prove nothing"
    return found


def concrete_path(route: HTTPRoute) -> str:
    """The route's path with a placeholder for each path parameter."""
    values = {name: "1" if p.type is int else "placeholder" for name, p in route.path_parameters.items()}
    return route.path_format.format(**values)


def name_of(route: HTTPRoute, handler: HTTPRouteHandler) -> str:
    return f"{'/'.join(sorted(handler.http_methods))} {route.path}"


def test_every_route_is_documented(app: Litestar) -> None:
    undocumented = [
        name_of(route, handler)
        for route, handler in handlers(app)
        if not route.path.startswith("/schema") and not (handler.fn.__doc__ or "").strip()
    ]

    assert undocumented == []


def test_every_api_route_declares_a_known_scope(app: Litestar) -> None:
    without_scope = [
        name_of(route, handler) for route, handler in api_handlers(app) if handler.opt.get("scope") not in auth.SCOPES
    ]

    assert without_scope == []


async def test_every_api_route_answers_401_without_a_key(client: AppClient, app: Litestar) -> None:
    answers = {}
    for route, handler in api_handlers(app):
        for method in sorted(handler.http_methods):
            response = await client.request(method, concrete_path(route))
            answers[f"{method} {route.path}"] = (response.status_code, response.json().get("code"))

    assert answers == {name: (401, "unauthenticated") for name in answers}


def test_every_api_write_declares_its_idempotency_key(app: Litestar) -> None:
    # The key is a field of the body (purchase_id) or, where the URL names what is written
    # (PUT /v1/rewards/{reward_id}), a path parameter.
    offenders = []
    for route, handler in api_handlers(app):
        if not handler.http_methods & WRITE_METHODS or handler.opt.get("writes") is False:
            continue
        body = handler.parsed_fn_signature.parameters.get("data")
        body_fields = set(getattr(body.annotation, "__struct_fields__", ())) if body is not None else set()
        if handler.opt.get("idempotency_key") not in body_fields | set(route.path_parameters):
            offenders.append(name_of(route, handler))

    assert offenders == []


async def test_every_api_route_is_in_the_openapi_document(client: AppClient, app: Litestar) -> None:
    paths = (await client.get("/schema/openapi.json")).json()["paths"]

    missing = [
        f"{method} {route.path_format}"
        for route, handler in api_handlers(app)
        for method in handler.http_methods - {"OPTIONS", "HEAD"}
        if method.lower() not in paths.get(route.path_format, {})
    ]

    assert missing == []


# Migrations, on databases of their own.


@pytest.fixture
async def empty_database_url(server_database_url: str) -> AsyncIterator[str]:
    """A new database with nothing in it, dropped afterwards."""
    name = f"konvert_empty_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(server_database_url)
    try:
        await conn.execute(f"create database {name}")
    finally:
        await conn.close()
    yield urlunsplit(urlsplit(server_database_url)._replace(path=f"/{name}"))
    conn = await asyncpg.connect(server_database_url)
    try:
        await conn.execute(f"drop database if exists {name} with (force)")
    finally:
        await conn.close()


def migration_files() -> list[tuple[int, str, str]]:
    """(version, name, sha256 of the text) of each file in sql/, worked out without konvert.db."""
    files = sorted(SQL_DIR.glob("*.sql"))
    assert files, f"no migrations in {SQL_DIR}"
    return [
        (int(path.name[:4]), path.stem[5:], hashlib.sha256(path.read_text("utf-8").encode()).hexdigest())
        for path in files
    ]


async def recorded_migrations(url: str) -> list[tuple[int, str, str]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("select version, name, checksum from schema_migrations order by version")
        return [(r["version"], r["name"], r["checksum"]) for r in rows]
    finally:
        await conn.close()


async def test_migrate_applies_every_file_to_an_empty_database(empty_database_url: str) -> None:
    conn = await asyncpg.connect(empty_database_url)
    try:
        applied = await db.migrate(conn)
        tables = {
            r["tablename"] for r in await conn.fetch("select tablename from pg_tables where schemaname = 'public'")
        }
    finally:
        await conn.close()

    assert [(m.version, m.name, m.checksum) for m in applied] == migration_files()
    assert await recorded_migrations(empty_database_url) == migration_files()
    assert {"schema_migrations", "api_keys", "members", "transfers"} <= tables


async def test_migrate_again_applies_nothing(empty_database_url: str) -> None:
    await db.migrate_url(empty_database_url)

    assert await db.migrate_url(empty_database_url) == []
    assert await recorded_migrations(empty_database_url) == migration_files()


async def test_events_kept_across_the_move_to_positions_are_numbered_in_the_order_they_were_read(
    empty_database_url: str,
) -> None:
    """sql/0009: the kept events get positions in the (xid, event_id) order the publishers and the
    feed followed until then, and each cursor the position of the last event it had passed."""
    migrations = db.load_migrations()
    before = [m for m in migrations if m.version < 9]
    conn = await asyncpg.connect(empty_database_url)
    try:
        await db.migrate(conn, before)
        # Three transactions, whose event ids run the other way round from their order.
        for event_id in (30, 10, 20):
            await conn.execute(
                "insert into outbox_events (event_id, member_uid, type, data, occurred_at) overriding system value "
                "values ($1, 0, 'webhook_endpoint.disabled', '{}', now())",
                event_id,
            )
        await conn.execute(
            "update event_cursors set (xid, event_id) = (select xid, event_id from outbox_events where event_id = 10)"
            " where name = 'stream'"
        )
        await db.migrate(conn, migrations)
        numbered = dict(await conn.fetch("select event_id, position from outbox_events"))
        cursors = dict(await conn.fetch("select name, position from event_cursors"))
        # A feed cursor given out before: the event it points past.
        page = await events_store.select_feed(conn, rules.LegacyCursor(10), 10)
    finally:
        await conn.close()

    assert numbered == {30: 1, 10: 2, 20: 3}
    assert cursors == {"stream": 2, "webhooks": 0, "sequencer": 3}
    assert [row["event_id"] for row in page.rows] == [20] and page.reached == 3


async def test_concurrent_migrations_apply_each_file_exactly_once(empty_database_url: str) -> None:
    first, second = await asyncio.gather(db.migrate_url(empty_database_url), db.migrate_url(empty_database_url))

    assert sorted(m.version for m in first + second) == [version for version, _, _ in migration_files()]
    assert await recorded_migrations(empty_database_url) == migration_files()


async def test_a_changed_migration_is_refused(empty_database_url: str) -> None:
    await db.migrate_url(empty_database_url)
    conn = await asyncpg.connect(empty_database_url)
    try:
        await conn.execute("update schema_migrations set checksum = 'x' where version = 1")

        with pytest.raises(ConfigurationError, match="0001"):
            await db.migrate(conn)
        # The lock is released even so: a corrected run is not blocked.
        held = "select count(*) from pg_locks where locktype = 'advisory' and pid = pg_backend_pid()"
        assert await conn.fetchval(held) == 0
    finally:
        await conn.close()


async def test_a_database_of_a_replaced_migration_is_refused_with_what_to_do(empty_database_url: str) -> None:
    conn = await asyncpg.connect(empty_database_url)
    try:
        await db.migrate(conn)
        await conn.execute("update schema_migrations set name = 'api_keys' where version = 1")

        with pytest.raises(ConfigurationError, match=r"0001_api_keys.*earlier release"):
            await db.migrate(conn)
    finally:
        await conn.close()


# The keys CLI and start-up errors, as real processes.


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def konvert_env(**variables: str) -> dict[str, str]:
    """The test's environment without any KONVERT_* variable, plus the given ones."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("KONVERT_")}
    return env | variables


def run_konvert(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "konvert", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def cli_env(database_url: str, redis_url: str) -> dict[str, str]:
    return konvert_env(KONVERT_DATABASE_URL=database_url, KONVERT_REDIS_URL=redis_url)


def create_key_with_cli(cli_env: dict[str, str], name: str, *scopes: str) -> str:
    result = run_konvert("keys", "create", "--name", name, "--scope", *scopes, env=cli_env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def list_keys(cli_env: dict[str, str]) -> str:
    result = run_konvert("keys", "list", env=cli_env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def listed_key(listing: str, name: str) -> list[str]:
    """The `keys list` line of the key called ``name``, split into its columns."""
    lines = [line.split("\t") for line in listing.splitlines() if f"\t{name}\t" in line]
    assert len(lines) == 1, listing
    return lines[0]


async def test_keys_create_prints_the_key_and_stores_only_its_hash(
    cli_env: dict[str, str], database_url: str, new_id: NewId
) -> None:
    name = new_id("ci")
    result = run_konvert("keys", "create", "--name", name, "--scope", "members:read", env=cli_env)

    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    assert key.startswith("kvt_")
    assert result.stdout == key + "\n"
    assert key not in result.stderr
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("select k.secret_hash, k.scopes, row_to_json(k)::text as row_text from api_keys k")
    finally:
        await conn.close()
    assert not [row for row in rows if key in row["row_text"]]
    stored = [row for row in rows if row["secret_hash"] == hashlib.sha256(key.encode()).digest()]
    assert len(stored) == 1
    assert stored[0]["scopes"] == ["members:read"]


def test_keys_list_shows_the_prefix_but_never_the_key(cli_env: dict[str, str], new_id: NewId) -> None:
    name = new_id("ci")
    key = create_key_with_cli(cli_env, name, "members:read")

    listing = list_keys(cli_env)

    assert key not in listing
    _, prefix, listed_name, scopes, partners, purposes, state = listed_key(listing, name)
    assert key.startswith(prefix.rstrip("…"))
    assert len(prefix.rstrip("…")) < len(key)
    assert (listed_name, scopes, partners, purposes, state) == (
        name,
        "members:read",
        "any partner",
        "any purpose",
        "active",
    )


def test_keys_create_binds_a_key_to_partners(cli_env: dict[str, str], new_id: NewId) -> None:
    name = new_id("ci")
    created = run_konvert(
        "keys", "create", "--name", name, "--scope", "purchases:write", "--partner", "webshop", env=cli_env
    )

    assert created.returncode == 0, created.stderr
    assert listed_key(list_keys(cli_env), name)[4] == "webshop"


def test_keys_create_binds_a_key_to_purposes(cli_env: dict[str, str], new_id: NewId) -> None:
    name = new_id("ci")
    created = run_konvert(
        "keys", "create", "--name", name, "--scope", "members:read", "--purpose", "marketing", "support", env=cli_env
    )

    assert created.returncode == 0, created.stderr
    assert listed_key(list_keys(cli_env), name)[5] == "marketing support"


def test_keys_create_refuses_a_purpose_the_program_does_not_have(cli_env: dict[str, str], new_id: NewId) -> None:
    name = new_id("ci")
    result = run_konvert("keys", "create", "--name", name, "--scope", "members:read", "--purpose", "spam", env=cli_env)

    assert result.returncode == 2
    assert "spam" in result.stderr
    assert name not in list_keys(cli_env)


def test_keys_create_refuses_an_unknown_scope(cli_env: dict[str, str]) -> None:
    result = run_konvert("keys", "create", "--name", "ci", "--scope", "everything", env=cli_env)

    assert result.returncode == 2
    assert "everything" in result.stderr
    assert result.stdout == ""


async def test_a_cli_key_authenticates_until_revoked(
    client: AppClient, admin_headers: dict[str, str], cli_env: dict[str, str], new_id: NewId
) -> None:
    member_id = new_id("cli")
    created = await client.post("/v1/purchases", json=purchase_body(member_id), headers=admin_headers)
    assert created.status_code == 201, created.text
    name = new_id("ci")
    key = create_key_with_cli(cli_env, name, "members:read")

    balance = await client.get(f"/v1/members/{member_id}/balance", headers=bearer(key))
    assert balance.status_code == 200, balance.text
    assert balance.json()["available"] == 20

    key_id = listed_key(list_keys(cli_env), name)[0]
    revoked = run_konvert("keys", "revoke", key_id, env=cli_env)
    assert revoked.returncode == 0, revoked.stderr
    assert listed_key(list_keys(cli_env), name)[-1].startswith("revoked")
    assert_problem(await client.get(f"/v1/members/{member_id}/balance", headers=bearer(key)), 401, "unauthenticated")


def test_revoking_an_unknown_key_fails(cli_env: dict[str, str]) -> None:
    result = run_konvert("keys", "revoke", str(2**62), env=cli_env)

    assert result.returncode == 1
    assert str(2**62) in result.stderr


def assert_one_line_config_error(result: subprocess.CompletedProcess[str], *names: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for name in names:
        assert name in lines[0]


def test_a_bad_setting_stops_migrate_with_one_line(cli_env: dict[str, str]) -> None:
    result = run_konvert("migrate", env=cli_env | {"KONVERT_PORT": "abc"})

    assert_one_line_config_error(result, "KONVERT_PORT")


def test_an_unknown_setting_stops_migrate_with_one_line(cli_env: dict[str, str]) -> None:
    result = run_konvert("migrate", env=cli_env | {"KONVERT_PROT": "8000"})

    assert_one_line_config_error(result, "KONVERT_PROT")


def test_a_bad_program_file_stops_serve_with_one_line(cli_env: dict[str, str], tmp_path: Path) -> None:
    program_file = tmp_path / "program.toml"
    program_file.write_text('name = "P"\n\n[[partners]]\nid = "shop"\n\n[points]\nreturn_window_dayz = 3\n', "utf-8")

    result = run_konvert("serve", "--port", str(free_port()), env=cli_env | {"KONVERT_PROGRAM_FILE": str(program_file)})

    assert_one_line_config_error(result, "return_window_dayz", str(program_file))


def test_migrate_on_the_migrated_database_reports_up_to_date(cli_env: dict[str, str]) -> None:
    result = run_konvert("migrate", env=cli_env)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "database is up to date"


async def test_cors_preflight_options_is_answered_without_a_key(client):
    for path in ("/health/live", "/v1/rewards", "/v1/purchases"):
        response = await client.options(path)
        assert response.status_code in (200, 204), (path, response.text)
        assert "allow" in response.headers


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/purchases"),
        ("POST", "/v1/purchases/preview"),
        ("POST", "/v1/kudos"),
        ("PUT", "/v1/members/{member}/consents"),
    ],
)
async def test_json_nested_deeper_than_the_decoder_goes_is_400(
    client: AppClient, admin_headers: dict[str, str], new_id: NewId, database_url: str, method: str, path: str
) -> None:
    member_id = new_id("deep")
    body = b"[" * 5000 + b"]" * 5000  # 10 kB, within the size limit
    response = await client.request(
        method,
        path.format(member=member_id),
        content=body,
        headers=admin_headers | {"content-type": "application/json"},
    )

    problem = assert_problem(response, 400, "malformed_request")
    assert problem["detail"] == "the request body is nested too deeply"
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM members WHERE member_id = $1", member_id) == 0
    finally:
        await conn.close()


# Values no path parameter may take: too long for any id, a line break (header and log
# injection), and a right-to-left override (an id that displays as another).
BAD_PATH_VALUES = {"too long": "a" * 300, "CR/LF": "a\r\nb", "RTL override": "abc\u202egpj"}


@pytest.mark.parametrize("bad", sorted(BAD_PATH_VALUES))
async def test_every_path_parameter_is_validated_like_a_body(
    client: AppClient, app: Litestar, admin_headers: dict[str, str], bad: str
) -> None:
    answers = {}
    walked = 0
    for route, handler in handlers(app):
        names = [name for name, p in route.path_parameters.items() if p.type is str]
        if not route.path.startswith("/v1/") or not names:
            continue
        for name in names:
            # Other parameters get a valid value of their type (an int where a route takes one).
            values = {other: "1" if p.type is int else "placeholder" for other, p in route.path_parameters.items()}
            values[name] = quote(BAD_PATH_VALUES[bad], safe="")
            for method in sorted(handler.http_methods):
                walked += 1
                response = await client.request(
                    method, route.path_format.format(**values), json={}, headers=admin_headers
                )
                problem = response.json() if response.content else {}  # (a 204 has no body)
                fields = [e["field"] for e in problem.get("errors") or ()]
                answers[f"{method} {route.path} {name}"] = (response.status_code, problem.get("code"), name in fields)

    assert walked >= 20, "too few routes with path parameters: the walk would prove nothing"
    assert answers == {where: (422, "validation_failed", True) for where in answers}
