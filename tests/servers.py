"""PostgreSQL and Redis servers of a test's own, to stop, freeze and start again under the app.

Both come from the machine's binaries (PostgreSQL's ``initdb``/``pg_ctl``, ``redis-server``) and
listen on a free loopback port; a test that cannot find them is skipped. A PostgreSQL server
refuses to run as root, so under root it runs as the ``postgres`` user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def postgres_bin_dir() -> Path | None:
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(candidate, "pg_ctl").exists():
            return Path(candidate)
    found = shutil.which("pg_ctl")
    return Path(found).parent if found else None


def descendants(pid: int) -> list[int]:
    found = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                found += [int(child), *descendants(int(child))]
    return found


def _wait_for_port(port: int, up: bool, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                reached = True
        except OSError:
            reached = False
        if reached == up:
            return
        time.sleep(0.05)
    raise TimeoutError(f"port {port} did not come {'up' if up else 'down'}")


class OwnPostgres:
    """A PostgreSQL server in a temporary directory: ``url``, ``stop()``, ``start()``."""

    def __init__(self, bin_dir: Path, root: Path) -> None:
        self.port = free_port()
        self._bin = bin_dir
        self._data = root / "data"
        self._root = root
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @classmethod
    def create(cls, bin_dir: Path) -> OwnPostgres:
        """In a new temporary directory (the ``postgres`` user's under root); ``remove()`` ends it."""
        root = Path(tempfile.mkdtemp(prefix="konvert-pg-"))
        if os.geteuid() == 0:
            shutil.chown(root, "postgres")
        return cls(bin_dir, root)

    def remove(self) -> None:
        """Stop the server if it runs, and delete its directory."""
        with contextlib.suppress(subprocess.CalledProcessError):
            if (self._data / "postmaster.pid").exists():
                self.stop()
        shutil.rmtree(self._root, ignore_errors=True)

    def _run(self, *command: str) -> None:
        as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*as_user, *command], check=True, capture_output=True, timeout=60)

    def init(self) -> None:
        self._run(str(self._bin / "initdb"), "-D", str(self._data), "-A", "trust", "-U", "postgres", "--no-sync")

    def start(self) -> None:
        options = f"-p {self.port} -k {self._root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            str(self._bin / "pg_ctl"),
            "-D",
            str(self._data),
            "-o",
            options,
            "-w",
            "-l",
            str(self._root / "log"),
            "start",
        )
        _wait_for_port(self.port, up=True)

    def stop(self) -> None:
        self._run(str(self._bin / "pg_ctl"), "-D", str(self._data), "-m", "immediate", "-w", "stop")
        _wait_for_port(self.port, up=False)

    def _pids(self) -> list[int]:
        """The postmaster and every process it started (backends, background workers)."""
        postmaster = int((self._data / "postmaster.pid").read_text().split()[0])
        return [postmaster, *descendants(postmaster)]

    def freeze(self) -> None:
        """SIGSTOP the whole server: connections stay open, and nothing answers."""
        for pid in self._pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in self._pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


@contextlib.contextmanager
def own_postgres() -> Iterator[OwnPostgres]:
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("no PostgreSQL binaries (pg_ctl) on this machine")
    server = OwnPostgres.create(bin_dir)
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.remove()


class OwnRedis:
    """A redis-server of its own, without persistence: ``url``, ``freeze()`` (SIGSTOP), ``thaw()``
    (SIGCONT), ``stop()`` and ``start()`` (on the same port, empty, as after a crash)."""

    def __init__(self, binary: str) -> None:
        self._binary = binary
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [self._binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_port(self.port, up=True)

    def stop(self) -> None:
        if self.process is not None:
            self.thaw()
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None
            _wait_for_port(self.port, up=False)

    def freeze(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)


def redis_binary() -> str | None:
    return shutil.which("redis-server")


@contextlib.contextmanager
def own_redis() -> Iterator[OwnRedis]:
    binary = redis_binary()
    if binary is None:
        pytest.skip("no redis-server on this machine")
    server = OwnRedis(binary)
    try:
        server.start()
        yield server
    finally:
        server.stop()
