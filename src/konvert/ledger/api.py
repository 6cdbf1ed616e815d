"""Balance and activity routes (scope members:read)."""

from __future__ import annotations

import re
from typing import Annotated, Any

from litestar import Controller, Response, get
from litestar.params import PathParameter, QueryParameter

from konvert import direct
from konvert.ledger import service
from konvert.ledger.model import ActivityPage, Balance, MemberId
from konvert.services import Services, Svc

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
            int | None,
            QueryParameter(ge=0, le=3650, description="list all points expiring within this many days"),
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


BALANCE_ROUTE = "/v1/members/{member_id}/balance"
# The id part is MemberId's bounds (ledger.model: 1-128 characters, NO_CONTROL_CHARACTERS) plus
# no "/": keep the two together (tests/unit/test_direct_balance_path.py fails when they part).
# Matched with fullmatch, never search.
_BALANCE_PATH = re.compile(r"/v1/members/([^/\x00-\x1f\x7f]{1,128})/balance")


async def serve_balance_directly(services: Services, scope: dict[str, Any], send: direct.Send) -> bool:
    """``GET /v1/members/{id}/balance`` as the route above answers it, without the framework.

    The most frequent request konvert serves, and on a cache hit the framework (routing,
    guard, dependency injection, parameter parsing, the response object) costs more than the
    rest of it. This takes on the plain one (no query string, a well-formed member id, a key
    with ``members:read``) and answers it, an unknown member's 404 and any error included,
    through the routes' exception handlers. Anything else returns False having sent nothing,
    and the route answers it as always.
    """
    if scope["method"] != "GET" or scope["query_string"]:
        return False
    match = _BALANCE_PATH.fullmatch(scope["path"])
    if match is None or not await direct.allowed(services, scope, BalanceController.opt["scope"]):
        return False
    scope["path_template"] = BALANCE_ROUTE
    try:
        body = await service.balance_body(services, match.group(1))
    except Exception as exc:  # noqa: BLE001 - rendered exactly as the route's exception handlers do
        await direct.send_error(scope, send, exc)  # an unknown member's 404, a database's 503
        return True
    await direct.send_json(send, 200, body)
    return True
