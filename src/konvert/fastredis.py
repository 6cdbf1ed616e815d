"""A multiplexed Redis connection for the hot read path (cached balances).

redis-py's asyncio client checks a connection out of a pool, wraps every call in retry and
deprecation helpers, and waits for each reply before the connection serves anyone else: about
60 µs of CPU per HGET here, more than the rest of a balance read. This sends every command at
once on one shared connection and matches replies in order (Redis answers in order), parsing
with hiredis' C reader. Concurrent requests therefore share one connection and its syscalls:
commands issued in the same turn of the event loop go out in one write (auto-pipelining).

It does only what the hot path needs: send a command, get its reply, fail fast. On a timeout or
a lost connection every waiting command fails (the stream can no longer be trusted) and the
next command reconnects. Everything else in konvert uses redis-py.

With ``on_push`` it speaks RESP3 and turns on client-side caching (``CLIENT TRACKING ON``):
Redis remembers the keys this connection read and sends an ``invalidate`` push, in order with
the replies, when one of them changes or expires. ``epoch`` counts the connections that did so;
anything learned on an earlier one is stale (while no connection was up, nobody told us of
changes). A Redis that refuses (older than 6, or an ACL without ``CLIENT``) gets a plain RESP2
connection, and ``tracking`` stays False.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis

from konvert.errors import ConfigurationError

log = logging.getLogger("konvert.cache")


class RedisUnavailable(ConnectionError):
    pass


class _TrackingRefused(Exception):
    pass


def _encode(args: tuple[bytes | str | int, ...]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _Protocol(asyncio.Protocol):
    def __init__(self, on_push: Callable[[list[Any]], None] | None = None) -> None:
        self._reader = hiredis.Reader()
        self._on_push = on_push
        self.waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.lost = False
        # Commands sent during one turn of the event loop, written together at its end.
        self._outgoing: list[bytes] = []

    def send(self, command: bytes) -> None:
        """Queue a command; the queue goes out in one write when this turn of the loop ends, so
        the balance reads of requests that arrived together cost Redis and the kernel one write."""
        if not self._outgoing:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outgoing.append(command)

    def _flush(self) -> None:
        outgoing, self._outgoing = self._outgoing, []
        if self.transport is not None and not self.lost:
            self.transport.write(b"".join(outgoing))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            if isinstance(reply, hiredis.PushNotification):
                if self._on_push is not None:
                    self._on_push(reply)
                continue
            waiter = self.waiters.popleft()
            if waiter.done():
                continue  # its caller gave up; the reply still had to be consumed in order
            if isinstance(reply, hiredis.ReplyError):
                waiter.set_exception(RedisUnavailable(str(reply)))
            else:
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.fail_all(RedisUnavailable(f"connection lost: {exc!r}"))

    def fail_all(self, error: Exception) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)


SUPPORTED_SCHEMES = ("redis", "unix")


class MultiplexedRedis:
    """Plain TCP or unix-socket Redis (``redis://`` and ``unix://`` URLs; TLS is left to redis-py)."""

    def __init__(
        self, url: str, timeout_seconds: float, on_push: Callable[[list[Any]], None] | None = None
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in SUPPORTED_SCHEMES:
            raise ConfigurationError(f"KONVERT_REDIS_URL: the fast path does not support {parts.scheme!r}")
        self._unix_path = parts.path if parts.scheme == "unix" else None
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 6379
        self._password = unquote(parts.password) if parts.password else None
        self._username = unquote(parts.username) if parts.username else None
        self._db = int(parts.path.lstrip("/") or 0) if parts.scheme == "redis" else 0
        self._timeout_seconds = timeout_seconds
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._on_push = on_push
        # Whether the current connection tracks keys; False until one does, and for good once
        # Redis refused.
        self.tracking = False
        self._tracking_refused = on_push is None
        self.epoch = 0
        # Pushes received so far, so that a reader can tell whether one came while it waited.
        self.pushes = 0

    def _pushed(self, push: list[Any]) -> None:
        self.pushes += 1
        if self._on_push is not None:
            self._on_push(push)

    def tracking_since(self, epoch: int) -> bool:
        """Whether the connection of ``epoch`` is up and tracking: every change since it
        connected has been, or will be in order, pushed to ``on_push``."""
        protocol = self._protocol
        return self.tracking and epoch == self.epoch and protocol is not None and not protocol.lost

    async def execute(self, *args: bytes | str | int) -> Any:
        protocol = self._protocol
        if protocol is None or protocol.lost:
            protocol = await self._connect()
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        protocol.waiters.append(waiter)
        protocol.send(_encode(args))
        timer = loop.call_later(self._timeout_seconds, self._time_out, protocol, waiter)
        try:
            return await waiter
        finally:
            timer.cancel()

    def _time_out(self, protocol: _Protocol, waiter: asyncio.Future[Any]) -> None:
        if waiter.done():
            return
        # Replies come in order, so a late one would be taken for the next command's: drop the
        # connection and fail everything waiting on it.
        protocol.fail_all(RedisUnavailable(f"no reply within {self._timeout_seconds}s"))
        if protocol.transport is not None:
            protocol.transport.abort()
        protocol.lost = True

    async def _connect(self) -> _Protocol:
        # Whoever needs the connection while it is being opened waits for that one attempt and
        # shares its outcome: a Redis that does not answer costs them one timeout together.
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._establish())
            self._connecting.add_done_callback(self._attempt_over)
        return await asyncio.shield(self._connecting)

    def _attempt_over(self, attempt: asyncio.Future[_Protocol]) -> None:
        self._connecting = None
        if not attempt.cancelled():
            attempt.exception()  # retrieved here, so an attempt nobody awaits any more logs nothing

    async def _establish(self) -> _Protocol:
        if self._protocol is not None and not self._protocol.lost:
            return self._protocol
        if not self._tracking_refused:
            try:
                protocol = await self._open(tracking=True)
            except _TrackingRefused as exc:
                self._tracking_refused = True
                log.warning(
                    "redis refused client-side caching; the near cache is off", extra={"error": str(exc)}
                )
            else:
                self.epoch += 1
                self.tracking = True
                self._protocol = protocol
                return protocol
        self.tracking = False
        self._protocol = await self._open(tracking=False)
        return self._protocol

    async def _open(self, *, tracking: bool) -> _Protocol:
        loop = asyncio.get_running_loop()
        on_push = self._pushed if tracking else None
        try:
            if self._unix_path is not None:
                connect = loop.create_unix_connection(lambda: _Protocol(on_push), self._unix_path)
            else:
                connect = loop.create_connection(lambda: _Protocol(on_push), self._host, self._port)
            _, protocol = await asyncio.wait_for(connect, self._timeout_seconds)
        except (OSError, TimeoutError) as exc:
            raise RedisUnavailable(f"cannot connect: {exc!r}") from exc
        # Published only once authenticated and on the URL's database: a command sent
        # earlier would run as the wrong user or on database 0.
        step = "handshake"
        try:
            if tracking:
                hello: tuple[Any, ...] = ("HELLO", 3)
                if self._password is not None:
                    hello += ("AUTH", self._username or "default", self._password)
                step = "HELLO 3"
                await self._handshake(protocol, hello)
            elif self._password is not None:
                auth = (
                    ("AUTH", self._username, self._password) if self._username else ("AUTH", self._password)
                )
                await self._handshake(protocol, auth)
            step = "handshake"
            if self._db:
                await self._handshake(protocol, ("SELECT", self._db))
            if tracking:
                step = "CLIENT TRACKING"
                await self._handshake(protocol, ("CLIENT", "TRACKING", "ON"))
        except (RedisUnavailable, TimeoutError) as exc:
            protocol.fail_all(RedisUnavailable("handshake failed"))
            if protocol.transport is not None:
                protocol.transport.abort()
            refused = isinstance(exc, RedisUnavailable) and not str(exc).startswith(("WRONGPASS", "NOAUTH"))
            if step != "handshake" and refused:
                raise _TrackingRefused(f"{step}: {exc}") from exc
            raise RedisUnavailable(f"handshake failed: {exc}") from exc
        return protocol

    async def _handshake(self, protocol: _Protocol, command: tuple[Any, ...]) -> None:
        assert protocol.transport is not None
        waiter = asyncio.get_running_loop().create_future()
        protocol.waiters.append(waiter)
        protocol.transport.write(_encode(command))
        await asyncio.wait_for(waiter, self._timeout_seconds)

    def close(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None
