"""uvicorn's httptools protocol, with a response's writes sent together.

uvicorn writes a response's status line and headers as soon as the app sends
``http.response.start``, and its body when the app sends ``http.response.body``: two ``send``
system calls, and two TCP segments for the client to take in, for every small JSON answer. Here
the connection's writes wait until the current turn of the event loop ends and then go out in
one, so a response sent within one turn (every answer konvert sends whole: the direct paths and
the framework's responses alike) costs one system call and one segment.

What stays as it was: the order of the bytes; a streamed body goes out as it comes, a turn at a
time; back-pressure (more than ``_FLUSH_AT_BYTES`` held goes out at once, so the transport's
flow control pauses the sender as before); what was written before the connection is closed,
or before the client half-closes it, is sent first; a body that is not bytes fails the send
that gave it, as the transport would.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("konvert.http")

# Held writes beyond this size go out at once (uvloop's default high-water mark is 64 KiB).
_FLUSH_AT_BYTES = 64 * 1024


class _WritesTogether:
    """The connection's transport, its writes of one turn of the loop joined into one."""

    __slots__ = ("_held_bytes", "_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._pending: list[bytes] = []
        self._held_bytes = 0
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not isinstance(data, bytes):
            if not isinstance(data, bytearray | memoryview):
                raise TypeError(f"data: expecting a bytes-like instance, got {type(data).__name__}")
            data = bytes(data)  # held past the caller's return: a copy, as the transport's buffer is
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)
        self._held_bytes += len(data)
        if self._held_bytes >= _FLUSH_AT_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return  # flushed early, or dropped by abort()
        pending, self._pending, self._held_bytes = self._pending, [], 0
        if self._transport.is_closing():
            return  # as the transport itself does with writes after close
        try:
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))
        except Exception:  # a callback's error would reach no request: end the connection instead
            log.exception("response write failed; closing the connection")
            self._transport.abort()

    def close(self) -> None:
        self.flush()  # what was written before close() still goes out, as with the transport
        self._transport.close()

    def abort(self) -> None:
        self._pending, self._held_bytes = [], 0
        self._transport.abort()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.flush()
        self._transport.set_protocol(protocol)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + self._held_bytes

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class HttpProtocol(HttpToolsProtocol):
    """``konvert serve``'s HTTP/1.1 protocol (uvicorn's ``http`` option)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_WritesTogether(transport))  # type: ignore[arg-type]

    def eof_received(self) -> None:
        # The client half-closed: uvloop closes the transport when this returns, before the turn
        # ends, so what is held goes out now.
        if isinstance(self.transport, _WritesTogether):
            self.transport.flush()
        super().eof_received()
