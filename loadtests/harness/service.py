"""The service under test: ``konvert`` CLI calls, a running ``konvert serve``, and what it costs
(memory of the parent and its workers, CPU of everything) while a scenario runs."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

try:  # psutil is optional; /proc is read directly without it.
    import psutil
except ImportError:  # pragma: no cover - depends on the environment
    psutil = None

READY_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 20.0
CLI_TIMEOUT_SECONDS = 600.0
SAMPLE_INTERVAL_SECONDS = 0.25
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def konvert_env(**variables: str) -> dict[str, str]:
    """This process's environment without any KONVERT_* variable, plus the given ones."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("KONVERT_")}
    return env | variables


# The konvert under test is a command prefix: this interpreter's by default, or another install's
# (a baseline commit's virtualenv): every CLI call and the server go through it.
THIS_KONVERT: tuple[str, ...] = (sys.executable, "-m", "konvert")


def run_cli(
    konvert: Sequence[str], env: dict[str, str], *args: str, timeout: float = CLI_TIMEOUT_SECONDS
) -> subprocess.CompletedProcess[str]:
    """``konvert <args>`` of the given install, output captured."""
    return subprocess.run([*konvert, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)


class BackgroundCli:
    """``konvert <args>`` in the background. A thread reads its output and takes its exit time
    as they happen: its pipes never fill up, and its time is its own, not when the caller looked
    (``finished`` is set once ``out``, ``err`` and ``ended_at`` hold)."""

    def __init__(self, konvert: Sequence[str], env: dict[str, str], *args: str) -> None:
        self.process = subprocess.Popen(
            [*konvert, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.finished = threading.Event()
        self.out = self.err = ""
        self.ended_at = 0.0
        threading.Thread(target=self._watch, name="konvert-cli", daemon=True).start()

    def _watch(self) -> None:
        self.out, self.err = self.process.communicate()
        self.ended_at = time.monotonic()
        self.finished.set()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_json(
    method: str, url: str, key: str | None = None, body: object = None, timeout: float = 10.0
) -> tuple[int, object]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def portal_cookie(link: str, timeout: float = 10.0) -> str:
    """Open a portal link (once, as a member's browser would) and return the Cookie header its
    browser would send from then on: the session's cookie and the CSRF cookie."""
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        response = opener.open(link, timeout=timeout)
        headers, status = response.headers, response.status
    except urllib.error.HTTPError as exc:  # the 303 to /portal, with the cookies
        headers, status = exc.headers, exc.code
    cookies = {}
    for cookie in headers.get_all("Set-Cookie") or []:
        name, _, rest = cookie.partition("=")
        cookies[name.strip()] = rest.split(";", 1)[0]
    if "konvert_portal" not in cookies:
        raise RuntimeError(f"opening a portal link answered {status} without a session cookie")
    return "; ".join(f"{name}={value}" for name, value in cookies.items())


class Server:
    """``konvert serve --workers N`` of the given install, in its own session; stderr goes to a file."""

    def __init__(self, konvert: Sequence[str], env: dict[str, str], workers: int, log_path: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.workers = workers
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [*konvert, "serve", "--workers", str(workers), "--port", str(self.port)],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log_text(self) -> str:
        return self.log_path.read_text("utf-8", errors="replace")

    def wait_ready(self, timeout_seconds: float = READY_TIMEOUT_SECONDS) -> None:
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"konvert serve exited with {self.process.returncode}:\n{self.log_text()}")
            try:
                # Every worker answers /health/ready only once its lifespan ran; give the others a
                # moment to finish theirs too.
                ready = http_json("GET", f"{self.base_url}/health/ready", timeout=2)[0] == 200
                if ready and len(self.worker_pids()) >= (self.workers if self.workers > 1 else 0):
                    return
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"konvert serve not ready within {timeout_seconds}s:\n{self.log_text()}")

    def worker_pids(self) -> list[int]:
        """The worker processes (none when the server serves in its own process, as uvicorn does
        with one worker in older commits)."""
        return _children(self.process.pid)

    def all_pids(self) -> list[int]:
        return [self.process.pid, *self.worker_pids()]

    def metrics(self) -> ServerMetrics:
        """What konvert's /metrics says now (summed over its workers)."""
        with urllib.request.urlopen(f"{self.base_url}/metrics", timeout=10) as response:
            text = response.read().decode()
        buckets: dict[float, float] = {}
        for match in _DURATION_BUCKET.finditer(text):
            labels, value = match.group(1), float(match.group(2))
            if 'route="/metrics"' in labels:
                continue
            bound = float(_LE.search(labels).group(1))  # type: ignore[union-attr]
            buckets[bound] = buckets.get(bound, 0.0) + value
        reads = {source: float(value) for source, value in _BALANCE_READS.findall(text)}
        return ServerMetrics(buckets, reads)

    def stop(self) -> int | None:
        """SIGTERM (uvicorn's graceful stop), then SIGKILL to the process group if it lingers."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
        self._log.close()
        return self.process.returncode


# Route labels hold braces ("/v1/members/{member_id}/balance"): the labels end at the last "} ".
_DURATION_BUCKET = re.compile(r"^konvert_http_request_duration_seconds_bucket\{(.*)\} (\S+)$", re.MULTILINE)
_LE = re.compile(r'le="([^"]+)"')


_BALANCE_READS = re.compile(r'^konvert_balance_reads_total\{source="(\w+)"\} (\S+)$', re.MULTILINE)


@dataclass
class ServerMetrics:
    # konvert's request-duration histogram: cumulative count per upper bound (seconds), all
    # routes but /metrics.
    latency_buckets: dict[float, float]
    # Balance reads by where they were served from (redis, database).
    balance_reads: dict[str, float]


def balance_read_sources(before: ServerMetrics, after: ServerMetrics) -> dict[str, float] | None:
    """The share of balance reads served from each source between two readings."""
    deltas = {k: v - before.balance_reads.get(k, 0.0) for k, v in after.balance_reads.items()}
    total = sum(deltas.values())
    return {k: round(v / total, 3) for k, v in sorted(deltas.items())} if total else None


def server_latency(before: ServerMetrics, after: ServerMetrics) -> dict[str, object]:
    """Percentiles of the requests served between two readings, as the upper bound of the
    bucket each falls in (so "<= 5 ms", not an interpolation); None above the last bound."""
    start, end = before.latency_buckets, after.latency_buckets
    deltas = sorted((bound, end.get(bound, 0.0) - start.get(bound, 0.0)) for bound in end)
    total = deltas[-1][1] if deltas else 0.0
    result: dict[str, object] = {"requests": int(total)}
    for name, fraction in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99)):
        bound = next((b for b, count in deltas if total and count >= fraction * total), None)
        result[f"{name}_le_ms"] = None if bound is None or bound == float("inf") else round(bound * 1000, 3)
    return result


def _children(pid: int) -> list[int]:
    if psutil is not None:
        try:
            return [child.pid for child in psutil.Process(pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
    found = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                found.append(int(child))
                found.extend(_children(int(child)))
    except OSError:
        pass
    return found


def rss_bytes(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return 0


def system_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, all cores, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return (total - idle) / _CLOCK_TICKS, total / _CLOCK_TICKS


# CPU is attributed to these groups by process; "foreign" is everything else on the machine (other
# users' work, which makes a run noisy: run.py warns when it is large).
CPU_GROUPS = ("konvert", "jobs", "postgres", "redis", "loadgen", "harness", "kernel", "foreign")
_LOADGEN_COMMANDS = {"wrk", "pgbench", "py-spy"}


def _process_cpu_table() -> dict[int, tuple[str, float]]:
    """pid -> (command, user + system CPU seconds) for every process on the machine.

    Kernel threads (children of kthreadd, pid 2) get the command "[kernel]".
    """
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        head, _, rest = text.rpartition(")")
        fields = rest.split()
        try:
            command = "[kernel]" if fields[1] == "2" or entry.name == "2" else head.partition("(")[2]
            table[int(entry.name)] = (command, (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS)
        except (IndexError, ValueError):
            continue
    return table


@dataclass
class Usage:
    """What the machine spent during one scenario."""

    seconds: float = 0.0
    peak_rss_bytes: int = 0
    peak_rss_per_process_bytes: int = 0
    rss_start_bytes: int = 0
    rss_end_bytes: int = 0
    # CPU as a share of one core (100 = one core busy), for the whole machine and per group.
    machine_cpu_percent: float = 0.0
    cpu_percent_by_group: dict[str, float] = field(default_factory=dict)
    # The service's processes one by one: shows whether the workers share the connections.
    konvert_cpu_percent_by_process: list[float] = field(default_factory=list)
    cores: int = field(default_factory=lambda: os.cpu_count() or 1)

    def as_dict(self) -> dict[str, object]:
        mib = 1024 * 1024
        return {
            "seconds": round(self.seconds, 2),
            "peak_rss_mib": round(self.peak_rss_bytes / mib, 1),
            "peak_rss_per_process_mib": round(self.peak_rss_per_process_bytes / mib, 1),
            "rss_start_mib": round(self.rss_start_bytes / mib, 1),
            "rss_end_mib": round(self.rss_end_bytes / mib, 1),
            "service_cpu_percent": round(self.cpu_percent_by_group.get("konvert", 0.0), 1),
            "machine_cpu_percent": round(self.machine_cpu_percent, 1),
            "machine_cpu_capacity_percent": 100 * self.cores,
            "cpu_percent_by_group": {k: round(v, 1) for k, v in self.cpu_percent_by_group.items()},
            "konvert_cpu_percent_by_process": [round(v, 1) for v in self.konvert_cpu_percent_by_process],
        }


_BACKEND = re.compile(r"^postgres: [^:]+: \S+ (\S+) [0-9a-fA-F.:\[\]]+\(\d+\)")


def _postgres_database(pid: int) -> str | None:
    """The database a PostgreSQL backend serves (None for the server's own background processes)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    match = _BACKEND.match(cmdline)
    return match[1] if match else None


def system_cpu_split() -> dict[str, float]:
    """Cumulative CPU seconds of the whole machine by /proc/stat column."""
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return {name: value / _CLOCK_TICKS for name, value in zip(names, values, strict=True)}


class Sampler:
    """Samples the service's RSS (parent + workers, summed at each instant) and everyone's CPU.

    CPU per process is followed from the first to the last time it is seen, so processes that
    start during the scenario (pgbench's backends) count fully; one that ends loses at most its
    last sampling interval. PostgreSQL backends of other databases count as foreign: other
    people's tests on a shared machine.
    """

    def __init__(self, server: Server | None, database: str = "") -> None:
        self._server = server
        self._database = database
        self._groups: dict[int, str] = {}
        self._labels: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._first: dict[int, float] = {}
        self._last: dict[int, tuple[str, float]] = {}
        self._service_pids: set[int] = set()
        self.usage = Usage()

    def _pids(self) -> list[int]:
        return self._server.all_pids() if self._server is not None else []

    def label(self, pid: int, group: str) -> None:
        """Count a process under ``group`` rather than as foreign: a ``konvert jobs run`` started
        beside the service, or the other install's idle service in a baseline comparison."""
        self._labels[pid] = group

    def _sample_cpu(self, initial: bool = False) -> None:
        for pid, (command, seconds) in _process_cpu_table().items():
            if pid not in self._first:
                # Present at the start: count from here. Started later: count from its start.
                self._first[pid] = seconds if initial else 0.0
            self._last[pid] = (command, seconds)

    def __enter__(self) -> Sampler:
        self._started = time.monotonic()
        pids = self._pids()
        self._service_pids = set(pids)
        self._sample_cpu(initial=True)
        for pid, (command, _) in self._last.items():
            self._group(pid, command)  # classify backends while their command line is current
        self._machine_start = system_cpu()
        self._split_start = system_cpu_split()
        self.usage.rss_start_bytes = sum(rss_bytes(pid) for pid in pids)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_SECONDS):
            self._sample()
            self._sample_cpu()

    def _sample(self) -> int:
        pids = self._pids()
        self._service_pids.update(pids)
        sizes = [rss_bytes(pid) for pid in pids]
        total = sum(sizes)
        self.usage.peak_rss_bytes = max(self.usage.peak_rss_bytes, total)
        self.usage.peak_rss_per_process_bytes = max(self.usage.peak_rss_per_process_bytes, *sizes, 0)
        return total

    def _group(self, pid: int, command: str) -> str:
        if pid in self._labels:
            return self._labels[pid]
        if pid in self._service_pids:
            return "konvert"
        if command.startswith("postgres"):
            if pid not in self._groups:
                database = _postgres_database(pid)
                self._groups[pid] = "postgres" if database in (None, self._database) else "foreign"
            return self._groups[pid]
        if command.startswith("redis"):
            return "redis"
        if command in _LOADGEN_COMMANDS:
            return "loadgen"
        if pid == os.getpid():
            return "harness"
        if command == "[kernel]":
            return "kernel"
        return "foreign"

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.usage.rss_end_bytes = self._sample()
        self._sample_cpu()
        elapsed = time.monotonic() - self._started
        busy_start, total_start = self._machine_start
        busy_end, total_end = system_cpu()
        self.usage.seconds = elapsed
        if total_end > total_start:
            self.usage.machine_cpu_percent = (
                100 * self.usage.cores * (busy_end - busy_start) / (total_end - total_start)
            )
        groups = dict.fromkeys(CPU_GROUPS, 0.0)
        for pid, (command, seconds) in self._last.items():
            group = self._group(pid, command)  # a label may name a group of its own
            groups[group] = groups.get(group, 0.0) + seconds - self._first.get(pid, 0.0)
        if elapsed > 0:
            self.usage.cpu_percent_by_group = {k: 100 * v / elapsed for k, v in groups.items()}
            self.usage.konvert_cpu_percent_by_process = [
                100 * (self._last[pid][1] - self._first.get(pid, 0.0)) / elapsed
                for pid in sorted(self._service_pids)
                if pid in self._last
            ]
            split_end = system_cpu_split()
            # Interrupt handling (the loopback network stack runs largely in softirq) is in no
            # process's CPU time; steal is time the hypervisor gave to other machines.
            for column in ("softirq", "irq", "steal"):
                self.usage.cpu_percent_by_group[column] = (
                    100 * (split_end[column] - self._split_start[column]) / elapsed
                )
            self.usage.cpu_percent_by_group["unattributed"] = max(
                0.0,
                self.usage.machine_cpu_percent
                - sum(v for k, v in self.usage.cpu_percent_by_group.items() if k != "steal"),
            )


def wait_for_quiet(database: str, max_wait_seconds: float, threshold_percent: float) -> float:
    """Wait (at most max_wait_seconds) until other work on the machine takes less than
    threshold_percent of a core over one second; return the last foreign CPU measured."""
    deadline = time.monotonic() + max_wait_seconds
    while True:
        sampler = Sampler(None, database)
        with sampler:
            time.sleep(1.0)
        foreign = sampler.usage.cpu_percent_by_group.get("foreign", 0.0)
        if foreign < threshold_percent or time.monotonic() >= deadline:
            return foreign
