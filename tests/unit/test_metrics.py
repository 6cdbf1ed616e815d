"""konvert.observability: the request middleware's metrics and access log, requests matched to no
route, and the JSON log lines.

Metrics are recorded at once on prometheus_client's default registry (what ``/metrics``
renders), which is global to the process: every test compares a sample before and after its own
requests. (With several worker processes, prometheus_client's multiprocess mode merges the
workers' metrics: tests/e2e/test_serve.py.)"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import logging.config
import sys
import uuid
from collections.abc import Iterator
from typing import Annotated, Any

import httpx
import pytest
from litestar import Litestar, get, post
from litestar.params import PathParameter
from litestar.testing import AsyncTestClient
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from konvert import errors, serving
from konvert.app import create_app
from konvert.observability import (
    UNMATCHED,
    JsonFormatter,
    RequestObserver,
    configure_logging,
    request_id_var,
)
from konvert.problems import EXCEPTION_HANDLERS
from konvert.settings import Settings, load_settings

REQUESTS = "konvert_http_requests_total"
SECONDS = "konvert_http_request_duration_seconds"
# Routes of this file's own app, so that no other test's requests count under them.
BALANCE = "/t-metrics/members/{member_id}/balance"
SLOW = "/t-metrics/slow"
FAILING = "/t-metrics/failing"
PURCHASES = "/t-metrics/purchases"
SLOW_SECONDS = 0.03


def value(name: str, **labels: str) -> float:
    """A sample of the process's metrics (0 when it has none yet)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def every_label_value() -> set[str]:
    return {
        label
        for family in REGISTRY.collect()
        if family.name.startswith("konvert_")
        for sample in family.samples
        for label in sample.labels.values()
    }


@get("/t-metrics/members/{member_id:str}/balance", sync_to_thread=False)
def balance(member_id: Annotated[str, PathParameter()]) -> dict[str, Any]:
    if member_id.startswith("missing-"):
        raise errors.MemberNotFound(f"no member {member_id!r}")  # 404 from a route: not "unmatched"
    logging.getLogger("konvert.t-metrics").warning("read a balance", extra={"member": member_id})
    return {"member_id": member_id, "available": 20}


@post(PURCHASES, sync_to_thread=False)
def purchase() -> dict[str, Any]:
    return {"posted": True}


@get(SLOW)
async def slow() -> dict[str, Any]:
    await asyncio.sleep(SLOW_SECONDS)
    return {}


@get(FAILING, sync_to_thread=False)
def failing() -> dict[str, Any]:
    raise RuntimeError("a bug")


