"""Balance and activity routes (scope members:read)."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, Response, get
from litestar.params import PathParameter, QueryParameter

from konvert.ledger import service
from konvert.ledger.model import ActivityPage, Balance, MemberId
from konvert.services import Svc

MemberPath = Annotated[MemberId, PathParameter(description="The member's id, as the caller knows it.")]


class BalanceController(Controller):
    path = "/v1/members/{member_id:str}"
    tags = ["balances"]
    opt = {"scope": "members:read"}

    @get("/balance")
    async def balance(
        self,
        member_id: MemberPath,
        services: Svc,
        expiring_within_days: Annotated[
            int | None, QueryParameter(ge=0, le=3650, description="list all points expiring within this many days")
        ] = None,
    ) -> Response[Balance]:
        """The member's points (available, pending, held, expiring soon), lifetime earned and reputation.

        Served from the balance cache when it holds the current version, else from PostgreSQL.
        A client that got a response for a write reads that write's effect here.
        """
        if expiring_within_days is not None:
            return Response(await service.read_balance(services, member_id, expiring_within_days))
        return Response(await service.balance_body(services, member_id), media_type="application/json")

    @get("/activity")
    async def activity(
        self,
        member_id: MemberPath,
        services: Svc,
        cursor: Annotated[str | None, QueryParameter(description="next_cursor of the previous page")] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=200, description="page size")] = 50,
    ) -> ActivityPage:
        """The member's transfers, newest first: every change to their points and reputation, and why."""
        return await service.activity(services, member_id, cursor, limit)
