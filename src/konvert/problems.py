"""The one mapping from errors to RFC 9457 problem+json responses.

Every failure the API can return has a stable machine-readable ``code``; ``type`` is a URN built
from it so clients can switch on either. Errors are recognised by their type, never by their
message: Litestar's validation errors carry the field's path and where it came from
(``key``, ``source``); database errors are translated by SQLSTATE class and constraint name.
"""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
import asyncpg.exceptions
import msgspec
import redis.exceptions
from litestar import Request, Response
from litestar.exceptions import (
    HTTPException,
    MethodNotAllowedException,
    NotAuthorizedException,
    NotFoundException,
    PermissionDeniedException,
    ValidationException,
)
from litestar.exceptions.http_exceptions import RequestEntityTooLarge

from konvert import errors
from konvert.observability import REQUEST_ID_HEADER, ThrottledLog, client_gone, observe_unmatched, request_id_var

log = logging.getLogger("konvert.errors")
unavailable_log = ThrottledLog(log)

# What a client is told to wait before it tries a 503 again.
RETRY_AFTER_SECONDS = 1
# Errors that mean PostgreSQL or Redis cannot be reached right now (refused, reset, timed out, a
# connection lost mid-query or left in a broken state): 503, and no traceback, for nothing in
# konvert is wrong. The pool replaces broken connections, so the service recovers by itself.
UNREACHABLE: tuple[type[Exception], ...] = (
    OSError,  # refused, reset, unreachable; TimeoutError too (a pool or connect timeout)
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    # A Redis Cluster with a master down: slots refused, or not covered by any master.
    redis.exceptions.ClusterDownError,
    redis.exceptions.RedisClusterException,
)
# PostgreSQL errors (by SQLSTATE class) that say the server cannot serve right now: 08 connection
# exceptions, 53 insufficient resources (too many connections), 57 operator intervention
# (shutting down, starting up, a backend terminated).
UNAVAILABLE_SQLSTATE_CLASSES = ("08", "53", "57")

PROBLEM_MEDIA_TYPE = "application/problem+json"


class FieldError(msgspec.Struct, omit_defaults=True):
    field: str
    message: str


class Problem(msgspec.Struct, omit_defaults=True):
    """An RFC 9457 problem detail, with konvert's stable ``code`` and the request id."""

    type: str
    title: str
    status: int
    code: str
    detail: str = ""
    instance: str = ""
    request_id: str = ""
    errors: list[FieldError] | None = None


# Constraint name -> the error a violation of it means for the client.
CONSTRAINT_ERRORS: dict[str, type[errors.KonvertError]] = {
    "purchases_partner_purchase_id_key": errors.IdempotencyConflict,
    "refunds_purchase_refund_id_key": errors.IdempotencyConflict,
    "redemptions_redemption_id_key": errors.IdempotencyConflict,
    "adjustments_adjustment_id_key": errors.IdempotencyConflict,
    # A purchase, redemption or adjustment id another member's write claimed (konvert.ledger.keys).
    # (A member id is claimed with `on conflict do nothing`: a concurrent creation is no error.)
    "natural_keys_pkey": errors.IdempotencyConflict,
    "rewards_stock_check": errors.OutOfStock,
}


def problem_response(
    request: Request[Any, Any, Any], exc: errors.KonvertError, request_id: str | None = None
) -> Response[Problem]:
    problem = Problem(
        type=f"urn:konvert:problem:{exc.code}",
        title=exc.title,
        status=exc.status,
        code=exc.code,
        detail=exc.detail,
        instance=request.url.path,
        request_id=request_id or request_id_var.get(),
        errors=[FieldError(**e) for e in exc.errors] if exc.errors else None,
    )
    headers = {}
    if "allow" in exc.extra:
        headers["allow"] = exc.extra["allow"]
    if "retry_after" in exc.extra or exc.status == 503:
        headers["retry-after"] = str(exc.extra.get("retry_after", RETRY_AFTER_SECONDS))
    if request_id:  # a request no middleware saw: its id goes on the response here
        headers[REQUEST_ID_HEADER.decode()] = request_id
    return Response(problem, status_code=exc.status, media_type=PROBLEM_MEDIA_TYPE, headers=headers or None)


def handle_konvert_error(request: Request[Any, Any, Any], exc: errors.KonvertError) -> Response[Problem]:
    return problem_response(request, exc)


def field_errors(exc: ValidationException) -> list[dict[str, str]]:
    """What Litestar found wrong, field by field: ``key`` is the path of the value (``data``: the
    body itself), ``message`` msgspec's words for it."""
    found = []
    for item in exc.extra if isinstance(exc.extra, list) else []:
        if not isinstance(item, dict):
            continue
        key = str(item.get("key") or "")
        field = "body" if key in ("", "data") else key
        found.append({"field": field, "message": str(item.get("message", ""))})
    return found


