"""``konvert serve`` as a real process: against the configured servers, and the embedded default.

Each test starts the server in its own session (process group), talks to it over HTTP, stops it
with SIGTERM the way an init system would, and kills whatever is left in a ``finally``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REDIS_PREFIX

MakeKey = Callable[..., Awaitable[str]]

READY_TIMEOUT_SECONDS = 60.0
EMBEDDED_READY_TIMEOUT_SECONDS = 90.0  # the first start runs initdb
STOP_TIMEOUT_SECONDS = 30.0
# How long a condition polled for (a count on /metrics) may take to show.
METRICS_TIMEOUT_SECONDS = 10.0
FIRST_ADMIN_KEY = re.compile(r"^first admin key \(shown once, keep it\): (kvt_\S+)$", re.M)
DATA_DIR_LINE = re.compile(r"^konvert data directory: (.+)$", re.M)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def konvert_env(**variables: str) -> dict[str, str]:
    """The test's environment without any KONVERT_* variable, plus the given ones. On the
    configured Redis, keys start with the run's prefix, so the run deletes them at its end."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("KONVERT_")}
    if "KONVERT_REDIS_URL" in variables:
        env["KONVERT_REDIS_KEY_PREFIX"] = f"{REDIS_PREFIX}-serve"
    return env | variables


@pytest.fixture(autouse=True)
def _run_keys_deleted_at_the_end(redis_client: object) -> None:
    """The session's Redis client deletes every key with the run's prefix when the run ends."""


class Server:
    """A running ``konvert serve``; its stderr goes to a file the test can read while it runs."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, stderr_path: Path) -> None:
        self.process = process
        self.base_url = f"http://127.0.0.1:{port}"
        self.stderr_path = stderr_path

    def stderr(self) -> str:
        return self.stderr_path.read_text("utf-8", errors="replace")

    def messages(self) -> str:
        """What it said on stderr, a line per message: the ``msg`` of a JSON log line, any other
        line as it is (``konvert serve`` announces itself in log lines unless on a terminal)."""
        said = []
        for line in self.stderr().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            said.append(str(entry["msg"]) if isinstance(entry, dict) and "msg" in entry else line)
        return "\n".join(said)

    def wait_ready(self, timeout_seconds: float) -> None:
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"konvert serve exited with {self.process.returncode}:\n{self.stderr()}")
            try:
                if httpx.get(f"{self.base_url}/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise AssertionError(f"konvert serve not ready within {timeout_seconds}s:\n{self.stderr()}")

    def wait_for_line(self, pattern: re.Pattern[str], timeout_seconds: float = 10.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if match := pattern.search(self.messages()):
                return match
            time.sleep(0.1)
        raise AssertionError(f"no line matching {pattern.pattern!r} in:\n{self.stderr()}")

    def stop(self) -> int:
        """SIGTERM, then wait: the graceful stop an init system or container runtime does."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(STOP_TIMEOUT_SECONDS)


@contextmanager
def konvert_serve(tmp_path: Path, env: dict[str, str], *args: str) -> Iterator[Server]:
    port = free_port()
    stderr_path = tmp_path / f"serve-{uuid.uuid4().hex[:8]}.stderr"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "konvert", "serve", "--port", str(port), *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        yield Server(process, port, stderr_path)
    finally:
        # Its own session and process group: this reaches the workers and the embedded Redis
        # too, and nothing else.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(STOP_TIMEOUT_SECONDS)


@contextmanager
def embedded_servers_stopped_afterwards(data_dir: Path) -> Iterator[None]:
    """Stop the embedded PostgreSQL and Redis if a failed test left them running (each has a
    session of its own)."""
    try:
        yield
    finally:
        for pid_file, stop in (
            (data_dir / "postgres" / "postmaster.pid", signal.SIGINT),  # PostgreSQL's fast shutdown
            (data_dir / "redis" / "redis.pid", signal.SIGTERM),
        ):
            with contextlib.suppress(OSError, ValueError, IndexError):
                os.kill(int(pid_file.read_text().split()[0]), stop)


def purchase_body(member_id: str) -> dict[str, Any]:
    """One book for 10.00 EUR: 20 points under the example program, available at once."""
    return {
        "purchase_id": f"p-{uuid.uuid4().hex[:12]}",
        "member_id": member_id,
        "partner": "webshop",
        "currency": "EUR",
        "occurred_at": "2026-01-01T10:00:00Z",
        "lines": [{"line_id": "1", "sku": "A", "category": "books", "quantity": 1, "unit_price": 1000}],
    }


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def post_purchase(server: Server, key: str, member_id: str) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/purchases", json=purchase_body(member_id), headers=bearer(key), timeout=10)


