"""Request ids, JSON structured logs, the access log and Prometheus metrics."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import re
import sys
import time
from datetime import UTC, datetime
from typing import Any, TypeVar

import msgspec
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.routes import HTTPRoute
from litestar.types import ASGIApp, HTTPScope, Message, Receive, ReceiveMessage, Scope, Send
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess

from konvert import errors
from konvert.settings import Settings

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

# Whether the client of the request being served went away before it was answered (a list: set
# by the request's receive, read by its exception handler and the access log).
_client_gone_var: contextvars.ContextVar[list[bool]] = contextvars.ContextVar("client_gone")
# The status counted and logged for a request whose client went away first (nginx's choice).
CLIENT_CLOSED_REQUEST = 499

REQUEST_ID_HEADER = b"x-request-id"
# A client may send its own request id (to correlate with its logs) if it looks like one.
_CLIENT_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{8,128}$")
# Requests the router matched to no route (404, 405) are counted under this route label.
UNMATCHED = "unmatched"

REQUESTS = Counter("konvert_http_requests_total", "HTTP requests served", ["method", "route", "status"])
REQUEST_SECONDS = Histogram(
    "konvert_http_request_duration_seconds",
    "Time to serve an HTTP request (requests matched to a route)",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
# Balance reads by where the body came from: the Redis cache, or PostgreSQL (a cache miss, which
# then fills the cache). Their ratio is the cache's hit ratio.
BALANCE_READS = Counter("konvert_balance_reads_total", "Balance reads by where they were served from", ["source"])
# Group-committed writes (konvert.batching): items written together in their batch's
# transaction, or alone because their batch failed. Many "alone" mean batches that keep failing.
BATCHED_WRITES = Counter("konvert_batched_writes_total", "Group-committed writes by how they were written", ["how"])

# Webhook deliveries by the integration's kind and what became of them: applied, ignored,
# parked, failed, duplicate, or invalid_signature (refused with 401, nothing else recorded).
WEBHOOK_DELIVERIES = Counter(
    "konvert_webhook_deliveries_total", "Webhook deliveries received, by outcome", ["kind", "outcome"]
)

access_log = logging.getLogger("konvert.access")

# Attributes every LogRecord has; anything else was passed with extra= and goes into the line.
_LEFT_OUT = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_json = msgspec.json.Encoder()


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _LEFT_OUT and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the request id of the request being served."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,  # which worker process, with several
        }
        if request_id := request_id_var.get():
            entry["request_id"] = request_id
        entry |= _extras(record)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return _json.encode(entry).decode(errors="replace")


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{record.levelname:<7} {record.name}: {record.getMessage()}"
        if request_id := request_id_var.get():
            line += f" request_id={request_id}"
        line += "".join(f" {k}={v}" for k, v in _extras(record).items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(settings: Settings) -> None:
    """Every log line of the process through one handler on stderr (the HTTP server's own lines
    are routed here by ``serving.log_config``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    # The embedded PostgreSQL narrates every command it runs; its warnings and errors still show.
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    # asyncpg's pool says when it cannot reconnect (backing off up to a minute): a line, not a traceback.
    logging.getLogger("asyncpg.pool").addFilter(_without_traceback)


def _without_traceback(record: logging.LogRecord) -> bool:
    if record.exc_info and record.exc_info[1] is not None:
        record.error = repr(record.exc_info[1])
        record.exc_info = record.exc_text = None
    return True


class ThrottledLog:
    """A warning per kind of failure at most every ``seconds``, counting the ones it left out: a
    dependency that is down fails every request the same way, and a line (or a traceback) per
    request would bury everything else in the log."""

    def __init__(self, logger: logging.Logger, seconds: float = 5.0) -> None:
        self._log = logger
        self._seconds = seconds
        self._last: dict[str, float] = {}
        self._left_out: dict[str, int] = {}

    def warning(self, message: str, kind: str, **extra: Any) -> None:
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self._seconds:
            self._left_out[kind] = self._left_out.get(kind, 0) + 1
            return
        self._last[kind] = now
        left_out = self._left_out.pop(kind, 0)
        self._log.warning(message, extra={"kind": kind, "left_out": left_out, **extra})


def new_request_id(headers: Any) -> str:
    for name, value in headers:
        if name == REQUEST_ID_HEADER and _CLIENT_REQUEST_ID.match(value):
            return str(value.decode())
    return os.urandom(12).hex()


class RequestObserver(ASGIMiddleware):
    """On every request matched to a route: a request id on the response and on every log line,
    its metrics under the route template, and the access log line."""

    scopes = (ScopeType.HTTP,)

    def __init__(self, settings: Settings) -> None:
        self._log_paths = settings.log_member_ids
        self._body_seconds = settings.body_read_timeout_seconds

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        if scope["type"] != ScopeType.HTTP:  # never: scopes names HTTP only
            await next_app(scope, receive, send)
            return
        request_id = new_request_id(scope["headers"])
        token = request_id_var.set(request_id)
        gone = [False]
        gone_token = _client_gone_var.set(gone)
        started = time.perf_counter()
        status = 500
        answering = False
        header = (REQUEST_ID_HEADER, request_id.encode())

        body_deadline = asyncio.get_running_loop().time() + self._body_seconds

        async def receive_noting_disconnects() -> ReceiveMessage:
            # The body must arrive by its deadline: a client dripping it holds no worker for long.
            try:
                async with asyncio.timeout_at(None if answering else body_deadline):
                    message = await receive()
            except TimeoutError:
                raise errors.RequestTimeout(
                    f"the request body did not arrive within {self._body_seconds:g} s"
                ) from None
            if message["type"] == "http.disconnect":
                gone[0] = True
            return message

        async def send_with_request_id(message: Message) -> None:
            nonlocal status, answering
            if message["type"] == "http.response.start":
                status, answering = message["status"], True
                message["headers"] = [*message.get("headers", ()), header]
                if scope["method"] == "OPTIONS" and status == 204:
                    message["headers"] = _allowing(scope, message["headers"])
            await send(message)

        try:
            await next_app(scope, receive_noting_disconnects, send_with_request_id)
        finally:
            if gone[0] and status >= 500:  # the client left mid-request: nothing failed here
                status = CLIENT_CLOSED_REQUEST
            elapsed = time.perf_counter() - started
            # Route templates (/v1/members/{member_id}/balance) keep member ids out of metric
            # labels and, unless configured otherwise, out of the access log.
            route = scope["path_template"]
            _child(_TIMED, REQUEST_SECONDS, (scope["method"], route)).observe(elapsed)
            _served(scope, route, status, scope["path"] if self._log_paths else route, elapsed)
            _client_gone_var.reset(gone_token)
            request_id_var.reset(token)


def _allowing(scope: Scope, headers: Any) -> list[tuple[bytes, bytes]]:
    """The headers of an answer to OPTIONS with every method of the route in ``Allow``.

    Litestar's automatic OPTIONS handler of a path whose methods were registered one by one
    (every controller's are) lists only the methods registered before it was made.
    """
    allowed = {
        route.path_format: ", ".join(sorted(route.methods))
        for route in scope["litestar_app"].routes
        if isinstance(route, HTTPRoute)
    }.get(scope["path_template"])
    if allowed is None:
        return list(headers)
    return [(name, value) for name, value in headers if name.lower() != b"allow"] + [(b"allow", allowed.encode())]


def client_gone() -> bool:
    """Whether the client of the request being served disconnected before its answer."""
    gone = _client_gone_var.get(None)
    return gone is not None and gone[0]


def observe_unmatched(scope: HTTPScope, status: int) -> str:
    """A request the router matched to no route (which no middleware sees): counted, logged, and
    given a request id, returned for its response."""
    request_id = new_request_id(scope["headers"])
    _served(scope, UNMATCHED, status, UNMATCHED, None, request_id)
    return request_id


# Each metric's child per label values, found once: labels() takes a lock and builds a key.
_TIMED: dict[tuple[str, str], Histogram] = {}  # (method, route)
_COUNTED: dict[tuple[str, str, int], Counter] = {}  # (method, route, status)
Metric = TypeVar("Metric", Counter, Histogram)


def _child(children: dict[Any, Metric], metric: Metric, labels: tuple[Any, ...]) -> Metric:
    child = children.get(labels)
    if child is None:
        child = children[labels] = metric.labels(*labels)
    return child


def _served(
    scope: HTTPScope, route: str, status: int, path: str, seconds: float | None, request_id: str | None = None
) -> None:
    _child(_COUNTED, REQUESTS, (scope["method"], route, status)).inc()
    if access_log.isEnabledFor(logging.INFO):
        extra: dict[str, Any] = {"method": scope["method"], "path": path, "status": status}
        if seconds is not None:
            extra["duration_ms"] = round(seconds * 1000, 3)
        if request_id is not None:  # not the request being served in this context: name it
            extra["request_id"] = request_id
        access_log.info("request", extra=extra)


def render_metrics() -> bytes:
    """The Prometheus exposition; with several worker processes, merged across them."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest()
