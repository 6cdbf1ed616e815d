"""konvert serve's HTTP protocol over real loopback sockets, on uvloop (what ``konvert serve``
runs) and on asyncio: a response sent within one turn of the event loop leaves in one write,
and nothing else about HTTP changes."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
import uvicorn
import uvloop

from konvert.httpserver import HttpProtocol

WRITES: list[bytes] = []
CHUNK = b"x" * (1024 * 1024)
CHUNKS = 64


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


class _App:
    def __init__(self) -> None:
        self.second_chunk = asyncio.Event()
        self.chunks_sent = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
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
            await asyncio.wait_for(self.second_chunk.wait(), 5)
            await send({"type": "http.response.body", "body": b"second"})
        elif path == "/large":  # sent without yielding, unless flow control pauses the sender
            headers = [(b"content-length", b"%d" % (len(CHUNK) * CHUNKS))]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            for _ in range(CHUNKS):
                await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
                self.chunks_sent += 1
            await send({"type": "http.response.body", "body": b""})
        elif path == "/not-bytes":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": "ok"})


RUNNERS: dict[str, Callable[[Coroutine[Any, Any, None]], None]] = {
    "uvloop": uvloop.run,
    "asyncio": asyncio.run,
}


@pytest.fixture(params=sorted(RUNNERS))
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, None]], None]:
    return RUNNERS[request.param]


@contextlib.asynccontextmanager
async def _served(app: _App) -> AsyncIterator[int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app, http=_CountingProtocol, lifespan="off", log_config=None, access_log=False, timeout_keep_alive=30
    )
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


def test_a_whole_response_leaves_in_one_write(run: Any) -> None:
    async def scenario() -> None:
        async with _served(_App()) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(3):  # keep-alive: every response of the connection
                writer.write(b"GET /whole HTTP/1.1\r\nhost: t\r\n\r\n")
                response = await asyncio.wait_for(_read_response(reader), 5)
                assert response.startswith(b"HTTP/1.1 200 OK\r\n")
                assert response.endswith(b'\r\n\r\n{"ok":true}')
            writer.close()

        assert len(WRITES) == 3  # uvicorn's own protocol writes each response's head and body apart
        assert all(write.endswith(b'{"ok":true}') for write in WRITES)

    run(scenario())


def test_pipelined_requests_get_their_responses_in_order(run: Any) -> None:
    async def scenario() -> None:
        async with _served(_App()) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"GET /whole HTTP/1.1\r\nhost: t\r\n\r\nGET /missing HTTP/1.1\r\nhost: t\r\n\r\n" * 2
            )
            responses = [await asyncio.wait_for(_read_response(reader), 5) for _ in range(4)]
            writer.close()

        assert [response.split(b" ")[1] for response in responses] == [b"200", b"404", b"200", b"404"]
        assert [response.rsplit(b"\r\n", 1)[1] for response in responses] == [
            b'{"ok":true}',
            b"no such page",
        ] * 2

    run(scenario())


def test_a_streamed_body_goes_out_as_it_comes(run: Any) -> None:
    async def scenario() -> None:
        app = _App()
        async with _served(app) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /stream HTTP/1.1\r\nhost: t\r\n\r\n")
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            # The first chunk arrives while the app still waits to send the second.
            assert await asyncio.wait_for(reader.readuntil(b"first\r\n"), 5) == b"5\r\nfirst\r\n"
            app.second_chunk.set()
            assert await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 5) == b"6\r\nsecond\r\n0\r\n\r\n"
            writer.close()

    run(scenario())


def test_a_response_that_closes_the_connection_is_sent_whole_first(run: Any) -> None:
    async def scenario() -> None:
        async with _served(_App()) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /whole HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
            received = await asyncio.wait_for(reader.read(), 5)  # until the server closes
            writer.close()

        assert received.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"connection: close\r\n" in received
        assert received.endswith(b'{"ok":true}')

    run(scenario())


def test_a_client_that_half_closes_after_its_request_gets_the_response(run: Any) -> None:
    async def scenario() -> None:
        async with _served(_App()) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /whole HTTP/1.1\r\nhost: t\r\n\r\n")
            writer.write_eof()  # the request and the end of the stream arrive together
            received = await asyncio.wait_for(reader.read(), 5)
            writer.close()

        assert received.startswith(b"HTTP/1.1 200 OK\r\n")
        assert received.endswith(b'{"ok":true}')

    run(scenario())


def test_a_client_that_reads_nothing_pauses_a_large_response(run: Any) -> None:
    async def scenario() -> None:
        app = _App()
        async with _served(app) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /large HTTP/1.1\r\nhost: t\r\n\r\n")
            await asyncio.sleep(0.5)
            paused_after = app.chunks_sent  # the kernel's buffers plus the transport's high-water mark
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            body = await asyncio.wait_for(reader.readexactly(len(CHUNK) * CHUNKS), 30)
            writer.close()

        assert paused_after < CHUNKS // 2, paused_after
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert body == CHUNK * CHUNKS

    run(scenario())


def test_a_body_that_is_not_bytes_fails_its_request_and_ends_the_connection(run: Any) -> None:
    async def scenario() -> None:
        async with _served(_App()) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /not-bytes HTTP/1.1\r\nhost: t\r\n\r\n")
            # Closed at once (the head already went out), not left open until the keep-alive timeout.
            received = await asyncio.wait_for(reader.read(), 5)
            writer.close()

        assert received.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"ok" not in received.split(b"\r\n\r\n", 1)[1]

    run(scenario())
