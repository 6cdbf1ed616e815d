"""Serving the app over HTTP: Granian, with its own worker processes.

Granian runs ``KONVERT_WORKERS`` worker processes; on Linux each binds its own listening socket
to the address (``SO_REUSEPORT``), so the kernel spreads new connections over them, and a worker
that dies is started again. SIGTERM or SIGINT stop the workers gracefully: each finishes the
requests in flight and runs the app's shutdown. A worker whose serve process is gone (killed
without a chance to stop it) stops itself rather than keep the port.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from typing import Any

from granian import Granian
from granian.constants import Interfaces, Loops
from granian.http import HTTP1Settings
from granian.log import LogLevels

from konvert.errors import ConfigurationError
from konvert.settings import Settings

log = logging.getLogger("konvert.serve")

# The serve process's pid, for its workers to notice when it is gone.
SERVE_PID_VARIABLE = "_KONVERT_SERVE_PID"  # not a setting: konvert sets it for its workers
# How long a stopping worker may take to finish the requests in flight before it is killed.
GRACEFUL_SHUTDOWN_SECONDS = 10


def listening(host: str, port: int) -> bool:
    """Whether something accepts connections on (host, port) already."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(address) == 0


def stop_when_orphaned() -> None:
    """In a worker started by ``serve``: stop gracefully (SIGTERM to itself) once the serve
    process is gone. Its workers would otherwise go on serving on the port, unsupervised, and a
    restarted konvert would share the port with them."""
    serve_pid = os.environ.get(SERVE_PID_VARIABLE)
    if not serve_pid:
        return  # not a worker of serve (a test, another ASGI server)
    # (If serve is gone already, while this worker was starting, the watch stops it at once.)

    def watch() -> None:
        while os.getppid() == int(serve_pid):
            time.sleep(1.0)
        log.warning("the serve process is gone; stopping this worker")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="konvert-orphan-watch", daemon=True).start()


def log_config(settings: Settings) -> dict[str, Any]:
    """Granian's own log lines (start, stop, workers) in konvert's format, on stderr."""
    formatter = "JsonFormatter" if settings.log_format == "json" else "TextFormatter"
    level = settings.log_level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"konvert": {"()": f"konvert.observability.{formatter}"}},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "konvert", "stream": "ext://sys.stderr"}
        },
        "loggers": {"_granian": {"handlers": ["stderr"], "level": level, "propagate": False}},
    }


def serve(settings: Settings) -> None:
    """Serve ``konvert.app:app_from_environment`` until stopped. The worker processes build
    their settings from the environment, which must hold the resolved server URLs."""
    # On a port that something listens on already, a worker's SO_REUSEPORT bind would succeed
    # and share the port's connections with it: refuse instead.
    if listening(settings.host, settings.port):
        raise ConfigurationError(f"cannot listen on {settings.host}:{settings.port}: something listens there already")
    # Workers start from a fresh interpreter rather than a fork of this process: nothing of it
    # (the embedded servers' handles, metrics set up before PROMETHEUS_MULTIPROC_DIR) leaks in.
    multiprocessing.set_start_method("spawn", force=True)
    os.environ[SERVE_PID_VARIABLE] = str(os.getpid())
    Granian(
        "konvert.app:app_from_environment",
        factory=True,
        interface=Interfaces.ASGI,
        address=settings.host,
        port=settings.port,
        workers=settings.workers,
        loop=Loops.uvloop,
        websockets=False,
        # A client that drips its headers is cut off (konvert's request observer times the body).
        http1_settings=HTTP1Settings(header_read_timeout=round(settings.header_read_timeout_seconds * 1000)),
        # Granian holds a permit per connection it serves: a flood of idle connections waits in
        # the backlog instead of taking a file descriptor each.
        backpressure=settings.connections_max_per_worker,
        log_enabled=True,
        log_level=LogLevels(settings.log_level),
        log_dictconfig=log_config(settings),
        log_access=False,  # konvert writes its own, with request ids and route templates
        respawn_failed_workers=True,
        workers_kill_timeout=GRACEFUL_SHUTDOWN_SECONDS,
    ).serve()
