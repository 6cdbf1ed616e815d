"""Request ids, JSON structured logs, the access log and Prometheus metrics."""

from __future__ import annotations

import asyncio
import bisect
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
BALANCE_READS = Counter(
    "konvert_balance_reads_total", "Balance reads by where they were served from", ["source"]
)

# How often a worker adds what it counted to the metrics above (see Tally).
TALLY_FLUSH_SECONDS = 1.0


class Tally:
    """What a request adds to the metrics, counted in plain dicts and added to the Prometheus
    metrics in bulk by ``flush``: every ``TALLY_FLUSH_SECONDS`` and before ``/metrics`` renders.

    prometheus_client takes a lock, looks the label values up and (with several workers) checks
    the process id and writes to a memory-mapped file for every increment: about 6 µs for the
    counter, the histogram and the balance-read counter of one request, a sixth of the CPU of a
    no-op request. Here a request costs two dict updates. The price: with several workers, what
    the other workers counted shows on ``/metrics`` up to ``TALLY_FLUSH_SECONDS`` late, and a
    worker killed without a graceful shutdown (SIGKILL, out of memory) takes its last second
    of counts with it.
    """

    __slots__ = (
        "_bounds",
        "_durations",
        "_reads",
        "_reads_metric",
        "_requests",
        "_requests_metric",
        "_seconds_metric",
    )

    def __init__(
        self,
        requests: Counter = REQUESTS,
        seconds: Histogram = REQUEST_SECONDS,
        reads: Counter = BALANCE_READS,
    ) -> None:
        self._requests_metric = requests
        self._seconds_metric = seconds
        self._reads_metric = reads
        self._bounds = tuple(seconds._upper_bounds)  # the histogram's own, +Inf last
        self._requests: dict[tuple[str, str, int], int] = {}
        # (method, route) -> the count in each bucket (``le`` its bound, not cumulative), then the sum.
        self._durations: dict[tuple[str, str], list[float]] = {}
        self._reads: dict[str, int] = {}

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        self._requests[key] = self._requests.get(key, 0) + 1
        counts = self._durations.get((method, route))
        if counts is None:
            counts = self._durations[(method, route)] = [0] * len(self._bounds) + [0.0]
        counts[bisect.bisect_left(self._bounds, seconds)] += 1  # the first bucket whose bound >= seconds
        counts[-1] += seconds

    def balance_read(self, source: str) -> None:
        """A balance read served from ``source`` ("redis" or "database")."""
        self._reads[source] = self._reads.get(source, 0) + 1

    def flush(self) -> None:
        requests, self._requests = self._requests, {}
        durations, self._durations = self._durations, {}
        reads, self._reads = self._reads, {}
        for key, count in requests.items():
            self._requests_metric.labels(*key).inc(count)
        for key, counts in durations.items():
            histogram = self._seconds_metric.labels(*key)
            # prometheus_client observes one value at a time; these are its own per-bucket
            # values, which ``observe`` increments (tests/unit/test_metrics.py holds it to that).
            for bucket, count in zip(histogram._buckets, counts, strict=False):
                if count:
                    bucket.inc(count)
            histogram._sum.inc(counts[-1])
        for source, count in reads.items():
            self._reads_metric.labels(source).inc(count)


TALLY = Tally()


async def flush_tally_periodically(tally: Tally = TALLY, seconds: float = TALLY_FLUSH_SECONDS) -> None:
    """Until cancelled, then once more: a worker's counts reach the metrics at most ``seconds``
    late. A flush that fails (a metrics file that cannot grow, say) loses its counts, is logged,
    and the next one goes on."""
    try:
        while True:
            await asyncio.sleep(seconds)
            _flush_logged(tally)
    finally:
        _flush_logged(tally)


def _flush_logged(tally: Tally) -> None:
    try:
        tally.flush()
    except Exception:
        logging.getLogger("konvert.metrics").exception("metrics flush failed; its counts are lost")


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
        extras = {
            k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRIBUTES and not k.startswith("_")
        }
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

    __slots__ = ("_access_log_enabled", "_log_paths")

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
            TALLY.request(method, route, status, elapsed)
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
    """The Prometheus exposition; with several worker processes, merged across them (what the
    other workers counted in the last TALLY_FLUSH_SECONDS may not be in it yet)."""
    _flush_logged(TALLY)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest()
