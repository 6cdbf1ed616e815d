"""What the direct answers share: konvert answering its most frequent requests without the
web framework (``app.KonvertApp``; docs/ARCHITECTURE.md, "Direct answers").

A direct answer either answers the whole request, exactly as its route would, or gives it back
to the route before anything was sent, with its body still to be read (``Replay``). Errors that
happen after a request was taken on are rendered by the same handlers the routes use
(``problems.EXCEPTION_HANDLERS``), so their problem+json is the same too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

# Litestar's own check of the Host header, which its router applies before routing: a request
# it would refuse must reach it.
from litestar._asgi.utils import is_valid_host

from konvert.problems import EXCEPTION_HANDLERS
from konvert.services import Services

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def takes_on(scope: dict[str, Any]) -> bool:
    """Whether a direct answer may look at this request at all: not when the framework's router
    would refuse it before routing (an invalid Host header), nor when the app is mounted under
    a root path (the framework's paths and problem ``instance`` then differ from the scope's)."""
    if scope.get("root_path"):
        return False
    for key, value in scope["headers"]:
        if key == b"host":
            return is_valid_host(value)
    return True


def header(scope: dict[str, Any], name: bytes) -> str | None:
    """The first value of a request header (names are lower case in ASGI), as the framework
    decodes it."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


async def allowed(services: Services, scope: dict[str, Any], required: str) -> bool:
    """Whether the request's key is valid and carries the scope; False for every refusal, which
    the route then makes (401 or 403), and when the key could not be looked up (the route's
    guard tries again and answers 503 if it fails too)."""
    try:
        principal = await services.keys.authenticate(header(scope, b"authorization"))
    except Exception:  # noqa: BLE001 - a refusal, or a failed lookup: the route's guard says which
        return False
    return principal.allows(required)


async def send_json(
    send: Send,
    status: int,
    body: bytes,
    *headers: tuple[bytes, bytes],
    media_type: bytes = b"application/json",
) -> None:
    # In the framework's order: the response's own headers, then content type and length.
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-type", media_type), (b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _RequestView:
    """What the error handlers read of a request: its path and method."""

    class _Url:
        def __init__(self, path: str) -> None:
            self.path = path

    def __init__(self, scope: dict[str, Any]) -> None:
        self.url = self._Url(scope["path"])
        self.method = scope["method"]


async def send_error(scope: dict[str, Any], send: Send, exc: Exception) -> None:
    """The problem+json the routes' exception handlers make of ``exc``."""
    handler = next(EXCEPTION_HANDLERS[kind] for kind in type(exc).__mro__ if kind in EXCEPTION_HANDLERS)
    response = handler(_RequestView(scope), exc)
    extra = [
        (name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in response.headers.items()
    ]
    body = msgspec.json.encode(response.content)
    await send_json(send, response.status_code, body, *extra, media_type=response.media_type.encode())


class Replay:
    """The request's receive for the route, after a direct answer read part of the body: the
    messages already read first, then the rest of the stream."""

    def __init__(self, read: list[Message], receive: Receive) -> None:
        self._read = read
        self._receive = receive

    async def __call__(self) -> Message:
        if self._read:
            return self._read.pop(0)
        return await self._receive()


async def read_body(
    scope: dict[str, Any], receive: Receive, limit: int
) -> tuple[bytes | None, list[Message]]:
    """The whole request body, or None when it is larger than ``limit`` or the client went away
    (the route then says so); and the messages read, for a ``Replay``."""
    length = header(scope, b"content-length")
    if length is not None and (not (length.isascii() and length.isdigit()) or int(length) > limit):
        return None, []
    read: list[Message] = []
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        read.append(message)
        if message["type"] != "http.request":
            return None, read
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None, read
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), read