def get_balance(server: Server, key: str, member_id: str) -> httpx.Response:
    return httpx.get(f"{server.base_url}/v1/members/{member_id}/balance", headers=bearer(key), timeout=10)


def get(server: Server, path: str) -> httpx.Response:
    return httpx.get(f"{server.base_url}{path}", timeout=10)


def points_of(balance: dict[str, Any]) -> dict[str, int]:
    return {name: balance[name] for name in ("available", "pending", "held", "lifetime_earned")}


def metrics_on_a_new_connection(server: Server) -> str:
    with httpx.Client(base_url=server.base_url, timeout=10) as client:
        response = client.get("/metrics")
        assert response.status_code == 200
        return response.text


def wait_for_metric(server: Server, sample: str) -> None:
    """Poll /metrics (bounded) until it has the sample line: the request that it counts was
    answered before the server recorded it."""
    deadline = time.monotonic() + METRICS_TIMEOUT_SECONDS
    while sample not in (metrics := get(server, "/metrics")).text:
        assert metrics.status_code == 200
        assert time.monotonic() < deadline, metrics.text
        time.sleep(0.1)


async def test_serve_with_configured_servers_and_two_workers(
    tmp_path: Path, database_url: str, redis_url: str, make_key: MakeKey
) -> None:
    key = await make_key("admin")
    member_id = f"e2e-{uuid.uuid4().hex[:12]}"
    env = konvert_env(KONVERT_DATABASE_URL=database_url, KONVERT_REDIS_URL=redis_url)

    with konvert_serve(tmp_path, env, "--workers", "2") as server:
        server.wait_ready(READY_TIMEOUT_SECONDS)

        posted = post_purchase(server, key, member_id)
        assert posted.status_code == 201, posted.text
        assert get_balance(server, key, member_id).json()["available"] == 20
        # Metrics are recorded at once, and merged across the workers (prometheus_client's
        # multiprocess mode): whichever worker answers /metrics shows the posting.
        counted = 'konvert_http_requests_total{method="POST",route="/v1/purchases",status="201"} 1.0'
        wait_for_metric(server, counted)
        # Each worker shows it, not only the one that served the posting: ask on new connections
        # until both workers have answered (the access log says which one did).
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while len(set(access_log_pids(server, "/metrics"))) < 2:
            assert time.monotonic() < deadline, server.stderr()
            assert counted in metrics_on_a_new_connection(server)

        server.stop()
        assert "Traceback" not in server.stderr()


def not_json_objects(text: str) -> list[str]:
    """The lines of ``text`` that are not one JSON object each."""
    bad = []
    for line in text.splitlines():
        try:
            if not isinstance(json.loads(line), dict):
                bad.append(line)
        except ValueError:
            bad.append(line)
    return bad


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_with_json_logs_every_line_on_stderr_is_a_json_object(
    tmp_path: Path, database_url: str, redis_url: str, make_key: MakeKey, workers: str
) -> None:
    key = await make_key("admin")
    member_id = f"e2e-{uuid.uuid4().hex[:12]}"
    env = konvert_env(
        KONVERT_DATABASE_URL=database_url,
        KONVERT_REDIS_URL=redis_url,
        KONVERT_LOG_FORMAT="json",
        KONVERT_LOG_LEVEL="info",
    )

    with konvert_serve(tmp_path, env, "--workers", workers) as server:
        server.wait_ready(READY_TIMEOUT_SECONDS)
        # Ready means one worker answers; on a loaded machine the other may still be starting.
        server.wait_for_line(re.compile(rf"(?s)(Started worker-.*){{{workers}}}"), READY_TIMEOUT_SECONDS)
        posted = post_purchase(server, key, member_id)
        assert posted.status_code == 201, posted.text
        assert get_balance(server, key, member_id).status_code == 200
        assert get(server, "/v1/nowhere").status_code == 404
        assert server.stop() == 0
        stderr = server.stderr()

    assert stderr.strip(), "konvert serve wrote nothing to stderr"
    assert not_json_objects(stderr) == [], stderr
    entries = [json.loads(line) for line in stderr.splitlines()]
    # konvert's own announcement is among them,
    assert any(str(entry.get("msg", "")).startswith("serving on http://") for entry in entries), stderr
    # and the server's own lines (as JSON, without ANSI colours), from every worker's start to
    # the end of the stop.
    server_said = [entry["msg"] for entry in entries if entry.get("logger", "").startswith("_granian")]
    assert sum(said.startswith("Started worker-") for said in server_said) == int(workers), stderr
    assert "Granian shutdown completed, see ya!" in server_said, stderr
    assert "\x1b" not in stderr and "\\u001b" not in stderr
    # And konvert's access log, a line per request, with its request id.
    access = [entry for entry in entries if entry.get("logger") == "konvert.access"]
    assert {(entry["method"], entry["path"], entry["status"]) for entry in access} >= {
        ("POST", "/v1/purchases", 201),
        ("GET", "/v1/members/{member_id}/balance", 200),
        ("GET", "unmatched", 404),
    }, stderr
    assert all(entry.get("request_id") for entry in access)


