"""The member export and erasure routes."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, delete, get

from konvert.auth import principal_of
from konvert.ledger.api import MemberPath
from konvert.privacy import service
from konvert.privacy.model import Export
from konvert.services import Svc


class PrivacyController(Controller):
    path = "/v1/members/{member_id:str}"
    tags = ["privacy"]

    @get("/export", opt={"scope": "members:read", "problems": ("member_not_found", "purpose_forbidden")})
    async def export(self, request: Request[Any, Any, Any], member_id: MemberPath, services: Svc) -> Export:
        """Everything konvert holds on the member as one JSON document (right of access and
        portability): balances, preferences, consents and their history, transfers, lots,
        purchases, redemptions, adjustments and kudos. The export is recorded in the privacy log.
        A key bound to purposes may not read it (403 `purpose_forbidden`)."""
        principal = principal_of(request)
        principal.check_unbound_by_purpose()
        return await service.export(services, member_id, principal)

    @delete("/", status_code=204, opt={"scope": "admin", "idempotency_key": "member_id"})
    async def erase(self, request: Request[Any, Any, Any], member_id: MemberPath, services: Svc) -> None:
        """Erase the member: preferences and consents are deleted, the privacy log keeps no values,
        free-text notes go, and the member id is replaced by a pseudonym. Ledger amounts stay so
        the books balance, but no longer identify the person; the old id finds nobody afterwards
        (a later purchase under it starts a new member). Idempotent: erasing again answers 204."""
        await service.erase(services, member_id, principal_of(request))


ROUTES: list[Any] = [PrivacyController]