def observed_app(**settings: Any) -> Litestar:
    """An app wired as konvert.app.create_app wires its own: the request observer as middleware,
    konvert's exception handlers (which count requests matched to no route)."""
    return Litestar(
        route_handlers=[balance, purchase, slow, failing],
        middleware=[RequestObserver(load_settings({}, **settings))],
        exception_handlers=EXCEPTION_HANDLERS,
        logging_config=None,
    )


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    """What konvert's loggers write, as JSON lines (formatted while the request is served, as the
    real handler does), with the access log enabled."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    loggers = [logging.getLogger("konvert.access"), logging.getLogger("konvert.t-metrics")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)


def entries(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def test_requests_are_counted_by_method_route_template_and_status_never_by_member_id() -> None:
    members = [f"member-{uuid.uuid4().hex[:12]}" for _ in range(2)]
    missing = f"missing-{uuid.uuid4().hex[:12]}"
    ok = {"method": "GET", "route": BALANCE, "status": "200"}
    not_found = ok | {"status": "404"}
    posted = {"method": "POST", "route": PURCHASES, "status": "201"}
    unmatched = {"method": "GET", "route": UNMATCHED, "status": "404"}
    before = {
        key: value(REQUESTS, **labels)
        for key, labels in (("ok", ok), ("404", not_found), ("post", posted), ("unmatched", unmatched))
    }

    async with AsyncTestClient(observed_app()) as client:
        for member_id in members:
            assert (await client.get(f"/t-metrics/members/{member_id}/balance")).status_code == 200
        assert (await client.get(f"/t-metrics/members/{missing}/balance")).status_code == 404
        assert (await client.post(PURCHASES)).status_code == 201

    assert value(REQUESTS, **ok) - before["ok"] == 2
    assert value(REQUESTS, **not_found) - before["404"] == 1  # a route's own 404 counts under the route
    assert value(REQUESTS, **posted) - before["post"] == 1
    assert value(REQUESTS, **unmatched) == before["unmatched"]
    labels = every_label_value()
    assert not any(member in label for label in labels for member in [*members, missing])


async def test_request_durations_are_observed_per_method_and_route_template() -> None:
    labels = {"method": "GET", "route": SLOW}
    count, total = value(f"{SECONDS}_count", **labels), value(f"{SECONDS}_sum", **labels)
    fast_bucket = value(f"{SECONDS}_bucket", **labels, le="0.025")
    every_bucket = value(f"{SECONDS}_bucket", **labels, le="+Inf")

    async with AsyncTestClient(observed_app()) as client:
        for _ in range(2):
            assert (await client.get(SLOW)).status_code == 200

    assert value(f"{SECONDS}_count", **labels) - count == 2
    assert value(f"{SECONDS}_sum", **labels) - total >= 2 * SLOW_SECONDS
    assert value(f"{SECONDS}_bucket", **labels, le="0.025") == fast_bucket  # each took 30 ms or more
    assert value(f"{SECONDS}_bucket", **labels, le="+Inf") - every_bucket == 2


async def test_a_request_that_fails_is_counted_with_its_500_and_its_duration(caplog) -> None:
    labels = {"method": "GET", "route": FAILING}
    failed, count = value(REQUESTS, **labels, status="500"), value(f"{SECONDS}_count", **labels)

    with caplog.at_level(logging.CRITICAL, logger="konvert.errors"):  # its traceback is expected
        async with AsyncTestClient(observed_app()) as client:
            assert (await client.get(FAILING)).status_code == 500

    assert value(REQUESTS, **labels, status="500") - failed == 1
    assert value(f"{SECONDS}_count", **labels) - count == 1


async def test_the_real_app_counts_requests_matched_to_no_route_as_unmatched_without_a_duration() -> None:
    # create_app's wiring, without its lifespan: no route asked for here needs a database.
    settings = load_settings({}, database_url="postgresql://nobody@127.0.0.1:1/none", redis_url="redis://127.0.0.1:1/0")
    app = create_app(settings)
    path = f"/v1/nowhere/{uuid.uuid4().hex}"
    not_found = {"method": "GET", "route": UNMATCHED, "status": "404"}
    not_allowed = {"method": "POST", "route": UNMATCHED, "status": "405"}
    live = {"method": "GET", "route": "/health/live", "status": "200"}
    before = [value(REQUESTS, **labels) for labels in (not_found, not_allowed, live)]
    durations = value(f"{SECONDS}_count", method="GET", route=UNMATCHED)

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://konvert") as client:
        missing = await client.get(path)
        wrong_method = await client.post("/health/live")
        assert (await client.get("/health/live")).status_code == 200
        metrics = await client.get("/metrics")

    assert missing.status_code == 404 and missing.headers["x-request-id"]
    assert wrong_method.status_code == 405 and wrong_method.headers["x-request-id"]
    after = [value(REQUESTS, **labels) for labels in (not_found, not_allowed, live)]
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1]
    assert value(f"{SECONDS}_count", method="GET", route=UNMATCHED) == durations == 0  # counter only
    assert path not in every_label_value()
    # /metrics renders the same samples.
    rendered = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics.text)
        for sample in family.samples
    }
    assert rendered[(REQUESTS, tuple(sorted(not_found.items())))] == after[0]
    assert rendered[(REQUESTS, tuple(sorted(not_allowed.items())))] == after[1]


async def test_the_access_log_names_the_route_template_and_the_request_id(lines: io.StringIO) -> None:
    member_id = f"member-{uuid.uuid4().hex[:12]}"
    async with AsyncTestClient(observed_app()) as client:
        response = await client.get(f"/t-metrics/members/{member_id}/balance")
        unmatched = await client.get(f"/t-metrics/{member_id}")

    request_id = response.headers["x-request-id"]
    logged, access, access_unmatched = entries(lines)
    # A line logged while serving the request carries its request id and its extras.
    assert (logged["msg"], logged["request_id"], logged["member"]) == ("read a balance", request_id, member_id)
    assert access["logger"] == "konvert.access"
    assert access["request_id"] == request_id
    assert (access["method"], access["path"], access["status"]) == ("GET", BALANCE, 200)
    assert access["duration_ms"] >= 0
    assert member_id not in json.dumps(access)
    assert access_unmatched["request_id"] == unmatched.headers["x-request-id"]
    assert (access_unmatched["path"], access_unmatched["status"]) == (UNMATCHED, 404)
    assert member_id not in json.dumps(access_unmatched)


async def test_with_log_member_ids_the_access_log_has_the_path_but_metrics_still_the_template(
    lines: io.StringIO,
) -> None:
    member_id = f"member-{uuid.uuid4().hex[:12]}"
    async with AsyncTestClient(observed_app(log_member_ids=True)) as client:
        assert (await client.get(f"/t-metrics/members/{member_id}/balance")).status_code == 200

    access = [entry for entry in entries(lines) if entry["logger"] == "konvert.access"]
    assert [entry["path"] for entry in access] == [f"/t-metrics/members/{member_id}/balance"]
    assert member_id not in every_label_value()


# The JSON log lines.


def record(msg: str, *args: Any, extra: dict[str, Any] | None = None, exc_info: Any = None) -> logging.LogRecord:
    made = logging.getLogger("konvert.t-log").makeRecord(
        "konvert.t-log", logging.WARNING, __file__, 1, msg, args, exc_info, extra=extra
    )
    return made


def test_a_json_line_has_the_message_the_logger_the_level_the_pid_and_the_extras() -> None:
    line = JsonFormatter().format(record("spent %d points", 20, extra={"member_uid": 7, "code": "redeem"}))

    entry = json.loads(line)
    assert entry["msg"] == "spent 20 points"
    assert (entry["level"], entry["logger"]) == ("warning", "konvert.t-log")
    assert isinstance(entry["pid"], int) and entry["ts"].endswith("+00:00")
    assert (entry["member_uid"], entry["code"]) == (7, "redeem")
    assert "request_id" not in entry  # logged outside any request
    assert not {"args", "msg_args", "levelno", "pathname", "exc_info"} & entry.keys()


def test_a_json_line_has_the_request_id_of_the_request_being_served() -> None:
    token = request_id_var.set("req-0123456789")
    try:
        entry = json.loads(JsonFormatter().format(record("hello")))
    finally:
        request_id_var.reset(token)

    assert entry["request_id"] == "req-0123456789"


def test_a_message_or_traceback_over_several_lines_is_still_one_json_line() -> None:
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        line = JsonFormatter().format(record("first\nsecond", exc_info=sys.exc_info()))

    assert "\n" not in line
    entry = json.loads(line)
    assert entry["msg"] == "first\nsecond"
    assert "Traceback" in entry["exc"] and "ValueError: bad\nvalue" in entry["exc"]


@pytest.fixture
def logging_restored() -> Iterator[None]:
    """configure_logging and the server's log config change the root logger and Granian's: put
    them back afterwards."""
    loggers = [logging.getLogger(), logging.getLogger("_granian")]
    saved = [(logger.handlers[:], logger.level, logger.propagate) for logger in loggers]
    try:
        yield
    finally:
        for logger, (handlers, level, propagate) in zip(loggers, saved, strict=True):
            logger.handlers[:], logger.propagate = handlers, propagate
            logger.setLevel(level)


def configured(**settings: Any) -> Settings:
    return load_settings({}, **settings)


def configure_serve_logging(settings: Settings) -> None:
    """What ``konvert serve`` sets up: konvert's logging, and Granian's (it applies the dict)."""
    configure_logging(settings)
    logging.config.dictConfig(serving.log_config(settings))


def test_configured_json_logging_writes_konverts_and_the_servers_lines_as_json_to_stderr(
    capsys: pytest.CaptureFixture[str], logging_restored: None
) -> None:
    configure_serve_logging(configured(log_format="json", log_level="info"))
    logging.getLogger("_granian").info("Starting granian (main PID: %d)", 42)
    logging.getLogger("_granian.serve").warning("Worker crash loop detected, exiting")
    logging.getLogger("konvert.t-log").info("jobs ran", extra={"expired": 3})
    logging.getLogger("konvert.t-log").debug("below the level")

    written = capsys.readouterr().err.splitlines()
    assert [(entry["logger"], entry["msg"]) for entry in map(json.loads, written)] == [
        ("_granian", "Starting granian (main PID: 42)"),
        ("_granian.serve", "Worker crash loop detected, exiting"),
        ("konvert.t-log", "jobs ran"),
    ]
    assert json.loads(written[2])["expired"] == 3


def test_configured_text_logging_writes_a_line_with_the_extras(
    capsys: pytest.CaptureFixture[str], logging_restored: None
) -> None:
    configure_serve_logging(configured(log_format="text", log_level="info"))
    logging.getLogger("konvert.t-log").info("jobs ran", extra={"expired": 3})
    logging.getLogger("_granian").info("Started")

    assert capsys.readouterr().err.splitlines() == [
        "INFO    konvert.t-log: jobs ran expired=3",
        "INFO    _granian: Started",
    ]