def listening_sockets(port: int) -> int:
    """How many sockets listen on the port (Linux: /proc/net/tcp and tcp6, state 0A)."""
    count = 0
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        if table.exists():
            for line in table.read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                    count += 1
    return count


def wait_for_listeners(port: int, count: int) -> int:
    """Wait (bounded) until ``count`` sockets listen on the port; return how many do."""
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while (listeners := listening_sockets(port)) != count and time.monotonic() < deadline:
        time.sleep(0.2)
    return listeners


def access_log_pids(server: Server, path: str) -> list[int]:
    """The worker pids in the access log lines for requests to ``path`` (JSON logs)."""
    pids = []
    for line in server.stderr().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("logger") == "konvert.access" and entry.get("path") == path:
                pids.append(entry["pid"])
    return pids


def live_on_new_connections(server: Server, count: int) -> None:
    """``count`` requests, each on a connection of its own."""
    for _ in range(count):
        with httpx.Client(base_url=server.base_url, timeout=10) as client:
            assert client.get("/health/live").status_code == 200


@contextmanager
def two_workers(tmp_path: Path, env: dict[str, str]) -> Iterator[tuple[Server, int]]:
    """``konvert serve --workers 2``, both workers listening; the server and its port."""
    with konvert_serve(tmp_path, env, "--workers", "2") as server:
        server.wait_ready(READY_TIMEOUT_SECONDS)
        port = int(server.base_url.rsplit(":", 1)[1])
        # Two listening sockets, one per worker (SO_REUSEPORT), so the kernel spreads
        # connections over both workers. (Ready means one worker is; wait for both.)
        assert wait_for_listeners(port, 2) == 2
        yield server, port


only_on_linux = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="a socket per worker (SO_REUSEPORT) is Linux only"
)


@only_on_linux
def test_each_worker_listens_itself_and_a_dead_worker_is_replaced(
    tmp_path: Path, database_url: str, redis_url: str
) -> None:
    env = konvert_env(KONVERT_DATABASE_URL=database_url, KONVERT_REDIS_URL=redis_url)
    with two_workers(tmp_path, env) as (server, port):
        live_on_new_connections(server, 16)
        pids = set(access_log_pids(server, "/health/live"))
        assert len(pids) == 2, server.stderr()

        os.kill(min(pids), signal.SIGKILL)
        server.wait_for_line(re.compile("Respawning worker-"))
        assert wait_for_listeners(port, 2) == 2, server.stderr()
        server.wait_ready(READY_TIMEOUT_SECONDS)
        live_on_new_connections(server, 16)
        pids_after = set(access_log_pids(server, "/health/live")) - pids
        assert pids_after, "the replacement worker served nothing"

        assert server.stop() == 0
        assert listening_sockets(port) == 0


