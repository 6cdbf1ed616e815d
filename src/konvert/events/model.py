"""Events wire types: the envelope every event travels in, the feed, webhook endpoints and
their messages."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta

from konvert.ledger.events import EVENT_TYPES

EndpointId = Annotated[str, Meta(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:-]+$")]
EventType = Literal[EVENT_TYPES]  # type: ignore[valid-type]
# An http(s) URL without spaces or control characters; the host is the operator's choice.
Url = Annotated[str, Meta(min_length=8, max_length=2000, pattern=r"^https?://[^\s\x00-\x1f\x7f]+$")]
Description = Annotated[str, Meta(max_length=500, pattern=r"^[^\x00]*$")]
MessageStatus = Literal["pending", "delivered", "failed"]


class Envelope(msgspec.Struct, frozen=True, kw_only=True):
    """An event as it is sent to webhooks, written to the stream and served by the feed."""

    # Unique and stable: the same event always has the same id (also the webhook-id header).
    id: str
    type: str
    occurred_at: datetime
    # The member it is about (the pseudonym once erased); null for events about konvert itself.
    member_id: str | None
    # The member's events are numbered 1, 2, 3, ... in the order they happened.
    sequence: int | None
    # The type's fields (see the event catalogue); amounts, balances after, ids.
    data: dict[str, Any]


class EncodedEnvelope(msgspec.Struct, frozen=True, kw_only=True):
    """The envelope with its data as stored (JSON), encoded without decoding it first."""

    id: str
    type: str
    occurred_at: datetime
    member_id: str | None
    sequence: int | None
    data: msgspec.Raw


class EventPage(msgspec.Struct, frozen=True, kw_only=True):
    items: list[Envelope]
    # Where the next page starts: pass it as `after`. Always set, also on an empty page, so a
    # client polls with it.
    next_cursor: str


class EndpointIn(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    url: Url
    # Only these types are sent; empty or absent: every type.
    event_types: list[EventType] = msgspec.field(default_factory=list)
    description: Description = ""
    enabled: bool = True

    def __post_init__(self) -> None:
        # The pattern lets through what no request can be sent to ("http://[x": a broken IPv6 host),
        # which would fail every delivery for days instead of being refused now.
        try:
            parts = urlsplit(self.url)
            parts.port  # noqa: B018 - parsing the port is what refuses "host:notaport"
        except ValueError as exc:
            raise ValueError(f"url: not a URL ({exc})") from None
        if not parts.hostname:
            raise ValueError("url: needs a host")


class EndpointOut(msgspec.Struct, frozen=True, kw_only=True):
    endpoint_id: str
    url: str
    event_types: list[str]
    description: str
    enabled: bool
    # Why konvert disabled it (every attempt failed for days); null while enabled.
    disabled_reason: str | None
    failing_since: datetime | None
    # The signing secret: in the response that creates the endpoint or rotates its secret only.
    secret: str | None = None
    # After a rotation, the previous secret also signs until then.
    previous_secret_expires_at: datetime | None = None
    created_at: datetime
    updated_at: datetime


class EndpointList(msgspec.Struct, frozen=True, kw_only=True):
    items: list[EndpointOut]


class MessageOut(msgspec.Struct, frozen=True, kw_only=True):
    message_id: int
    endpoint_id: str
    event_id: str
    event_type: str
    status: MessageStatus
    attempts: int
    # Null once finished, and while the member's message before it is not.
    next_attempt_at: datetime | None
    first_attempt_at: datetime | None
    last_attempt_at: datetime | None
    # The HTTP status of the last attempt (null: no answer, see last_error).
    last_status: int | None
    last_error: str | None
    finished_at: datetime | None
    created_at: datetime


class MessagePage(msgspec.Struct, frozen=True, kw_only=True):
    items: list[MessageOut]
    next_cursor: str | None
