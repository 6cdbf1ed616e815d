"""The event catalogue in the OpenAPI document: one webhook per event type (OpenAPI 3.1
``webhooks``), each with its envelope's schema and an example.

The schemas come from the catalogue's Structs through msgspec's JSON Schema, turned into
Litestar's OpenAPI objects, so the document cannot drift from what konvert sends.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

import msgspec
from litestar.openapi.spec import (
    OpenAPIFormat,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    PathItem,
    Reference,
    RequestBody,
    Schema,
)

from konvert.events.rules import event_id_text
from konvert.ledger import events

_AT = datetime(2026, 5, 4, 12, 30, tzinfo=UTC)
_BALANCE = events.Balance(available=1250, pending=120, held=0)


def _redemption(status: str) -> events.RedemptionChanged:
    return events.RedemptionChanged(
        redemption_id="r-2026-0042", reward_id="coffee", points=300, status=status, transfer_id=981, balance=_BALANCE
    )


# One example of each event type's data (the README shows the same).
EXAMPLES: dict[str, msgspec.Struct] = {
    "purchase.recorded": events.PurchaseRecorded(
        partner="webshop", purchase_id="order-1001", currency="EUR", occurred_at=_AT, points=120
    ),
    "points.earned": events.PointsEarned(
        points=120,
        state="pending",
        cause_type="purchase",
        cause_ref="webshop/order-1001",
        lot_id=5501,
        transfer_id=977,
        vests_at=datetime(2026, 5, 18, 12, 30, tzinfo=UTC),
        expires_at=datetime(2027, 5, 4, 12, 30, tzinfo=UTC),
        balance=_BALANCE,
    ),
    "points.vested": events.PointsVested(points=120, lot_ids=[5501], balance=_BALANCE),
    "points.refunded": events.PointsRefunded(
        partner="webshop",
        purchase_id="order-1001",
        refund_id="refund-1",
        points=40,
        shortfall=0,
        debt=0,
        balance=_BALANCE,
    ),
    "points.redeemed": _redemption("captured"),
    "redemption.held": _redemption("held"),
    "redemption.captured": _redemption("captured"),
    "redemption.released": _redemption("released"),
    "redemption.expired": _redemption("expired"),
    "redemption.cancelled": _redemption("cancelled"),
    "points.expired": events.PointsExpired(points=80, lot_ids=[4410], balance=_BALANCE),
    "points.expiring_soon": events.PointsExpiringSoon(
        lot_id=4410, points=80, expires_at=datetime(2026, 5, 18, 0, 0, tzinfo=UTC)
    ),
    "points.adjusted": events.PointsAdjusted(
        adjustment_id="adj-77", points=-50, reason_code="correction", transfer_id=990, balance=_BALANCE
    ),
    "tier.changed": events.TierChanged(from_tier="Silver", to_tier="Gold", qualifying_points=5200),
    "kudos.received": events.KudosReceived(
        kudos_id="forum-like-8812",
        kind="like",
        source="forum",
        post_id="post-31",
        counted=True,
        reputation_delta=10,
        reputation=510,
    ),
    "kudos.retracted": events.KudosRetracted(
        kudos_id="forum-like-8812", kind="like", source="forum", post_id="post-31", reputation_delta=-10, reputation=500
    ),
    "reputation.rank_changed": events.RankChanged(
        from_rank="Contributor", to_rank="Expert", reputation=510, kudos_id="forum-like-8812"
    ),
    "preference.shared": events.PreferenceShared(key="favourite_categories", first_shared=True, points=50),
    "preference.withdrawn": events.PreferenceWithdrawn(key="favourite_categories", points_clawed_back=0, shortfall=0),
    "consent.changed": events.ConsentChanged(purpose="marketing", granted=False),
    "member.erased": events.MemberErased(),
    "webhook_endpoint.disabled": events.EndpointDisabled(
        endpoint_id="crm", failing_since=datetime(2026, 4, 29, 8, 0, tzinfo=UTC), last_error="HTTP 503"
    ),
}


def example_envelope(event_type: str) -> dict[str, Any]:
    """An example of the whole message a receiver gets for ``event_type``."""
    about_member = event_type != "webhook_endpoint.disabled"
    return {
        "id": event_id_text(180_042),
        "type": event_type,
        "occurred_at": _AT.isoformat().replace("+00:00", "Z"),
        "member_id": ("mem_pseudonym_3f9c…" if event_type == "member.erased" else "member-1234")
        if about_member
        else None,
        "sequence": 57 if about_member else None,
        "data": msgspec.to_builtins(EXAMPLES[event_type]),
    }


def _envelope_type(event_type: str) -> type[msgspec.Struct]:
    """The envelope of one event type, as a Struct for its JSON Schema."""
    data = events.CATALOGUE[event_type]
    name = "".join(part.capitalize() for part in event_type.replace("_", ".").split(".")) + "Event"
    return msgspec.defstruct(
        name,
        [
            ("id", str),
            ("type", Literal[event_type]),
            ("occurred_at", datetime),
            ("member_id", str | None),
            ("sequence", int | None),
            ("data", data),
        ],
        kw_only=True,
    )


_REF = "#/$defs/"
_KEYS = {
    "minimum": "minimum",
    "maximum": "maximum",
    "minLength": "min_length",
    "maxLength": "max_length",
    "pattern": "pattern",
    "title": "title",
    "description": "description",
    "enum": "enum",
    "const": "const",
    "required": "required",
}


def _schema(node: dict[str, Any], definitions: dict[str, Any]) -> Schema:
    """A JSON Schema node (as msgspec makes them) as Litestar's OpenAPI object, references
    resolved in place: Litestar replaces the document's component schemas with its own."""
    if "$ref" in node:
        return _schema(definitions[node["$ref"].removeprefix(_REF)], definitions)
    fields: dict[str, Any] = {attr: node[key] for key, attr in _KEYS.items() if key in node}
    if "type" in node:
        fields["type"] = OpenAPIType(node["type"])
    if "format" in node:
        fields["format"] = OpenAPIFormat(node["format"])
    if "properties" in node:
        fields["properties"] = {name: _schema(sub, definitions) for name, sub in node["properties"].items()}
    if "items" in node:
        fields["items"] = _schema(node["items"], definitions)
    if "anyOf" in node:
        fields["any_of"] = [_schema(sub, definitions) for sub in node["anyOf"]]
    return Schema(**fields)


def _build() -> dict[str, PathItem | Reference]:
    types = list(events.CATALOGUE)
    refs, definitions = msgspec.json.schema_components([_envelope_type(t) for t in types], ref_template=_REF + "{name}")
    webhooks: dict[str, PathItem | Reference] = {}
    for event_type, ref in zip(types, refs, strict=True):
        body = RequestBody(
            required=True,
            content={
                "application/json": OpenAPIMediaType(
                    schema=_schema(ref, definitions), example=example_envelope(event_type)
                ),
            },
        )
        operation = Operation(
            summary=event_type,
            description=(
                (events.CATALOGUE[event_type].__doc__ or "").strip()
                + "\n\nSent as a Standard Webhooks message (headers webhook-id, webhook-timestamp, "
                "webhook-signature); the same envelope is written to the Redis Stream and served by "
                "GET /v1/events."
            ).strip(),
            request_body=body,
            responses={"2XX": OpenAPIResponse(description="Delivered; any other answer is retried.")},
            security=[],
        )
        webhooks[event_type] = PathItem(post=operation)
    return webhooks


WEBHOOKS = _build()
