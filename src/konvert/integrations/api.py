"""Integration routes: connecting sources (admin), their webhooks (signed, no API key), their
deliveries, and members' identity links."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from litestar import Controller, Request, Response, delete, get, post, put
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import JSONBody, QueryParameter

from konvert.integrations import admin, service
from konvert.integrations.model import (
    DeliveryOut,
    DeliveryPage,
    ExternalId,
    IdentityList,
    IdentityOut,
    IntegrationIn,
    IntegrationList,
    IntegrationName,
    IntegrationOut,
    RetryResult,
)
from konvert.ledger.model import MemberId
from konvert.paths import path_parameter
from konvert.services import Svc

NamePath = Annotated[IntegrationName, path_parameter(IntegrationName, "The integration's name.")]
MemberPath = Annotated[MemberId, path_parameter(MemberId, "The member's id, as the caller knows it.")]
ExternalPath = Annotated[ExternalId, path_parameter(ExternalId, "The customer's or user's id at the source.")]


class IntegrationController(Controller):
    path = "/v1/integrations"
    tags = ["integrations"]
    opt = {"scope": "admin"}

    @get("/")
    async def list_integrations(self, services: Svc) -> IntegrationList:
        """The connected sources (never their secrets)."""
        return IntegrationList(await admin.list_integrations(services))

    @put(
        "/{name:str}",
        opt={"body": True, "idempotency_key": "name", "problems": ("unknown_partner", "conflict")},
        responses={201: ResponseSpec(IntegrationOut, description="Connected", generate_examples=False)},
    )
    async def put_integration(
        self, name: NamePath, data: JSONBody[IntegrationIn], services: Svc
    ) -> Response[IntegrationOut]:
        """Connect a Shopify shop, a Stripe account or a Discourse forum, or change its settings.

        `secrets` replaces the stored list: to rotate a secret, send the old and the new one, then
        (once the source signs with the new one) the new one alone. The answer never shows secrets.
        The source's webhook URL is konvert's base URL followed by `webhook_path`.
        """
        out, created = await admin.put_integration(services, name, data)
        return Response(out, status_code=201 if created else 200)

    @get("/{name:str}", opt={"problems": ("integration_not_found",)})
    async def get_integration(self, name: NamePath, services: Svc) -> IntegrationOut:
        """One connected source (never its secrets)."""
        return await admin.get_integration(services, name)

    @delete("/{name:str}", status_code=204, opt={"idempotency_key": "name", "problems": ("integration_not_found",)})
    async def delete_integration(self, name: NamePath, services: Svc) -> None:
        """Disconnect a source: its identity links and deliveries go; what it applied stays."""
        await admin.delete_integration(services, name)

    @get("/{name:str}/deliveries", opt={"problems": ("integration_not_found",)})
    async def deliveries(
        self,
        name: NamePath,
        services: Svc,
        status: Annotated[
            Literal["applied", "ignored", "parked", "failed"] | None, QueryParameter(description="only these")
        ] = None,
        before: Annotated[
            int | None, QueryParameter(ge=1, le=2**53 - 1, description="next_before of the previous page")
        ] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=200, description="page size")] = 50,
    ) -> DeliveryPage:
        """The source's deliveries, newest first: what each applied, or why it did not."""
        return await admin.deliveries(services, name, status, before, limit)

    @post(
        "/{name:str}/deliveries/retry",
        status_code=200,
        opt={"idempotency_key": "name", "problems": ("integration_not_found",)},
    )
    async def retry(
        self,
        name: NamePath,
        services: Svc,
        status: Annotated[
            Literal["failed", "parked"] | None, QueryParameter(description="only these; default both")
        ] = None,
    ) -> RetryResult:
        """Apply failed and parked deliveries again, after a fix (the program, a link). Each applies
        at most once: retrying again retries only what is still failed or parked."""
        return await admin.retry(services, name, (status,) if status else ("failed", "parked"))


class WebhookController(Controller):
    path = "/v1/integrations/{name:str}/webhooks"
    tags = ["integrations"]

    @post(
        "/",
        status_code=200,
        opt={
            "public": True,
            "problems": (
                "invalid_signature",
                "integration_not_found",
                "payload_too_large",
                "request_timeout",
                "malformed_request",
            ),
        },
    )
    async def receive(self, name: NamePath, request: Request[Any, Any, Any], services: Svc) -> DeliveryOut:
        """Where a source sends its webhooks. No API key: the signature is the authentication
        (Shopify `X-Shopify-Hmac-Sha256`, Stripe `Stripe-Signature`, Discourse
        `X-Discourse-Event-Signature`), checked over the raw body; 401 `invalid_signature` if it
        does not match any of the integration's secrets.

        Every verified delivery is recorded and applied in one transaction, and answered 200 with
        its inbox entry: `applied`, `ignored` (nothing to do), `parked` (the customer is not linked
        to a member yet) or `failed` (it cannot apply; see `error`). A delivery received before is
        answered with its entry and `duplicate: true`, and changes nothing. 503 asks the source to
        send it again later.
        """
        body = await request.body()
        return await service.receive(services, name, request.headers, body)


class IdentityController(Controller):
    path = "/v1/members/{member_id:str}/identities"
    tags = ["integrations"]

    @get("/", opt={"scope": "members:read", "problems": ("member_not_found",)})
    async def list_identities(self, member_id: MemberPath, services: Svc) -> IdentityList:
        """The member's ids at connected sources."""
        return IdentityList(await admin.links(services, member_id))

    @put(
        "/{integration:str}/{external_id:str}",
        opt={
            "scope": "members:write",
            "idempotency_key": "external_id",
            "problems": ("integration_not_found", "member_not_found", "conflict"),
        },
        responses={201: ResponseSpec(IdentityOut, description="Linked", generate_examples=False)},
    )
    async def link(
        self, member_id: MemberPath, integration: NamePath, external_id: ExternalPath, services: Svc
    ) -> Response[IdentityOut]:
        """Link the member to their customer or user id at a source (creating the member if new).
        Deliveries parked for that id are applied now (`applied_deliveries`). An id belongs to one
        member: linking it to another is 409."""
        out, created = await admin.link(services, member_id, integration, external_id)
        return Response(out, status_code=201 if created else 200)

    @delete(
        "/{integration:str}/{external_id:str}",
        status_code=204,
        opt={
            "scope": "members:write",
            "idempotency_key": "external_id",
            "problems": ("integration_not_found", "member_not_found"),
        },
    )
    async def unlink(
        self, member_id: MemberPath, integration: NamePath, external_id: ExternalPath, services: Svc
    ) -> None:
        """Remove a link. What its deliveries applied stays; later deliveries for the id are parked."""
        await admin.unlink(services, member_id, integration, external_id)


ROUTES: list[Any] = [IntegrationController, WebhookController, IdentityController]
