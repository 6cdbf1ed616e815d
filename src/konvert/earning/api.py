"""Purchase, preview and refund routes (scope purchases:write)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, post
from litestar.params import JSONBody

from konvert.auth import principal_of
from konvert.earning import refunds, service
from konvert.earning.model import EarningResult, PurchaseId, PurchaseIn, PurchaseOut, RefundIn, RefundOut
from konvert.idempotency import written
from konvert.paths import path_parameter
from konvert.services import Svc

# What a purchase may be refused for beyond its shape, and a refund.
EARNING = ("partner_forbidden", "unknown_partner", "unsupported_currency")
REFUNDS = (
    "partner_forbidden",
    "purchase_not_found",
    "already_refunded",
    "refund_exceeds_purchase",
    "unprocessable",
    "idempotency_conflict",
    "concurrent_write",
)


class PurchaseController(Controller):
    path = "/v1/purchases"
    tags = ["purchases"]
    opt = {"scope": "purchases:write"}

    @post(
        "/",
        opt={
            "body": True,
            "idempotency_key": "purchase_id",
            "problems": (*EARNING, "idempotency_conflict", "concurrent_write"),
        },
    )
    async def post_purchase(
        self, request: Request[Any, Any, Any], data: JSONBody[PurchaseIn], services: Svc
    ) -> Response[PurchaseOut]:
        """Record a purchase and credit the points it earns, with a per-line breakdown of the rules applied.

        `purchase_id` is unique per partner and permanent: replaying the same body returns the
        original response (header `Idempotent-Replayed: true`); the same id with a different body
        is refused with 409 `idempotency_conflict`. Points are pending for the program's return
        window, then become available. A key bound to partners may post only for them (403
        `partner_forbidden`).
        """
        principal_of(request).check_partner(data.partner)
        return written(await service.post_purchase(services, data))

    @post("/preview", opt={"body": True, "writes": False, "problems": EARNING}, status_code=200)
    async def preview(
        self, request: Request[Any, Any, Any], data: JSONBody[PurchaseIn], services: Svc
    ) -> EarningResult:
        """Compute what a purchase would earn, exactly as posting it would, without writing anything."""
        principal_of(request).check_partner(data.partner)
        return service.preview(services, data)

    @post("/{purchase_id:str}/refunds", opt={"body": True, "idempotency_key": "refund_id", "problems": REFUNDS})
    async def refund(
        self,
        request: Request[Any, Any, Any],
        purchase_id: Annotated[PurchaseId, path_parameter(PurchaseId, "The purchase's id at its partner.")],
        data: JSONBody[RefundIn],
        services: Svc,
    ) -> Response[RefundOut]:
        """Refund lines (by quantity) or an amount of a purchase, clawing back exactly the points they earned.

        Points come back from the purchase's pending points first, then available ones. Refunds
        can never add up to more than the purchase (422 `refund_exceeds_purchase`). `refund_id`
        is the idempotency key, per purchase. A key bound to partners may refund only their
        purchases (403 `partner_forbidden`); a key bound to one partner need not name it.
        """
        partner = principal_of(request).check_partner(data.partner)
        if partner != data.partner:
            data = msgspec.structs.replace(data, partner=partner)
        return written(await refunds.refund_purchase(services, purchase_id, data))


ROUTES: list[Any] = [PurchaseController]
