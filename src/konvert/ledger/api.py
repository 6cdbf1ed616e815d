"""Balance, activity and adjustment routes."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, Response, get, post
from litestar.params import JSONBody, QueryParameter

from konvert.auth import principal_of
from konvert.idempotency import written
from konvert.ledger import adjustments, balances
from konvert.ledger.model import ActivityPage, AdjustmentIn, AdjustmentOut, Balance, MemberId
from konvert.paths import path_parameter
from konvert.services import Svc

MemberPath = Annotated[MemberId, path_parameter(MemberId, "The member's id, as the caller knows it.")]


class BalanceController(Controller):
    path = "/v1/members/{member_id:str}"
    tags = ["balances"]
    opt = {"scope": "members:read", "problems": ("member_not_found",)}

    @get("/balance")
    async def balance(
        self,
        member_id: MemberPath,
        services: Svc,
        expiring_within_days: Annotated[
            int | None,
            QueryParameter(
                ge=0,
                le=3650,
                description="list all points expiring within this many days",
                # Stated again for the document: Litestar drops a bound of 0 on an optional number.
                schema_extra={"minimum": 0},
            ),
        ] = None,
    ) -> Response[Balance]:
        """The member's points (available, pending with the dates they vest, held, expiring soon),
        lifetime earned and reputation.

        Served from the balance cache when it holds the current version, else from PostgreSQL.
        A client that got a response for a write reads that write's effect here.
        """
        if expiring_within_days is not None:
            return Response(await balances.read_balance(services, member_id, expiring_within_days))
        # The cached body as it is: no decoding and encoding again on the most frequent request.
        return Response(await balances.balance_body(services, member_id), media_type="application/json")  # type: ignore[arg-type]

    @get("/activity")
    async def activity(
        self,
        member_id: MemberPath,
        services: Svc,
        cursor: Annotated[str | None, QueryParameter(description="next_cursor of the previous page")] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=200, description="page size")] = 50,
    ) -> ActivityPage:
        """The member's transfers, newest first: every change to their points and reputation, and why."""
        return await balances.activity(services, member_id, cursor, limit)


class AdjustmentController(Controller):
    path = "/v1/members/{member_id:str}/adjustments"
    tags = ["adjustments"]
    opt = {"scope": "admin"}

    @post(
        "/",
        opt={
            "body": True,
            "idempotency_key": "adjustment_id",
            "problems": ("member_not_found", "insufficient_points", "idempotency_conflict"),
        },
    )
    async def adjust(
        self, request: Request[Any, Any, Any], member_id: MemberPath, data: JSONBody[AdjustmentIn], services: Svc
    ) -> Response[AdjustmentOut]:
        """Credit or debit points with a reason code from the program file; the API key is recorded."""
        return written(await adjustments.adjust(services, member_id, data, principal_of(request)))


ROUTES: list[Any] = [BalanceController, AdjustmentController]
