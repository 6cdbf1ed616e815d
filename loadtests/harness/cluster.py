"""A local Redis Cluster for ``--redis-cluster``: three masters (no replicas) on free loopback
ports, in a temporary directory that goes with them when the run ends."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

MASTERS = 3
START_TIMEOUT_S = 30.0


def _free_port() -> int:
    """A free port whose cluster bus port (10000 above it, as every Redis version takes) is free too."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        if port + 10000 > 65535:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def _cli(port: int, *args: str) -> str:
    command = ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args]
    return subprocess.run(command, check=True, capture_output=True, text=True, timeout=60).stdout


def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            if condition():
                return
        time.sleep(0.05)
    raise RuntimeError(f"the local Redis Cluster: {what} within {START_TIMEOUT_S:g} s")


@contextlib.contextmanager
def local_cluster() -> Iterator[str]:
    """Start the cluster and yield its ``redis+cluster://`` URL; stop and remove it afterwards."""
    root = Path(tempfile.mkdtemp(prefix="konvert-bench-cluster-"))
    processes: list[subprocess.Popen[bytes]] = []
    ports = [_free_port() for _ in range(MASTERS)]
    try:
        for port in ports:
            command = [
                "redis-server", "--port", str(port), "--bind", "127.0.0.1",
                "--cluster-enabled", "yes", "--cluster-config-file", str(root / f"nodes-{port}.conf"),
                "--dir", str(root), "--save", "", "--appendonly", "no",
            ]  # fmt: skip
            processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in ports:
            _until(lambda port=port: _cli(port, "ping").strip() == "PONG", f"port {port} did not answer")
        addresses = [f"127.0.0.1:{port}" for port in ports]
        _cli(ports[0], "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes")
        _until(
            lambda: all("cluster_state:ok" in _cli(port, "cluster", "info") for port in ports),
            "the masters did not agree that the cluster is ok",
        )
        yield "redis+cluster://" + ",".join(addresses)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)
