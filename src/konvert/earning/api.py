"""Purchase, preview and refund routes (scope purchases:write)."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Response, post
from litestar.params import JSONBody, PathParameter

from konvert.earning import refunds, service
from konvert.earning.model import EarningResult, PurchaseId, PurchaseIn, PurchaseOut, RefundIn, RefundOut
from konvert.idempotency import written
from konvert.services import Svc


class PurchaseController(Controller):
    path = "/v1/purchases"
    tags = ["purchases"]
    opt = {"scope": "purchases:write"}

    @post("/", opt={"body": True, "idempotency_key": "purchase_id"})
    async def post_purchase(self, data: JSONBody[PurchaseIn], services: Svc) -> Response[PurchaseOut]:
        """Record a purchase and credit the points it earns, with a per-line breakdown of the rules applied.

        `purchase_id` is unique per partner and permanent: replaying the same body returns the
        original response (header `Idempotent-Replayed: true`); the same id with a different body
        is refused with 409 `idempotency_conflict`. Points are pending for the program's return
        window, then become available.
        """
        return written(await service.post_purchase(services, data))

    @post("/preview", opt={"body": True, "writes": False}, status_code=200)
    async def preview(self, data: JSONBody[PurchaseIn], services: Svc) -> EarningResult:
        """Compute what a purchase would earn, exactly as posting it would, without writing anything."""
        return service.preview(services, data)

    @post("/{purchase_id:str}/refunds", opt={"body": True, "idempotency_key": "refund_id"})
    async def refund(
        self,
        purchase_id: Annotated[PurchaseId, PathParameter(description="The purchase's id at its partner.")],
        data: JSONBody[RefundIn],
        services: Svc,
    ) -> Response[RefundOut]:
        """Refund lines (by quantity) or an amount of a purchase, clawing back exactly the points they earned.

        Points come back from the purchase's pending points first, then available ones. Refunds
        can never add up to more than the purchase (422 `refund_exceeds_purchase`). `refund_id`
        is the idempotency key, per purchase.
        """
        return written(await refunds.refund_purchase(services, purchase_id, data))


ROUTES: list[Any] = [PurchaseController]
