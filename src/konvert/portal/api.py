"""The portal's API route: the shop's or forum's backend asks for a member's portal link."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, post
from litestar.params import JSONBody

from konvert.ledger.api import MemberPath
from konvert.portal import links
from konvert.portal.model import PortalSessionIn, PortalSessionOut
from konvert.services import Svc


class PortalSessionController(Controller):
    path = "/v1/members/{member_id:str}/portal-sessions"
    tags = ["portal"]

    # Each call makes a new single-use link and writes nothing a retry could double, so it has no
    # idempotency key: a retried request gets a link of its own, and the unused one expires.
    @post("/", opt={"scope": "members:write", "body": True, "writes": False, "problems": ("member_not_found",)})
    async def create(
        self,
        request: Request[Any, Any, Any],
        member_id: MemberPath,
        services: Svc,
        data: JSONBody[PortalSessionIn],
    ) -> PortalSessionOut:
        """A link that signs the member into the member portal: send the member to `url`.

        The body may be `{}`.
        It works once, and only until `expires_at` (KONVERT_PORTAL_LINK_TTL_SECONDS); opening it
        starts a portal session for this member alone. `locale` (`en`, `de`) fixes the portal's
        language, else the member's browser chooses. `return_url`, where the portal's "Back"
        link leads, must be on one of the program's `portal.return_origins` (else 422). Append
        `?next=card` to open the embeddable card instead of the overview.
        """
        return await links.issue(services, member_id, data, str(request.base_url))


ROUTES: list[Any] = [PortalSessionController]
