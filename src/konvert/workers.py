"""Worker processes for ``konvert serve --workers N``, each with a listening socket of its own.

uvicorn's multi-process mode shares one listening socket among its workers, and whichever
worker wakes first accepts every connection waiting: a burst of new keep-alive connections (a
load balancer opening its pool, a benchmark's clients) can all land on one worker while the
others idle, for as long as those connections live. Here every worker binds its own socket to
the same address with ``SO_REUSEPORT``, and the kernel spreads new connections over them by a
hash of each connection's addresses.

The supervisor (the ``konvert serve`` process) refuses to start when something listens on the
address already, and holds the address bound without listening on it, so no other program can
take the port between restarts. Workers get SIGTERM from the kernel if the supervisor dies,
even by SIGKILL, so none outlives it. It restarts a worker that dies, after a pause that grows while workers keep dying
soon after they start, and on SIGTERM or SIGINT asks each worker to stop (SIGTERM: uvicorn
finishes the requests in flight) and waits for it.

A worker that dies loses the connections still waiting in its own accept queue (the kernel
does not hand them to another worker): clients see a reset and retry.

Linux only: elsewhere ``SO_REUSEPORT`` does not spread connections, and ``konvert serve`` uses
uvicorn's own mode (``spreads_connections()``).
"""

from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from multiprocessing.process import BaseProcess
from typing import Any

log = logging.getLogger("konvert.workers")

# A worker that lived at least this long is healthy: its next restart comes without delay.
_HEALTHY_AFTER_SECONDS = 30.0
_RESTART_DELAY_MAX_SECONDS = 30.0
# Beyond the graceful shutdown, how long a worker gets before it is killed.
_STOP_MARGIN_SECONDS = 5.0


def spreads_connections() -> bool:
    """Whether the kernel spreads connections over sockets sharing a port (Linux 3.9 and later)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) with SO_REUSEPORT; not yet listening."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[
        0
    ]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def listening(host: str, port: int) -> bool:
    """Whether something accepts connections on (host, port) already."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(address) == 0


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel send this process SIGTERM when the supervisor dies, even by SIGKILL, so
    no worker outlives it and keeps the port."""
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:  # the supervisor died before prctl took effect
        raise SystemExit(0)


def run_worker(host: str, port: int, uvicorn_options: dict[str, Any], parent_pid: int) -> None:
    """A worker process: its own socket, one uvicorn server (which listens on it)."""
    import uvicorn

    _die_with_parent(parent_pid)
    sock = bind(host, port)
    uvicorn.Server(uvicorn.Config(**uvicorn_options)).run(sockets=[sock])


class Supervisor:
    def __init__(
        self, host: str, port: int, workers: int, uvicorn_options: dict[str, Any], graceful_seconds: float
    ) -> None:
        self._host = host
        self._port = port
        self._count = workers
        self._options = uvicorn_options
        self._graceful_seconds = graceful_seconds
        self._context = multiprocessing.get_context("spawn")
        self._stopping = False
        self._failures = 0

    def run(self) -> int:
        # SO_REUSEPORT would let this bind succeed beside another konvert on the port (the two
        # would split its connections), so ask first whether anything listens there.
        if listening(self._host, self._port):
            raise OSError(errno.EADDRINUSE, f"something listens on {self._host}:{self._port} already")
        guard = bind(self._host, self._port)  # fails now if a program without SO_REUSEPORT has it
        previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        workers: list[BaseProcess] = []
        try:
            for _ in range(self._count):
                workers.append(self._start())
            started = [time.monotonic()] * self._count
            while not self._stopping:
                time.sleep(0.2)
                for i, worker in enumerate(workers):
                    if worker.is_alive() or self._stopping:
                        continue
                    lived = time.monotonic() - started[i]
                    self._failures = 0 if lived >= _HEALTHY_AFTER_SECONDS else self._failures + 1
                    delay = min(_RESTART_DELAY_MAX_SECONDS, 0.5 * 2 ** (self._failures - 1)) if self._failures else 0.0
                    log.error(
                        "worker exited; restarting it",
                        extra={
                            "worker_pid": worker.pid,
                            "exitcode": worker.exitcode,
                            "lived_s": round(lived, 1),
                            "delay_s": delay,
                        },
                    )
                    self._sleep_unless_stopping(delay)
                    if not self._stopping:
                        workers[i], started[i] = self._start(), time.monotonic()
            return 0
        finally:
            self._stop_all(workers)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            guard.close()

    def _start(self) -> BaseProcess:
        worker = self._context.Process(
            target=run_worker,
            args=(self._host, self._port, self._options, os.getpid()),
            name="konvert-worker",
            daemon=False,
        )
        worker.start()
        return worker

    def _stop(self, signum: int, frame: object) -> None:
        self._stopping = True

    def _sleep_unless_stopping(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stopping and time.monotonic() < deadline:
            time.sleep(0.1)

    def _stop_all(self, workers: list[BaseProcess]) -> None:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()  # SIGTERM: uvicorn's graceful shutdown
        deadline = time.monotonic() + self._graceful_seconds + _STOP_MARGIN_SECONDS
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                log.error("worker did not stop in time; killing it", extra={"worker_pid": worker.pid})
                worker.kill()
                worker.join()
