"""Request ids, JSON structured logs, the access log and Prometheus metrics."""

from __future__ import annotations

import contextvars
import logging
import os
import re
import sys
import time
from datetime import UTC, datetime
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess

from konvert.settings import Settings

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

REQUEST_ID_HEADER = b"x-request-id"
# A client may send its own request id (to correlate with its logs) if it looks like one.
_CLIENT_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{8,128}$")

REQUESTS = Counter("konvert_http_requests_total", "HTTP requests served", ["method", "route", "status"])
REQUEST_SECONDS = Histogram(
    "konvert_http_request_duration_seconds",
    "Time to serve an HTTP request",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)

# Purchase batches (konvert.earning.service.write_purchase_batch): postings settled by the
# optimistic rounds, left for a next round because their member changed meanwhile, or written
# one by one under a lock. Many "retried" or "alone" mean members written to from everywhere.
PURCHASE_POSTINGS = Counter(
    "konvert_purchase_batch_postings_total", "Purchase postings by how their batch settled them", ["how"]
)

# Balance reads by where the body came from: the Redis cache, or PostgreSQL (a cache miss,
# which then fills the cache). Their ratio is the cache's hit ratio.
BALANCE_READS = Counter("konvert_balance_reads_total", "Balance reads by where they were served from", ["source"])
BALANCE_READS_REDIS = BALANCE_READS.labels("redis")
BALANCE_READS_DATABASE = BALANCE_READS.labels("database")

access_log = logging.getLogger("konvert.access")

# Attributes every LogRecord has; anything else was passed with extra= and goes into the JSON.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_json = msgspec.json.Encoder()


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
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return _json.encode(entry).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRIBUTES and not k.startswith("_")}
        request_id = request_id_var.get()
        line = f"{record.levelname:<7} {record.name}: {record.getMessage()}"
        if request_id:
            line += f" request_id={request_id}"
        line += "".join(f" {k}={v}" for k, v in extras.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    # The ASGI server's own access log would repeat ours without request ids.
    logging.getLogger("uvicorn.access").disabled = True
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def new_request_id(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == REQUEST_ID_HEADER and _CLIENT_REQUEST_ID.match(value):
            return value.decode()
    return os.urandom(12).hex()


class RequestObserver:
    """Wraps the ASGI app: a request id on every response and log line, metrics, the access log."""

    __slots__ = ("_log_paths", "_access_log_enabled")

    def __init__(self, settings: Settings) -> None:
        self._log_paths = settings.log_member_ids
        self._access_log_enabled = access_log.isEnabledFor(logging.INFO)

    async def observe(self, scope: Any, receive: Any, send: Any, app: Any) -> None:
        request_id = new_request_id(scope["headers"])
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500
        header = (REQUEST_ID_HEADER, request_id.encode())

        async def send_with_request_id(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await app(scope, receive, send_with_request_id)
        finally:
            elapsed = time.perf_counter() - started
            # Route templates (/v1/members/{member_id}/balance) keep member ids out of metrics
            # labels and, unless configured otherwise, out of the access log.
            route = scope.get("path_template") or "unmatched"
            method = scope["method"]
            REQUESTS.labels(method, route, status).inc()
            REQUEST_SECONDS.labels(method, route).observe(elapsed)
            if self._access_log_enabled:
                access_log.info(
                    "request",
                    extra={
                        "method": method,
                        "path": scope["path"] if self._log_paths else route,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 3),
                    },
                )
            request_id_var.reset(token)


def render_metrics() -> bytes:
    """The Prometheus exposition; with several worker processes, merged across them."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest()
