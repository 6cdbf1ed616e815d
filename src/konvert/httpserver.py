"""uvicorn's httptools protocol, with a response's writes sent together.

uvicorn writes a response's status line and headers as soon as the app sends
``http.response.start``, and its body when the app sends ``http.response.body``: two ``send``
system calls, and two TCP segments for the client to take in, for every small JSON answer. Here
the connection's writes wait until the current turn of the event loop ends and then go out in
one, so a response sent within one turn (every answer konvert sends whole: the direct paths and
the framework's responses alike) costs one system call and one segment. A streamed body still
goes out as it comes, a turn at a time. Nothing else about the protocol changes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _WritesTogether:
    """The connection's transport, its writes of one turn of the loop joined into one."""

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._pending: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        if not self._pending:
            return  # flushed early by close() or set_protocol(), or dropped by abort()
        pending, self._pending = self._pending, []
        if not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self._flush()  # what was written before close() still goes out, as with the transport
        self._transport.close()

    def abort(self) -> None:
        self._pending = []
        self._transport.abort()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._flush()
        self._transport.set_protocol(protocol)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class HttpProtocol(HttpToolsProtocol):
    """``konvert serve``'s HTTP/1.1 protocol (uvicorn's ``http`` option)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_WritesTogether(transport))  # type: ignore[arg-type]
