"""konvert's error hierarchy. Each HTTP-facing error carries a status and a stable ``code``.

The single mapping to RFC 9457 problem+json lives in :mod:`konvert.problems`; everything here is
plain Python so the pure core can raise these without importing the web framework.
"""

from __future__ import annotations

from typing import Any, ClassVar


class ConfigurationError(Exception):
    """A bad setting or program file. Start-up stops with this message, never a traceback."""


class KonvertError(Exception):
    status: ClassVar[int] = 400
    code: ClassVar[str] = "bad_request"
    title: ClassVar[str] = "Bad request"

    def __init__(self, detail: str, *, errors: list[dict[str, Any]] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors
        self.extra = extra


class MalformedRequest(KonvertError):
    status, code, title = 400, "malformed_request", "Malformed request"


class ValidationFailed(KonvertError):
    """The body or a parameter does not match the schema (wrong type, unknown field, out of bounds)."""

    status, code, title = 422, "validation_failed", "Validation failed"


class Unauthenticated(KonvertError):
    status, code, title = 401, "unauthenticated", "Authentication required"


class Forbidden(KonvertError):
    status, code, title = 403, "forbidden", "Not allowed"


class NotFound(KonvertError):
    status, code, title = 404, "not_found", "Not found"


class MemberNotFound(NotFound):
    code, title = "member_not_found", "Member not found"


class PurchaseNotFound(NotFound):
    code, title = "purchase_not_found", "Purchase not found"


class MethodNotAllowed(KonvertError):
    status, code, title = 405, "method_not_allowed", "Method not allowed"


class Conflict(KonvertError):
    status, code, title = 409, "conflict", "Conflict"


class IdempotencyConflict(Conflict):
    """The same idempotency key was used before with a different request body."""

    code, title = "idempotency_conflict", "Idempotency key reused with a different request"


class AlreadyRefunded(Conflict):
    """A refund up to a refunded amount, or of what remains, found nothing left to refund."""

    code, title = "already_refunded", "Already refunded"


class InsufficientPoints(Conflict):
    code, title = "insufficient_points", "Not enough points"


class PayloadTooLarge(KonvertError):
    status, code, title = 413, "payload_too_large", "Request body too large"


class UnsupportedMediaType(KonvertError):
    status, code, title = 415, "unsupported_media_type", "Unsupported media type"


class Unprocessable(KonvertError):
    """Well-formed, but the business rules refuse it."""

    status, code, title = 422, "unprocessable", "Request cannot be processed"


class UnsupportedCurrency(Unprocessable):
    code, title = "unsupported_currency", "Currency not in the program"


class UnknownPartner(Unprocessable):
    code, title = "unknown_partner", "Partner not in the program"


class RefundExceedsPurchase(Unprocessable):
    code, title = "refund_exceeds_purchase", "Refund exceeds what was purchased"


class RateLimited(KonvertError):
    status, code, title = 429, "rate_limited", "Too many requests"


class PurposeForbidden(Forbidden):
    """The API key is bound to other consent purposes."""

    code, title = "purpose_forbidden", "Not allowed for this purpose"


class PartnerForbidden(Forbidden):
    """The API key is bound to other partners."""

    code, title = "partner_forbidden", "Not allowed for this partner"


class InvalidSignature(Unauthenticated):
    """A webhook delivery without a valid signature of its integration."""

    code, title = "invalid_signature", "Invalid webhook signature"


class IntegrationNotFound(NotFound):
    code, title = "integration_not_found", "Integration not found"


class RequestTimeout(KonvertError):
    """The request's body did not arrive in time (KONVERT_BODY_READ_TIMEOUT_SECONDS)."""

    status, code, title = 408, "request_timeout", "Request timeout"


class ClientClosedRequest(KonvertError):
    """The client went away before its request was read (never seen by it; counted as 499)."""

    status, code, title = 499, "client_closed_request", "Client closed the request"


class ServiceUnavailable(KonvertError):
    status, code, title = 503, "service_unavailable", "Service unavailable"


class ConcurrentWrite(ServiceUnavailable):
    """A concurrent request changed what this one was written against (it posted the same
    purchase id meanwhile, say). Trying again settles it; the client sees 503 only if that fails too."""

    code, title = "concurrent_write", "A concurrent request got in the way"


class InternalError(KonvertError):
    """A bug or an outage konvert did not foresee. The response carries only the request id."""

    status, code, title = 500, "internal_error", "Internal error"


class RewardNotFound(NotFound):
    code, title = "reward_not_found", "Reward not found"


class RedemptionNotFound(NotFound):
    code, title = "redemption_not_found", "Redemption not found"


class RewardUnavailable(Conflict):
    code, title = "reward_unavailable", "Reward not available now"


class OutOfStock(Conflict):
    code, title = "out_of_stock", "Reward out of stock"


class HoldNotActive(Conflict):
    """Capture or release of a redemption that is not (or no longer) held."""

    code, title = "hold_not_active", "Redemption is not held"


class KudosNotFound(NotFound):
    code, title = "kudos_not_found", "Kudos not found"


class SelfKudos(Unprocessable):
    """A member liked or marked helpful their own post."""

    code, title = "self_kudos", "Members cannot give kudos to themselves"


class DuplicateKudos(Conflict):
    """A standing kudos from the same giver, for the same post and kind, has another kudos_id."""

    code, title = "duplicate_kudos", "This kudos was already given"


class GiverLimitReached(RateLimited):
    code, title = "giver_limit_reached", "The giver gave the most kudos allowed per day"


class LeaderboardUnavailable(ServiceUnavailable):
    code, title = "leaderboard_unavailable", "Leaderboards are unavailable"


class UnknownPreference(NotFound):
    """The program's preference catalog has no such key (and the member has not shared it)."""

    code, title = "unknown_preference", "Preference not in the catalog"


class InvalidPreferenceValue(Unprocessable):
    """The value does not fit the catalog entry's type; the detail names the key and what it allows."""

    code, title = "invalid_preference_value", "Invalid preference value"


class PurposeNotAllowed(Unprocessable):
    """Consent names a purpose the catalog entry may not be used for."""

    code, title = "purpose_not_allowed", "Purpose not allowed for this preference"


class UnknownPurpose(Unprocessable):
    code, title = "unknown_purpose", "Purpose not in the program"


# --- events out ------------------------------------------------------------------------------


class WebhookEndpointNotFound(NotFound):
    code, title = "webhook_endpoint_not_found", "Webhook endpoint not found"


class WebhookMessageNotFound(NotFound):
    code, title = "webhook_message_not_found", "Webhook message not found"


class WebhookMessageNotFailed(Conflict):
    """Only a dead-lettered message can be sent again; a pending one is still being retried."""

    code, title = "webhook_message_not_failed", "Webhook message not failed"


class WebhookUrlRefused(Unprocessable):
    """An endpoint URL whose host is (or resolves to) a loopback, private, link-local or otherwise
    non-public address, unless KONVERT_WEBHOOK_ALLOW_PRIVATE_ADDRESSES allows it."""

    code, title = "webhook_url_refused", "Webhook URL refused"
