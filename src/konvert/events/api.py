"""Webhook endpoint, message and event feed routes."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Response, delete, get, post, put
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import JSONBody, PathParameter, QueryParameter

from konvert.events import service
from konvert.events.model import (
    EndpointId,
    EndpointIn,
    EndpointList,
    EndpointOut,
    EventPage,
    EventType,
    MessageOut,
    MessagePage,
    MessageStatus,
)
from konvert.paths import path_parameter
from konvert.services import Svc

EndpointPath = Annotated[EndpointId, path_parameter(EndpointId, "The endpoint's id, as the operator chose it.")]


class WebhookEndpointController(Controller):
    path = "/v1/webhook-endpoints"
    tags = ["webhooks"]
    opt = {"scope": "admin"}

    @get("/")
    async def list_endpoints(self, services: Svc) -> EndpointList:
        """Every webhook endpoint (without secrets)."""
        return await service.list_endpoints(services)

    @put(
        "/{endpoint_id:str}",
        opt={"body": True, "idempotency_key": "endpoint_id", "problems": ("webhook_url_refused",)},
        responses={201: ResponseSpec(EndpointOut, description="Created", generate_examples=False)},
    )
    async def put_endpoint(
        self, endpoint_id: EndpointPath, data: JSONBody[EndpointIn], services: Svc
    ) -> Response[EndpointOut]:
        """Create (201) or change (200) a webhook endpoint: its URL, the event types it wants
        (none: all), a description, and whether it is enabled.

        The answer that creates it holds its signing secret (`whsec_...`), the only time konvert
        shows it; keep it to verify the `webhook-signature` of every message. Enabling an
        endpoint that konvert disabled forgets its failures.
        """
        endpoint, created = await service.put_endpoint(services, endpoint_id, data)
        return Response(endpoint, status_code=201 if created else 200)

    @get("/{endpoint_id:str}", opt={"problems": ("webhook_endpoint_not_found",)})
    async def get_endpoint(self, endpoint_id: EndpointPath, services: Svc) -> EndpointOut:
        """The endpoint (without its secret)."""
        return await service.get_endpoint(services, endpoint_id)

    @delete("/{endpoint_id:str}", status_code=204, opt={"idempotency_key": "endpoint_id"})
    async def delete_endpoint(self, endpoint_id: EndpointPath, services: Svc) -> None:
        """Delete the endpoint and its messages; nothing more is sent to it. Idempotent."""
        await service.delete_endpoint(services, endpoint_id)

    @post(
        "/{endpoint_id:str}/rotate-secret",
        status_code=200,
        opt={"idempotency_key": "endpoint_id", "problems": ("webhook_endpoint_not_found",)},
    )
    async def rotate_secret(self, endpoint_id: EndpointPath, services: Svc) -> EndpointOut:
        """Replace the signing secret: the answer holds the new one (shown once). Messages are
        signed with both the new and the old secret for `KONVERT_WEBHOOK_SECRET_GRACE_SECONDS`,
        so a receiver can switch secrets without refusing a message. Each call rotates again."""
        return await service.rotate_secret(services, endpoint_id)

    @get("/{endpoint_id:str}/messages", opt={"problems": ("webhook_endpoint_not_found",)})
    async def messages(
        self,
        endpoint_id: EndpointPath,
        services: Svc,
        status: Annotated[
            MessageStatus | None, QueryParameter(description="only messages in this state; failed: dead letters")
        ] = None,
        cursor: Annotated[str | None, QueryParameter(description="next_cursor of the previous page")] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=200, description="page size")] = 50,
    ) -> MessagePage:
        """The endpoint's messages, newest first: one per event sent to it, with its attempts."""
        return await service.messages(services, endpoint_id, status, cursor, limit)

    @post(
        "/{endpoint_id:str}/messages/{message_id:int}/retry",
        status_code=200,
        opt={
            "idempotency_key": "message_id",
            "problems": ("webhook_endpoint_not_found", "webhook_message_not_found", "webhook_message_not_failed"),
        },
    )
    async def retry(
        self,
        endpoint_id: EndpointPath,
        # At most 2**53 - 1: the document states bounds as JSON numbers, exact only up to there.
        message_id: Annotated[int, PathParameter(ge=1, le=2**53 - 1)],
        services: Svc,
    ) -> MessageOut:
        """Send a dead-lettered (failed) message again, with a fresh retry schedule. A pending
        message is still being retried and a delivered one is never sent again: 409."""
        return await service.resend(services, endpoint_id, message_id)


class EventFeedController(Controller):
    path = "/v1/events"
    tags = ["events"]

    @get("/", opt={"scope": "events:read"})
    async def feed(
        self,
        services: Svc,
        after: Annotated[
            str | None, QueryParameter(description="next_cursor of the previous page; absent: the oldest event kept")
        ] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=1000, description="page size")] = 100,
        types: Annotated[list[EventType] | None, QueryParameter(description="only these event types")] = None,
    ) -> EventPage:
        """Events in the order konvert numbered them (each member's in their order), for
        consumers that neither receive webhooks nor reach Redis.

        Poll with the `next_cursor` of the last page as `after`: an event numbered later always
        comes after it, never behind. Events are kept `KONVERT_EVENTS_RETENTION_DAYS` after they
        are published.
        """
        return await service.feed(services, after, limit, sorted(set(types or [])))


ROUTES: list[Any] = [WebhookEndpointController, EventFeedController]
