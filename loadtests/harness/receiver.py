"""The load tests' webhook receiver (an ASGI app for uvicorn): 204 to every POST, and the number of
POSTs so far to a GET."""

from __future__ import annotations

from typing import Any

_received = 0


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global _received
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    while (await receive()).get("more_body"):
        pass
    if scope["method"] == "POST":
        _received += 1
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": str(_received).encode()})
