"""The portal's sessions: Litestar's server-side sessions in Redis, through Litestar's session
middleware, with a backend that adds three things to Litestar's own (``ServerSideSessionBackend``,
whose documented methods it overrides):

* **A new id at every entry.** Opening a portal link stores the member's session under an id made
  for it, never under one the browser brought along, and forgets the session that id had: an id
  planted in the member's browser beforehand (session fixation) leads to nothing.
* **No write for an unchanged session.** Litestar's backend stores the session, and sends its
  cookie, with every response. This one does so only when a request changed the session; reading
  it renews its idle timeout in the same round trip (a Lua script of Litestar's Redis store).
* **Two timeouts.** Redis keeps a session for the idle timeout after its last use; the cookie lives
  for the absolute timeout (the guard checks when the session started), so an unchanged session
  needs no new cookie while the member keeps using it.
"""

from __future__ import annotations

import secrets
from typing import Any

from litestar.connection import ASGIConnection
from litestar.middleware import DefineMiddleware
from litestar.middleware.session import SessionMiddleware
from litestar.middleware.session.server_side import ServerSideSessionBackend, ServerSideSessionConfig
from litestar.stores.base import Store
from litestar.types import Empty, Message, ScopeSession

COOKIE = "konvert_portal"
# Keys in the request's state (Litestar's `request.state`, one per request).
_FRESH_ID = "konvert.portal.session.fresh_id"
_LOADED = "konvert.portal.session.loaded"


class PortalSessionBackend(ServerSideSessionBackend):
    def __init__(self, config: ServerSideSessionConfig, idle_seconds: int) -> None:
        super().__init__(config=config)
        self.idle_seconds = idle_seconds

    def get_session_id(self, connection: ASGIConnection[Any, Any, Any, Any]) -> str:
        fresh: str | None = connection.state.get(_FRESH_ID)
        return fresh or super().get_session_id(connection)

    async def get(self, session_id: str, store: Store) -> bytes | None:
        return await store.get(session_id, renew_for=self.idle_seconds)

    async def set(self, session_id: str, data: bytes, store: Store) -> None:
        await store.set(session_id, data, expires_in=self.idle_seconds)

    async def load_from_connection(self, connection: ASGIConnection[Any, Any, Any, Any]) -> dict[str, Any]:
        data = await super().load_from_connection(connection)
        # A copy: a handler changes the session in place (request.session["locale"] = ...).
        connection.state[_LOADED] = dict(data)
        return data

    async def store_in_message(
        self, scope_session: ScopeSession, message: Message, connection: ASGIConnection[Any, Any, Any, Any]
    ) -> None:
        state = connection.state
        unchanged = scope_session is not Empty and scope_session == state.get(_LOADED)
        if unchanged and _FRESH_ID not in state:
            return
        await super().store_in_message(scope_session, message, connection)


def middleware(config: ServerSideSessionConfig, idle_seconds: int) -> DefineMiddleware:
    """Litestar's session middleware with the portal's backend."""
    return DefineMiddleware(SessionMiddleware, backend=PortalSessionBackend(config, idle_seconds))


async def begin(connection: ASGIConnection[Any, Any, Any, Any], store: Store, data: dict[str, Any]) -> None:
    """Start a session holding ``data`` under a new id (sent as the cookie with this response),
    and forget the session of the id the browser brought, if any."""
    brought = connection.cookies.get(COOKIE)
    connection.state[_FRESH_ID] = secrets.token_hex(32)  # as many random bytes as Litestar's ids
    if brought:
        await store.delete(brought)
    connection.set_session(data)
