"""Connecting sources, looking at their deliveries, and linking their customers to members."""

from __future__ import annotations

from typing import TYPE_CHECKING

import asyncpg
import msgspec

from konvert import errors
from konvert.integrations import service, store
from konvert.integrations.model import (
    DeliveryOut,
    DeliveryPage,
    IdentityOut,
    IntegrationIn,
    IntegrationOut,
    Options,
    RetryResult,
)
from konvert.ledger import reads
from konvert.ledger.book import writing
from konvert.vault import Vault

if TYPE_CHECKING:
    from konvert.services import Services

_decode_options = msgspec.json.Decoder(Options).decode


def webhook_path(name: str) -> str:
    return f"/v1/integrations/{name}/webhooks"


def _out(row: asyncpg.Record) -> IntegrationOut:
    return IntegrationOut(
        name=row["name"],
        kind=row["kind"],
        partner=row["partner"],
        options=_decode_options(row["options"]),
        secrets_count=len(row["secrets"]),
        secrets_encrypted=Vault.sealed(row["secrets"]),
        webhook_path=webhook_path(row["name"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


async def put_integration(services: Services, name: str, integration: IntegrationIn) -> tuple[IntegrationOut, bool]:
    """Connect a source or replace its settings and secrets; whether it is new. Its kind is fixed."""
    if integration.partner is not None and integration.partner not in {p.id for p in services.program.partners}:
        raise errors.UnknownPartner(f"the program has no partner {integration.partner!r}")
    sealed = services.shared(Vault).seal(integration.secrets)
    async with services.pool.acquire() as conn:
        row, created = await store.upsert_integration(
            conn, name, integration.kind, integration.partner, msgspec.json.encode(integration.options), sealed
        )
    if row is None:
        raise errors.Conflict(f"integration {name!r} is of another kind; delete it first to change its kind")
    services.shared(service.Registry).forget(name)
    return _out(row), created


async def get_integration(services: Services, name: str) -> IntegrationOut:
    async with services.pool.acquire() as conn:
        row = await store.select_integration(conn, name)
    if row is None:
        raise errors.IntegrationNotFound(f"no integration {name!r}")
    return _out(row)


async def list_integrations(services: Services) -> list[IntegrationOut]:
    async with services.pool.acquire() as conn:
        return [_out(row) for row in await store.select_integrations(conn)]


async def delete_integration(services: Services, name: str) -> None:
    """Disconnect a source: its links and inbox go with it; what it applied stays in the ledger."""
    async with services.pool.acquire() as conn:
        if not await store.delete_integration(conn, name):
            raise errors.IntegrationNotFound(f"no integration {name!r}")
    services.shared(service.Registry).forget(name)


async def reseal(services: Services) -> int:
    """Store every integration's secrets encrypted with the first key of KONVERT_SECRET_KEY."""
    vault = services.shared(Vault)
    async with services.pool.acquire() as conn, conn.transaction():
        rows = await store.select_integrations(conn)
        for row in rows:
            await store.update_secrets(conn, row["integration_id"], vault.seal(vault.open(row["secrets"])))
    return len(rows)


async def deliveries(services: Services, name: str, status: str | None, before: int | None, limit: int) -> DeliveryPage:
    integration = await services.shared(service.Registry).get(name)
    async with services.pool.acquire() as conn:
        rows = await store.select_deliveries(conn, integration.integration_id, status, before, limit + 1)
    items = [service.delivery_out(row) for row in rows[:limit]]
    return DeliveryPage(items=items, next_before=items[-1].delivery_id if len(rows) > limit else None)


async def retry(services: Services, name: str, statuses: tuple[str, ...]) -> RetryResult:
    """Apply the integration's failed (and/or parked) deliveries again."""
    integration = await services.shared(service.Registry).get(name)
    done = await service.retry(services, integration, statuses)
    return _tally(done)


def _tally(done: list[DeliveryOut]) -> RetryResult:
    return RetryResult(
        tried=len(done),
        applied=sum(d.status == "applied" for d in done),
        still_failed=sum(d.status == "failed" for d in done),
        still_parked=sum(d.status == "parked" for d in done),
    )


# --- identity links ---------------------------------------------------------------------------


async def link(services: Services, member_id: str, name: str, external_id: str) -> tuple[IdentityOut, bool]:
    """Link a source's customer or user to a member (creating the member if new), then apply the
    deliveries parked for it. One external id belongs to one member: 409 if linked to another."""
    integration = await services.shared(service.Registry).get(name)
    async with writing(services) as book:
        member = await book.member(member_id, create=True)
        assert member is not None
        row = await store.insert_link(book.conn, integration.integration_id, external_id, member.uid)
    if row["member_uid"] != member.uid:
        raise errors.Conflict(f"{name} id {external_id!r} is linked to another member")
    applied = await service.apply_parked(services, integration, external_id)
    out = IdentityOut(
        integration=name,
        external_id=external_id,
        member_id=member_id,
        linked_at=row["linked_at"],
        applied_deliveries=sum(d.status == "applied" for d in applied),
    )
    return out, row["created"]


async def links(services: Services, member_id: str) -> list[IdentityOut]:
    async with services.pool.acquire() as conn:
        member_uid = await reads.select_live_member_uid(conn, member_id)
        if member_uid is None:
            raise errors.MemberNotFound(f"no member {member_id!r}")
        rows = await store.select_member_links(conn, member_uid)
    return [IdentityOut(member_id=member_id, **dict(row)) for row in rows]


async def unlink(services: Services, member_id: str, name: str, external_id: str) -> None:
    integration = await services.shared(service.Registry).get(name)
    async with services.pool.acquire() as conn:
        member_uid = await reads.select_live_member_uid(conn, member_id)
        if member_uid is None or not await store.delete_link(conn, integration.integration_id, external_id, member_uid):
            raise errors.NotFound(f"member {member_id!r} has no {name} id {external_id!r}")
