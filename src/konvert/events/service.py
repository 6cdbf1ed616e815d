"""Events use cases: webhook endpoints (admin), their messages and dead letters, and the pull feed."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

import asyncpg
import msgspec

from konvert import errors
from konvert.events import destinations, rules, store
from konvert.events.model import EndpointIn, EndpointList, EndpointOut, Envelope, EventPage, MessageOut, MessagePage
from konvert.pagination import decode_cursor, encode_cursor
from konvert.vault import Vault

if TYPE_CHECKING:
    from konvert.services import Services

ENDPOINTS_MAX = 1000


def _endpoint_out(row: asyncpg.Record, *, secret: str | None = None) -> EndpointOut:
    return EndpointOut(
        endpoint_id=row["endpoint_id"],
        url=row["url"],
        event_types=list(row["event_types"]),
        description=row["description"],
        enabled=row["enabled"],
        disabled_reason=row["disabled_reason"],
        failing_since=row["failing_since"],
        secret=secret,
        previous_secret_expires_at=row["previous_secret_expires_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


async def put_endpoint(services: Services, endpoint_id: str, body: EndpointIn) -> tuple[EndpointOut, bool]:
    """Create or change an endpoint; returns it and whether it was created. Its secret is in the
    answer that creates it only (rotate-secret makes a new one), and stored sealed (konvert.vault).
    A URL deliveries may not go to is refused (konvert.events.destinations)."""
    await destinations.check_url(services.settings, body.url)
    secret = rules.new_secret()
    async with services.pool.acquire() as conn:
        row, created = await store.upsert_endpoint(
            conn,
            endpoint_id,
            url=body.url,
            description=body.description,
            event_types=sorted(set(body.event_types)),
            enabled=body.enabled,
            secret=services.shared(Vault).seal_one(secret),
            now=services.clock(),
        )
    return _endpoint_out(row, secret=secret if created else None), created


async def _endpoint_row(services: Services, endpoint_id: str) -> asyncpg.Record:
    row = await store.select_endpoint(services.pool, endpoint_id)
    if row is None:
        raise errors.WebhookEndpointNotFound(f"no webhook endpoint {endpoint_id!r}")
    return row


async def get_endpoint(services: Services, endpoint_id: str) -> EndpointOut:
    return _endpoint_out(await _endpoint_row(services, endpoint_id))


async def list_endpoints(services: Services) -> EndpointList:
    return EndpointList(
        items=[_endpoint_out(row) for row in await store.select_endpoints(services.pool, ENDPOINTS_MAX)]
    )


async def delete_endpoint(services: Services, endpoint_id: str) -> None:
    """Delete the endpoint with its messages; deleting one that is gone changes nothing."""
    await store.delete_endpoint(services.pool, endpoint_id)


async def rotate_secret(services: Services, endpoint_id: str) -> EndpointOut:
    """A new secret signs from now on (returned here, once); the old one signs too for
    ``webhook_secret_grace_seconds``, so receivers can switch without losing a message."""
    now = services.clock()
    grace_until = now + timedelta(seconds=services.settings.webhook_secret_grace_seconds)
    secret = rules.new_secret()
    sealed = services.shared(Vault).seal_one(secret)
    row = await store.rotate_secret(services.pool, endpoint_id, sealed, grace_until, now)
    if row is None:
        raise errors.WebhookEndpointNotFound(f"no webhook endpoint {endpoint_id!r}")
    return _endpoint_out(row, secret=secret)


async def reseal(services: Services) -> int:
    """Store every endpoint's secrets sealed with the first key of KONVERT_SECRET_KEY (also those
    stored before endpoint secrets were sealed); returns how many endpoints."""
    vault = services.shared(Vault)
    async with services.pool.acquire() as conn, conn.transaction():
        rows = await store.select_endpoints(conn, ENDPOINTS_MAX, for_update=True)
        for row in rows:
            previous = row["previous_secret"]
            await store.update_secrets(
                conn,
                row["endpoint_id"],
                vault.seal_one(vault.open_one(row["secret"])),
                vault.seal_one(vault.open_one(previous)) if previous is not None else None,
            )
    return len(rows)


def _message_out(row: asyncpg.Record) -> MessageOut:
    return MessageOut(
        message_id=row["message_id"],
        endpoint_id=row["endpoint_id"],
        event_id=rules.event_id_text(row["event_id"]),
        event_type=row["type"],
        status=row["status"],
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"] if row["status"] == "pending" else None,
        first_attempt_at=row["first_attempt_at"],
        last_attempt_at=row["last_attempt_at"],
        last_status=row["last_status"],
        last_error=row["last_error"],
        finished_at=row["finished_at"],
        created_at=row["created_at"],
    )


async def messages(
    services: Services, endpoint_id: str, status: str | None, cursor: str | None, limit: int
) -> MessagePage:
    """The endpoint's messages, newest first; with ``status=failed``, its dead letters."""
    await _endpoint_row(services, endpoint_id)
    before = decode_cursor("w", cursor) if cursor else None
    rows = await store.select_messages(services.pool, endpoint_id, status, before, limit + 1)
    next_cursor = encode_cursor("w", rows[limit - 1]["message_id"]) if len(rows) > limit else None
    return MessagePage(items=[_message_out(row) for row in rows[:limit]], next_cursor=next_cursor)


async def resend(services: Services, endpoint_id: str, message_id: int) -> MessageOut:
    """Send a dead-lettered message again, with a full retry schedule. A message that is pending
    is already being sent, and a delivered one is never sent again (409)."""
    row = await store.resend_message(services.pool, endpoint_id, message_id, services.clock())
    if row is not None:
        return _message_out(row)
    found = await store.select_message(services.pool, endpoint_id, message_id)
    if found is None:
        raise errors.WebhookMessageNotFound(f"no message {message_id} of webhook endpoint {endpoint_id!r}")
    raise errors.WebhookMessageNotFailed(f"message {message_id} is {found['status']}; only failed ones are re-sent")


_decode_data = msgspec.json.Decoder(dict).decode


async def feed(services: Services, after: str | None, limit: int, types: list[str]) -> EventPage:
    """Events after the cursor, in the outbox's order (a cursor never skips an event numbered
    later); the page's ``next_cursor`` continues from its last event."""
    page = await store.select_feed(services.pool, rules.decode_cursor(after) if after else 0, limit, types)
    items = [
        Envelope(
            id=rules.event_id_text(row["event_id"]),
            type=row["type"],
            occurred_at=row["occurred_at"],
            member_id=row["member_id"],
            sequence=row["sequence"],
            data=_decode_data(row["data"]),
        )
        for row in page.rows
    ]
    return EventPage(items=items, next_cursor=rules.encode_cursor(page.reached))
