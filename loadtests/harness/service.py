"""The service under test: ``konvert`` CLI calls, a running ``konvert serve``, and what it costs
(memory of the parent and its workers, CPU of everything) while a scenario runs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
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


def run_cli(env: dict[str, str], *args: str, timeout: float = CLI_TIMEOUT_SECONDS) -> subprocess.CompletedProcess[str]:
    """``konvert <args>`` with the same interpreter, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "konvert", *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_json(method: str, url: str, key: str | None = None, body: object = None, timeout: float = 10.0) -> tuple[int, object]:
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


class Server:
    """``konvert serve --workers N`` in its own session; stderr goes to a file."""

    def __init__(self, env: dict[str, str], workers: int, log_path: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.workers = workers
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "konvert", "serve", "--workers", str(workers), "--port", str(self.port)],
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
                if http_json("GET", f"{self.base_url}/health/ready", timeout=2)[0] == 200:
                    # Every worker answers /health/ready only once its lifespan ran; give the
                    # others a moment to finish theirs too.
                    if len(self.worker_pids()) >= (self.workers if self.workers > 1 else 0):
                        return
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"konvert serve not ready within {timeout_seconds}s:\n{self.log_text()}")

    def worker_pids(self) -> list[int]:
        """The worker processes (with one worker, uvicorn serves in the parent itself)."""
        return _children(self.process.pid)

    def all_pids(self) -> list[int]:
        return [self.process.pid, *self.worker_pids()]

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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (children not included)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    except (OSError, IndexError, ValueError):
        return 0.0


def system_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, all cores, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return (total - idle) / _CLOCK_TICKS, total / _CLOCK_TICKS


@dataclass
class Usage:
    """What the machine spent during one scenario."""

    seconds: float = 0.0
    peak_rss_bytes: int = 0
    peak_rss_per_process_bytes: int = 0
    rss_start_bytes: int = 0
    rss_end_bytes: int = 0
    # CPU as a share of one core (100 = one core busy), for the service and the whole machine.
    service_cpu_percent: float = 0.0
    machine_cpu_percent: float = 0.0
    cores: int = field(default_factory=lambda: os.cpu_count() or 1)

    def as_dict(self) -> dict[str, float]:
        mib = 1024 * 1024
        return {
            "seconds": round(self.seconds, 2),
            "peak_rss_mib": round(self.peak_rss_bytes / mib, 1),
            "peak_rss_per_process_mib": round(self.peak_rss_per_process_bytes / mib, 1),
            "rss_start_mib": round(self.rss_start_bytes / mib, 1),
            "rss_end_mib": round(self.rss_end_bytes / mib, 1),
            "service_cpu_percent": round(self.service_cpu_percent, 1),
            "machine_cpu_percent": round(self.machine_cpu_percent, 1),
            "machine_cpu_capacity_percent": 100 * self.cores,
        }


class Sampler:
    """Samples the service's RSS (parent + workers, summed at each instant) and CPU in a thread."""

    def __init__(self, server: Server | None) -> None:
        self._server = server
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self.usage = Usage()

    def _pids(self) -> list[int]:
        return self._server.all_pids() if self._server is not None else []

    def _service_cpu(self, pids: list[int]) -> float:
        return sum(cpu_seconds(pid) for pid in pids)

    def __enter__(self) -> Sampler:
        self._started = time.monotonic()
        self._pids_at_start = self._pids()
        self._cpu_start = self._service_cpu(self._pids_at_start)
        self._machine_start = system_cpu()
        self.usage.rss_start_bytes = sum(rss_bytes(pid) for pid in self._pids_at_start)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_SECONDS):
            self._sample()

    def _sample(self) -> int:
        sizes = [rss_bytes(pid) for pid in self._pids()]
        total = sum(sizes)
        self.usage.peak_rss_bytes = max(self.usage.peak_rss_bytes, total)
        self.usage.peak_rss_per_process_bytes = max(self.usage.peak_rss_per_process_bytes, *sizes, 0)
        return total

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.usage.rss_end_bytes = self._sample()
        elapsed = time.monotonic() - self._started
        busy_start, total_start = self._machine_start
        busy_end, total_end = system_cpu()
        cores = self.usage.cores
        self.usage.seconds = elapsed
        if elapsed > 0:
            # Workers live for the whole run, so the same pids are summed at both ends.
            self.usage.service_cpu_percent = 100 * (self._service_cpu(self._pids_at_start) - self._cpu_start) / elapsed
        if total_end > total_start:
            self.usage.machine_cpu_percent = 100 * cores * (busy_end - busy_start) / (total_end - total_start)
