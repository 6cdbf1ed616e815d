"""observability.Tally: what requests counted reaches real prometheus_client metrics exactly as
if each had been observed, in one process and across worker processes (multiprocess mode)."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from konvert.observability import Tally, flush_tally_periodically

BUCKETS = (0.001, 0.01, 0.1)
# (method, route, status, seconds) of the requests counted, and the balance reads.
REQUESTS = [
    ("GET", "/v1/members/{member_id}/balance", 200, 0.0005),
    ("GET", "/v1/members/{member_id}/balance", 200, 0.001),  # on a bound: counted in its bucket (le)
    ("GET", "/v1/members/{member_id}/balance", 404, 0.002),
    ("POST", "/v1/purchases", 201, 0.05),
    ("POST", "/v1/purchases", 201, 3.0),  # above every bound: +Inf only
]
READS = ["redis", "redis", "database"]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


def tally_for(registry: CollectorRegistry) -> Tally:
    return Tally(
        Counter("t_requests_total", "requests", ["method", "route", "status"], registry=registry),
        Histogram("t_request_seconds", "seconds", ["method", "route"], buckets=BUCKETS, registry=registry),
        Counter("t_reads_total", "reads", ["source"], registry=registry),
    )


def expected_from_observing_each() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The same metrics, each request observed one at a time by prometheus_client itself."""
    registry = CollectorRegistry()
    requests = Counter("t_requests_total", "requests", ["method", "route", "status"], registry=registry)
    seconds = Histogram(
        "t_request_seconds", "seconds", ["method", "route"], buckets=BUCKETS, registry=registry
    )
    reads = Counter("t_reads_total", "reads", ["source"], registry=registry)
    for method, route, status, elapsed in REQUESTS:
        requests.labels(method, route, status).inc()
        seconds.labels(method, route).observe(elapsed)
    for source in READS:
        reads.labels(source).inc()
    return samples(generate_latest(registry).decode())


def test_a_flushed_tally_equals_observing_every_request() -> None:
    registry = CollectorRegistry()
    tally = tally_for(registry)
    for request in REQUESTS[:2]:
        tally.request(*request)
    tally.flush()  # a flush in between: counts add up across flushes
    first = samples(generate_latest(registry).decode())
    for request in REQUESTS[2:]:
        tally.request(*request)
    for source in READS:
        tally.balance_read(source)

    assert samples(generate_latest(registry).decode()) == first  # nothing new before the next flush
    tally.flush()
    tally.flush()  # nothing counted twice

    flushed = samples(generate_latest(registry).decode())
    assert flushed == expected_from_observing_each()
    balance = (("method", "GET"), ("route", "/v1/members/{member_id}/balance"))
    assert flushed[("t_request_seconds_bucket", (("le", "0.001"), *balance))] == 2
    assert flushed[("t_request_seconds_count", balance)] == 3


_WORKER = """
import json, sys
from prometheus_client import CollectorRegistry, Counter, Histogram
sys.path.insert(0, {tests!r})
from unit.test_metrics import READS, REQUESTS, tally_for
tally = tally_for(CollectorRegistry())
for request in REQUESTS:
    tally.request(*request)
for source in READS:
    tally.balance_read(source)
tally.flush()
"""


def test_worker_processes_tallies_add_up_in_multiprocess_mode(tmp_path: Path) -> None:
    tests = str(Path(__file__).resolve().parents[1])
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    for _ in range(2):  # two workers, each its own process and files
        subprocess.run([sys.executable, "-c", _WORKER.format(tests=tests)], env=env, check=True, timeout=60)
    merged = subprocess.run(
        [
            sys.executable,
            "-c",
            "from prometheus_client import CollectorRegistry, generate_latest, multiprocess;"
            "r = CollectorRegistry(); multiprocess.MultiProcessCollector(r);"
            "print(generate_latest(r).decode())",
        ],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout

    twice = {key: 2 * value for key, value in expected_from_observing_each().items()}
    assert json.dumps(sorted(samples(merged).items())) == json.dumps(sorted(twice.items()))


async def test_the_periodic_flush_adds_counts_while_running_and_once_more_when_cancelled() -> None:
    registry = CollectorRegistry()
    tally = tally_for(registry)
    flusher = asyncio.create_task(flush_tally_periodically(tally, seconds=0.05))
    tally.request(*REQUESTS[0])
    await asyncio.sleep(0.3)
    while_running = samples(generate_latest(registry).decode())
    tally.request(*REQUESTS[1])  # counted after the last flush: the final one adds it

    flusher.cancel()
    await asyncio.gather(flusher, return_exceptions=True)

    balance = (("method", "GET"), ("route", "/v1/members/{member_id}/balance"), ("status", "200"))
    assert while_running[("t_requests_total", balance)] == 1
    assert samples(generate_latest(registry).decode())[("t_requests_total", balance)] == 2


async def test_a_failing_flush_is_logged_and_the_next_one_still_runs(caplog) -> None:
    registry = CollectorRegistry()
    tally = Tally(  # a counter with other labels than the tally's requests: labels() refuses
        Counter("t_bad_total", "bad", ["only_one"], registry=registry),
        Histogram("t_request_seconds", "seconds", ["method", "route"], buckets=BUCKETS, registry=registry),
        Counter("t_reads_total", "reads", ["source"], registry=registry),
    )
    flusher = asyncio.create_task(flush_tally_periodically(tally, seconds=0.05))
    tally.request(*REQUESTS[0])
    with caplog.at_level(logging.ERROR, logger="konvert.metrics"):
        await asyncio.sleep(0.2)
        tally.balance_read("redis")
        await asyncio.sleep(0.2)

    assert not flusher.done()  # still flushing
    flusher.cancel()
    await asyncio.gather(flusher, return_exceptions=True)
    assert any("metrics flush failed" in record.getMessage() for record in caplog.records)
    assert samples(generate_latest(registry).decode())[("t_reads_total", (("source", "redis"),))] == 1
