"""Reward and redemption routes."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Response, get, post, put
from litestar.params import JSONBody, QueryParameter

from konvert.idempotency import written
from konvert.ledger.api import MemberPath
from konvert.paths import path_parameter
from konvert.redemption import service
from konvert.redemption.model import (
    RedemptionId,
    RedemptionIn,
    RedemptionOut,
    RedemptionPage,
    RewardId,
    RewardIn,
    RewardList,
    RewardOut,
)
from konvert.services import Svc

RedemptionPath = Annotated[RedemptionId, path_parameter(RedemptionId, "The redemption's id, as its client chose it.")]
RewardPath = Annotated[RewardId, path_parameter(RewardId, "The reward's id in the catalog.")]


class RewardController(Controller):
    path = "/v1/rewards"
    tags = ["rewards"]

    @get("/", opt={"scope": "members:read"})
    async def list_rewards(self, services: Svc) -> RewardList:
        """Rewards a member can redeem now: active, inside their availability window, in stock."""
        return await service.available_rewards(services)

    @put("/{reward_id:str}", opt={"scope": "admin", "body": True, "idempotency_key": "reward_id"})
    async def put_reward(self, reward_id: RewardPath, data: JSONBody[RewardIn], services: Svc) -> RewardOut:
        """Create or replace a reward in the catalog (operators; PUT is naturally idempotent)."""
        return await service.put_reward(services, reward_id, data)


class MemberRedemptionController(Controller):
    path = "/v1/members/{member_id:str}"
    tags = ["redemptions"]

    @post(
        "/redemptions",
        opt={
            "scope": "redemptions:write",
            "body": True,
            "idempotency_key": "redemption_id",
            "problems": (
                "member_not_found",
                "reward_not_found",
                "reward_unavailable",
                "out_of_stock",
                "insufficient_points",
                "idempotency_conflict",
            ),
        },
    )
    async def redeem(
        self, member_id: MemberPath, data: JSONBody[RedemptionIn], services: Svc
    ) -> Response[RedemptionOut]:
        """Redeem a reward or pay with points, spending the soonest-expiring points first.

        With `"hold": true` the points are reserved (they stop counting as available at once)
        until capture, release, or the hold times out. Never overdraws: without enough
        available points the answer is 409 `insufficient_points` and nothing changes.
        `redemption_id` is the permanent idempotency key.
        """
        return written(await service.redeem(services, member_id, data))

    @get("/redemptions", opt={"scope": "members:read", "problems": ("member_not_found",)})
    async def list_redemptions(
        self,
        member_id: MemberPath,
        services: Svc,
        cursor: Annotated[str | None, QueryParameter(description="next_cursor of the previous page")] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=200, description="page size")] = 50,
    ) -> RedemptionPage:
        """The member's redemptions, newest first, with their status."""
        return await service.member_redemptions(services, member_id, cursor, limit)


class RedemptionController(Controller):
    path = "/v1/redemptions/{redemption_id:str}"
    tags = ["redemptions"]
    opt = {
        "scope": "redemptions:write",
        "idempotency_key": "redemption_id",
        "problems": ("redemption_not_found", "hold_not_active", "conflict"),
    }

    @post("/capture", status_code=200)
    async def capture(self, redemption_id: RedemptionPath, services: Svc) -> RedemptionOut:
        """Spend a held redemption's points for good. Capturing twice returns the same result;
        a released or timed-out hold answers 409 `hold_not_active`."""
        return await service.capture(services, redemption_id)

    @post("/release", status_code=200)
    async def release(self, redemption_id: RedemptionPath, services: Svc) -> RedemptionOut:
        """Give a held redemption's points back to the lots they came from."""
        return await service.release(services, redemption_id)

    @post("/cancel", status_code=200)
    async def cancel(self, redemption_id: RedemptionPath, services: Svc) -> RedemptionOut:
        """Undo a captured redemption: the points return to the same lots, the reward to stock."""
        return await service.cancel(services, redemption_id)


ROUTES: list[Any] = [RewardController, MemberRedemptionController, RedemptionController]
