"""konvert serve's HTTP protocol over real loopback sockets: a response sent within one turn of
the event loop leaves in one write, and nothing else about HTTP changes."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import uvicorn

from konvert.httpserver import HttpProtocol

WRITES: list[bytes] = []


class _CountedTransport:
    """The real transport, with every write it is given remembered."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport

    def write(self, data: bytes) -> None:
        WRITES.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _CountingProtocol(HttpProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_CountedTransport(transport))  # type: ignore[arg-type]


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path in ("/whole", "/missing"):
        status, body = (200, b'{"ok":true}') if path == "/whole" else (404, b"no such page")
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
    elif path == "/stream":  # the second chunk only after the client has read the first
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        )
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        await asyncio.wait_for(SECOND_CHUNK.wait(), 5)
        await send({"type": "http.response.body", "body": b"second"})


SECOND_CHUNK = asyncio.Event()


@contextlib.asynccontextmanager
async def _served() -> AsyncIterator[int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(_app, http=_CountingProtocol, lifespan="off", log_config=None, access_log=False)
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    WRITES.clear()
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await task
        sock.close()


async def _read_response(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    return head + await reader.readexactly(length)


async def test_a_whole_response_leaves_in_one_write() -> None:
    async with _served() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(3):  # keep-alive: every response of the connection
            writer.write(b"GET /whole HTTP/1.1\r\nhost: t\r\n\r\n")
            response = await _read_response(reader)
            assert response.startswith(b"HTTP/1.1 200 OK\r\n")
            assert response.endswith(b'\r\n\r\n{"ok":true}')
        writer.close()

    assert len(WRITES) == 3  # uvicorn's own protocol writes each response's head and body apart
    assert all(write.endswith(b'{"ok":true}') for write in WRITES)


async def test_pipelined_requests_get_their_responses_in_order() -> None:
    async with _served() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /whole HTTP/1.1\r\nhost: t\r\n\r\nGET /missing HTTP/1.1\r\nhost: t\r\n\r\n" * 2)
        responses = [await _read_response(reader) for _ in range(4)]
        writer.close()

    assert [response.split(b" ")[1] for response in responses] == [b"200", b"404", b"200", b"404"]
    assert [response.rsplit(b"\r\n", 1)[1] for response in responses] == [b'{"ok":true}', b"no such page"] * 2


async def test_a_streamed_body_goes_out_as_it_comes() -> None:
    SECOND_CHUNK.clear()
    async with _served() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /stream HTTP/1.1\r\nhost: t\r\n\r\n")
        await reader.readuntil(b"\r\n\r\n")
        # The first chunk arrives while the app still waits to send the second.
        assert await asyncio.wait_for(reader.readuntil(b"first\r\n"), 5) == b"5\r\nfirst\r\n"
        SECOND_CHUNK.set()
        assert await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 5) == b"6\r\nsecond\r\n0\r\n\r\n"
        writer.close()


async def test_a_response_that_closes_the_connection_is_sent_whole_first() -> None:
    async with _served() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /whole HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        received = await asyncio.wait_for(reader.read(), 5)  # until the server closes
        writer.close()

    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"connection: close\r\n" in received
    assert received.endswith(b'{"ok":true}')
