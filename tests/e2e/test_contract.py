"""The API contract, against a running ``konvert serve``: the OpenAPI document describes what the
service really answers (schemathesis), a client generated from it works (openapi-python-client),
and the API docs need nothing from outside.

The server runs on a database of its own (schemathesis writes whatever it likes), under the
example program.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from konvert import auth
from konvert.contract import PROBLEMS, UNDOCUMENTED, documented_codes
from konvert.problems import PROBLEM_MEDIA_TYPE
from tests.conftest import _create_database, _drop_database
from tests.e2e.test_serve import READY_TIMEOUT_SECONDS, Server, bearer, konvert_env, konvert_serve

HERE = Path(__file__).parent / "contract"
# The schemathesis run's size: about a minute and a half on a 2-core machine.
SCHEMATHESIS_EXAMPLES = 25
SCHEMATHESIS_SECONDS_MAX = 240
# Codes no operation of the document can list: the base class's (raised by nothing), the answer to
# a method a path does not have (it has no operation), and the member portal's (HTML pages, not
# part of the API).
NEVER_ANSWERED = {"bad_request", "method_not_allowed", "portal_link_not_valid", "portal_session_ended"}


@pytest.fixture(scope="module")
async def contract_database(server_database_url: str, template_database: str) -> AsyncIterator[str]:
    name = f"konvert_contract_{uuid.uuid4().hex[:8]}"
    yield await _create_database(server_database_url, name, template_database)
    await _drop_database(server_database_url, name)


@pytest.fixture(scope="module")
async def admin_key(contract_database: str) -> str:
    conn = await asyncpg.connect(contract_database)
    try:
        key, _ = await auth.insert_key(conn, "contract", ["admin"])
    finally:
        await conn.close()
    return key


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, contract_database: str, redis_url: str) -> Iterator[Server]:
    env = konvert_env(
        KONVERT_DATABASE_URL=contract_database,
        KONVERT_REDIS_URL=redis_url,
        KONVERT_JOBS_INTERVAL_SECONDS="0",
        KONVERT_LOG_LEVEL="warning",
        # schemathesis sends requests without keys and with wrong ones, many of them.
        KONVERT_AUTH_FAILURES_PER_MINUTE="1000000",
    )
    with konvert_serve(tmp_path_factory.mktemp("contract"), env) as running:
        running.wait_ready(READY_TIMEOUT_SECONDS)
        yield running


@pytest.fixture(scope="module")
def document(server: Server) -> dict[str, Any]:
    response = httpx.get(f"{server.base_url}/schema/openapi.json", timeout=10)
    assert response.status_code == 200
    found: dict[str, Any] = response.json()
    return found


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            yield method.upper(), path, operation


def test_schemathesis_finds_no_server_error_and_no_undocumented_response(
    server: Server, admin_key: str, tmp_path: Path
) -> None:
    command = [
        *(sys.executable, "-m", "schemathesis.cli", "--config-file", str(HERE / "schemathesis.toml")),
        *("run", f"{server.base_url}/schema/openapi.json", "--header", f"Authorization: Bearer {admin_key}"),
        *("--checks", "all", "--mode", "all", "--phases", "examples,coverage,fuzzing,stateful"),
        *("--max-examples", str(SCHEMATHESIS_EXAMPLES), "--seed", "23", "--workers", "2"),
        *("--no-color", "--report", "junit", "--report-dir", str(tmp_path), "--generation-database", "none"),
    ]
    env = os.environ | {"SCHEMATHESIS_HOOKS": "tests.e2e.contract.schemathesis_hooks", "PYTHONPATH": str(Path.cwd())}
    started = time.monotonic()
    # In the test's directory: whatever schemathesis keeps (a crash cache) goes with it.
    run = subprocess.run(
        command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=SCHEMATHESIS_SECONDS_MAX
    )
    took = time.monotonic() - started

    summary = run.stdout[-20_000:]
    assert run.returncode == 0, summary
    assert re.search(r"Tested: 4\d", summary), summary  # every operation was reached
    print(f"schemathesis: {took:.0f} s\n{summary[-1500:]}")


def test_every_problem_code_is_documented_on_some_route(document: dict[str, Any]) -> None:
    documented = set()
    for _, _, operation in operations(document):
        for codes in documented_codes(operation).values():
            documented |= codes

    assert set(PROBLEMS) - UNDOCUMENTED - NEVER_ANSWERED - documented == set()


def test_each_problem_status_documents_codes_of_that_status(document: dict[str, Any]) -> None:
    wrong = [
        (method, path, status, code)
        for method, path, operation in operations(document)
        for status, codes in documented_codes(operation).items()
        for code in codes
        if PROBLEMS[code].status != status
    ]

    assert wrong == []


def test_public_routes_need_no_key_and_the_others_do(document: dict[str, Any]) -> None:
    public = {
        ("GET", "/health/live"),
        ("GET", "/health/ready"),
        ("GET", "/metrics"),
        ("POST", "/v1/integrations/{name}/webhooks"),
    }
    secured = {(method, path) for method, path, operation in operations(document) if operation.get("security")}

    assert "security" not in document
    assert secured == {(method, path) for method, path, _ in operations(document)} - public
    assert not any(path.startswith("/portal") for path in document["paths"])


def test_no_schema_admits_anything(document: dict[str, Any]) -> None:
    loose = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key in ("oneOf", "anyOf"):
                if any(arm == {} for arm in node.get(key, ())):
                    loose.append(where)
            if node.get("schema") == {}:
                loose.append(where)
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{where}/{index}")

    walk(document, "")

    assert loose == []


def test_bounds_of_dates_ids_and_amounts_are_documented(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    line = schemas["PurchaseLine"]["properties"]
    reward = schemas["RewardIn"]["properties"]

    assert (line["unit_price"]["minimum"], line["unit_price"]["maximum"]) == (0, 10**12)
    assert line["line_id"]["maxLength"] == 64 and "pattern" in line["line_id"]
    assert schemas["PurchaseIn"]["properties"]["lines"]["items"] == {"$ref": "#/components/schemas/PurchaseLine"}
    assert "2000-01-01" in json.dumps(reward["available_from"])


def test_an_absurd_reward_date_is_refused(server: Server, admin_key: str) -> None:
    response = httpx.put(
        f"{server.base_url}/v1/rewards/epoch",
        json={"name": "Epoch", "cost_points": 10, "available_from": "1970-01-01T00:00:00Z"},
        headers=bearer(admin_key),
        timeout=10,
    )

    assert response.status_code == 422
    assert response.headers["content-type"].startswith(PROBLEM_MEDIA_TYPE)
    assert "available_from" in response.json()["errors"][0]["message"]


def test_the_api_docs_load_nothing_from_outside(server: Server) -> None:
    page = httpx.get(f"{server.base_url}/schema", timeout=10)
    assert page.status_code == 200
    loaded = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)

    assert loaded, page.text[:500]
    assert [url for url in loaded if not url.startswith("/schema/assets/")] == []
    for url in loaded:
        asset = httpx.get(f"{server.base_url}{url}", timeout=10)
        assert asset.status_code == 200, url
        assert len(asset.content) > 100, url
    assert "SwaggerUIBundle" in httpx.get(f"{server.base_url}/schema/swagger", timeout=10).text


def test_a_generated_client_purchases_redeems_and_reads_a_balance(
    server: Server, admin_key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "openapi.json").write_text(httpx.get(f"{server.base_url}/schema/openapi.json", timeout=10).text)
    generated = subprocess.run(
        [
            *(sys.executable, "-m", "openapi_python_client", "generate"),
            *(
                "--path",
                str(tmp_path / "openapi.json"),
                "--meta",
                "none",
                "--output-path",
                str(tmp_path / "konvert_client"),
            ),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert generated.returncode == 0, generated.stdout + generated.stderr
    assert "will not be generated" not in generated.stdout, generated.stdout
    monkeypatch.syspath_prepend(str(tmp_path))
    client_module = importlib.import_module("konvert_client")
    purchases = importlib.import_module("konvert_client.api.purchases.v1_purchases_post_purchase")
    redeem = importlib.import_module("konvert_client.api.redemptions.v1_members_member_id_redemptions_redeem")
    capture = importlib.import_module("konvert_client.api.redemptions.v1_redemptions_redemption_id_capture_capture")
    balance = importlib.import_module("konvert_client.api.balances.v1_members_member_id_balance_balance")
    models = importlib.import_module("konvert_client.models")
    member_id = f"client-{uuid.uuid4().hex[:8]}"
    redemption_id = f"till-{uuid.uuid4().hex[:8]}"

    with client_module.AuthenticatedClient(base_url=server.base_url, token=admin_key) as client:
        purchase = purchases.sync(
            client=client,
            body=models.PurchaseIn.from_dict(
                {
                    "purchase_id": f"p-{uuid.uuid4().hex[:12]}",
                    "member_id": member_id,
                    "partner": "webshop",
                    "currency": "EUR",
                    "occurred_at": "2026-01-01T10:00:00Z",
                    "lines": [{"line_id": "1", "sku": "A", "category": "books", "quantity": 1, "unit_price": 1000}],
                }
            ),
        )
        held = redeem.sync(
            member_id,
            client=client,
            body=models.RedemptionIn.from_dict({"redemption_id": redemption_id, "points": 5, "hold": True}),
        )
        captured = capture.sync(redemption_id, client=client)
        read = balance.sync(member_id, client=client)

    assert isinstance(purchase, models.PurchaseOut), purchase
    assert (purchase.points, purchase.status) == (20, "available")
    assert isinstance(held, models.RedemptionOut), held
    assert (held.status, held.points) == ("held", 5)
    assert isinstance(captured, models.RedemptionOut), captured
    assert captured.status == "captured"
    assert isinstance(read, models.Balance), read
    assert (read.available, read.pending, read.held, read.lifetime_earned) == (15, 0, 0, 20)