@only_on_linux
def test_workers_do_not_outlive_their_serve_process_nor_share_a_port_with_another(
    tmp_path: Path, database_url: str, redis_url: str
) -> None:
    env = konvert_env(KONVERT_DATABASE_URL=database_url, KONVERT_REDIS_URL=redis_url)
    with two_workers(tmp_path, env) as (server, port):
        # A second konvert on the same port would silently split its connections: it refuses.
        second = subprocess.run(
            [sys.executable, "-m", "konvert", "serve", "--port", str(port), "--workers", "2"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert second.returncode == 2, second.stderr
        assert f"cannot listen on 127.0.0.1:{port}" in second.stderr
        assert listening_sockets(port) == 2

        server.process.kill()  # serve only, by SIGKILL: no chance to stop its workers
        assert wait_for_listeners(port, 0) == 0, "workers outlived their serve process"


def redis_answers(socket_path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            sock.connect(str(socket_path))
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def test_embedded_default_keeps_data_across_restarts(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = konvert_env(KONVERT_DATA_DIR=str(data_dir))
    member_id = f"e2e-{uuid.uuid4().hex[:12]}"

    with embedded_servers_stopped_afterwards(data_dir):
        with konvert_serve(tmp_path, env) as first:
            first.wait_ready(EMBEDDED_READY_TIMEOUT_SECONDS)
            key = first.wait_for_line(FIRST_ADMIN_KEY)[1]
            assert first.wait_for_line(DATA_DIR_LINE)[1] == str(data_dir)
            posted = post_purchase(first, key, member_id)
            assert posted.status_code == 201, posted.text
            before = get_balance(first, key, member_id).json()
            assert before["available"] == 20
            first.stop()

        with konvert_serve(tmp_path, env) as second:
            second.wait_ready(EMBEDDED_READY_TIMEOUT_SECONDS)
            after = get_balance(second, key, member_id)
            assert after.status_code == 200, after.text
            assert points_of(after.json()) == points_of(before)
            second.wait_for_line(re.compile(r"^serving on ", re.M))
            assert "first admin key" not in second.stderr()
            second.stop()


@pytest.mark.parametrize("how", ["SIGTERM to serve", "Ctrl-C in its terminal"])
def test_stopping_the_embedded_default_stops_its_servers_after_the_workers(tmp_path: Path, how: str) -> None:
    data_dir = tmp_path / "data"
    env = konvert_env(KONVERT_DATA_DIR=str(data_dir))

    with embedded_servers_stopped_afterwards(data_dir), konvert_serve(tmp_path, env) as server:
        server.wait_ready(EMBEDDED_READY_TIMEOUT_SECONDS)
        assert (data_dir / "postgres" / "postmaster.pid").exists()
        assert redis_answers(data_dir / "redis" / "redis.sock")

        if how == "SIGTERM to serve":
            assert server.stop() == 0
        else:  # the terminal signals its whole foreground process group
            os.killpg(server.process.pid, signal.SIGINT)
            assert server.process.wait(STOP_TIMEOUT_SECONDS) == 0

        assert not (data_dir / "postgres" / "postmaster.pid").exists()
        assert not redis_answers(data_dir / "redis" / "redis.sock")
        # Redis was stopped by konvert at its exit, once the workers had stopped, not by the
        # terminal's signal while they might still write.
        redis_log = (data_dir / "redis" / "redis.log").read_text()
        assert "Received SIGTERM" in redis_log and "Received SIGINT" not in redis_log, redis_log


def test_a_client_dripping_its_headers_is_cut_off(tmp_path: Path, database_url: str, redis_url: str) -> None:
    env = konvert_env(
        KONVERT_DATABASE_URL=database_url, KONVERT_REDIS_URL=redis_url, KONVERT_HEADER_READ_TIMEOUT_SECONDS="1"
    )
    with konvert_serve(tmp_path, env) as server:
        server.wait_ready(READY_TIMEOUT_SECONDS)
        port = int(server.base_url.rsplit(":", 1)[1])
        header = b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200  # 20 s at 10 bytes a second
        started = time.monotonic()
        cut_off_after = None
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            for byte in header:
                try:
                    sock.sendall(bytes([byte]))
                    time.sleep(0.1)
                    sock.setblocking(False)
                    try:
                        closed = sock.recv(4096) == b""
                    except BlockingIOError:
                        closed = False
                    finally:
                        sock.setblocking(True)
                except OSError:  # reset by the server
                    closed = True
                if closed:
                    cut_off_after = time.monotonic() - started
                    break

        assert cut_off_after is not None, "the server waited for the whole header"
        assert cut_off_after < 5
        # Whoever sends headers in time is still served.
        assert get(server, "/health/live").status_code == 200
        assert server.stop() == 0


def test_a_worker_serves_at_most_its_connection_limit(tmp_path: Path, database_url: str, redis_url: str) -> None:
    env = konvert_env(
        KONVERT_DATABASE_URL=database_url, KONVERT_REDIS_URL=redis_url, KONVERT_CONNECTIONS_MAX_PER_WORKER="2"
    )
    with konvert_serve(tmp_path, env) as server:
        server.wait_ready(READY_TIMEOUT_SECONDS)  # (its connections are closed by now)
        port = int(server.base_url.rsplit(":", 1)[1])
        held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
        try:
            for sock in held:  # two kept-alive connections: the worker's two permits
                sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
                assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            with pytest.raises(httpx.ReadTimeout):  # a third waits in the backlog...
                httpx.get(f"{server.base_url}/health/live", timeout=2)
            held.pop().close()
            # ...until one of them closes.
            assert get(server, "/health/live").status_code == 200
        finally:
            for sock in held:
                sock.close()
        assert server.stop() == 0