def _body_is_empty(request: Request[Any, Any, Any], exc: ValidationException) -> bool:
    about_the_body = any(isinstance(item, dict) and item.get("source") == "body" for item in exc.extra or ())
    headers = request.headers
    sent_none = headers.get("content-length", "0") == "0" and "transfer-encoding" not in headers
    return about_the_body and sent_none


def handle_validation_error(request: Request[Any, Any, Any], exc: ValidationException) -> Response[Problem]:
    if _body_is_empty(request, exc):
        return problem_response(request, errors.MalformedRequest("the request body is empty; send a JSON object"))
    found = field_errors(exc)
    where = ", ".join(sorted({e["field"] for e in found})) or "request"
    return problem_response(request, errors.ValidationFailed(f"invalid value for {where}", errors=found or None))


def handle_http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Problem]:
    mapped: errors.KonvertError
    request_id = None
    if isinstance(exc, NotFoundException):
        mapped = errors.NotFound(f"no resource at {request.url.path}")
        request_id = observe_unmatched(request.scope, mapped.status)
    elif isinstance(exc, MethodNotAllowedException):
        allow = (exc.headers or {}).get("allow", "")
        mapped = errors.MethodNotAllowed(f"{request.method} is not allowed here", allow=allow)
        request_id = observe_unmatched(request.scope, mapped.status)
    elif isinstance(exc, NotAuthorizedException):
        mapped = errors.Unauthenticated(exc.detail)
    elif isinstance(exc, PermissionDeniedException):
        mapped = errors.Forbidden(exc.detail)
    elif isinstance(exc, RequestEntityTooLarge):
        mapped = errors.PayloadTooLarge("the request body is larger than this server accepts")
    elif exc.status_code == 415:
        mapped = errors.UnsupportedMediaType(exc.detail)
    elif 400 <= exc.status_code < 500:  # a body that is not JSON, among others
        mapped = errors.MalformedRequest(exc.detail)
    elif client_gone():  # Litestar's 500 for a body cut short: the client's doing, not a failure
        log.info("client disconnected before its request was read", extra={"path": request.url.path})
        mapped = errors.ClientClosedRequest("the client disconnected before its request was read")
    else:
        log.error("http error", extra={"status": exc.status_code, "detail": exc.detail})
        mapped = errors.ServiceUnavailable("the service cannot answer right now")
    return problem_response(request, mapped, request_id)


def handle_database_error(request: Request[Any, Any, Any], exc: asyncpg.PostgresError) -> Response[Problem]:
    constraint = getattr(exc, "constraint_name", None)
    if constraint in CONSTRAINT_ERRORS:
        return problem_response(request, CONSTRAINT_ERRORS[constraint](f"conflicts with existing data ({constraint})"))
    if isinstance(exc, asyncpg.DataError):
        # SQLSTATE class 22: a value PostgreSQL cannot store (out of range, untranslatable
        # character). The request is at fault; retrying it cannot help.
        return problem_response(request, errors.ValidationFailed("a value is out of range or cannot be stored"))
    if isinstance(exc, asyncpg.QueryCanceledError):
        return problem_response(request, errors.ServiceUnavailable("the database took too long to answer"))
    if (exc.sqlstate or "")[:2] in UNAVAILABLE_SQLSTATE_CLASSES:
        return handle_unreachable(request, exc)
    log.exception("database error")
    return problem_response(request, errors.ServiceUnavailable("the database could not complete the request"))


def unreachable_kind(exc: BaseException) -> str | None:
    """``<where>:<error type>`` when ``exc`` means PostgreSQL or Redis cannot be reached right now
    (see UNREACHABLE), else None: for work outside requests that logs such failures alike."""
    if isinstance(exc, asyncpg.PostgresError):
        if (exc.sqlstate or "")[:2] not in UNAVAILABLE_SQLSTATE_CLASSES:
            return None
    elif not isinstance(exc, UNREACHABLE):
        return None
    from_redis = isinstance(exc, redis.exceptions.RedisError | redis.exceptions.RedisClusterException)
    return f"{'redis' if from_redis else 'database'}:{type(exc).__name__}"


def handle_unreachable(request: Request[Any, Any, Any], exc: Exception) -> Response[Problem]:
    """PostgreSQL or Redis cannot be reached: 503, and a warning per kind of failure now and then."""
    kind = unreachable_kind(exc) or f"database:{type(exc).__name__}"
    where = kind.partition(":")[0]
    unavailable_log.warning(f"{where} unavailable", kind, error=str(exc)[:200])
    return problem_response(request, errors.ServiceUnavailable(f"the {where} cannot be reached; retry shortly"))


def handle_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Problem]:
    log.exception("unhandled error")
    return problem_response(
        request, errors.InternalError("an unexpected error occurred; the request id identifies it in the logs")
    )


EXCEPTION_HANDLERS: dict[Any, Any] = {
    errors.KonvertError: handle_konvert_error,
    ValidationException: handle_validation_error,
    HTTPException: handle_http_exception,
    asyncpg.PostgresError: handle_database_error,
    **dict.fromkeys(UNREACHABLE, handle_unreachable),
    Exception: handle_unexpected,
}
