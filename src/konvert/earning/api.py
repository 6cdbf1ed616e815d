"""Purchase, preview and refund routes (scope purchases:write)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Controller, Response, post
from litestar.params import JSONBody, PathParameter

from konvert import direct
from konvert.auth import is_json
from konvert.earning import service
from konvert.earning.model import EarningResult, PurchaseId, PurchaseIn, PurchaseOut, RefundIn, RefundOut
from konvert.idempotency import REPLAYED_HEADER, written
from konvert.services import Services, Svc


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
        return written(await service.refund_purchase(services, purchase_id, data))


PURCHASES_PATH = "/v1/purchases"
_REPLAYED = (REPLAYED_HEADER.lower().encode(), b"true")


async def serve_purchase_directly(
    services: Services, scope: dict[str, Any], receive: direct.Receive, send: direct.Send
) -> direct.Receive | None:
    """``POST /v1/purchases`` as the route above answers it, without the framework.

    Taken on only when the route would take it on too: a key with ``purchases:write``, a JSON
    content type, a body within the size limit that decodes into a PurchaseIn exactly as the
    framework decodes it (``msgspec.convert(..., strict=False)``). Otherwise returns the
    receive to hand the route (the body replayed if it was read), having sent nothing. Once
    taken on, every outcome is sent here, errors through the routes' exception handlers.
    Returns None when answered.
    """
    if scope["method"] != "POST" or scope["query_string"]:
        return receive
    if not await direct.allowed(services, scope, PurchaseController.opt["scope"]):
        return receive
    if not is_json(direct.header(scope, b"content-type")):
        return receive
    body, read = await direct.read_body(scope, receive, services.settings.request_max_body_bytes)
    if body is None:
        return direct.Replay(read, receive)
    try:
        purchase = msgspec.convert(
            msgspec.json.decode(body or b"null"), PurchaseIn, strict=False, str_keys=True
        )
    except Exception:  # noqa: BLE001 - the route words it: 400 (malformed, nested too deeply) or 422
        return direct.Replay(read, receive)
    scope["path_template"] = PURCHASES_PATH
    try:
        outcome = await service.post_purchase(services, purchase)
    except Exception as exc:  # noqa: BLE001 - rendered exactly as the route's exception handlers do
        await direct.send_error(scope, send, exc)
        return None
    await direct.send_json(send, 201, outcome.body, *((_REPLAYED,) if outcome.replayed else ()))
    return None
