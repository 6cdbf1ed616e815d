"""The one mapping from errors to RFC 9457 problem+json responses.

Every failure the API can return has a stable machine-readable ``code``; ``type`` is a URN
built from it so clients can switch on either. Database constraint violations that reach
here are translated by constraint name.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import asyncpg
import msgspec
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
from konvert.observability import request_id_var

log = logging.getLogger("konvert.errors")

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
    "members_member_id_key": errors.Conflict,
    "purchases_partner_purchase_id_key": errors.IdempotencyConflict,
    "refunds_purchase_refund_id_key": errors.IdempotencyConflict,
    "redemptions_redemption_id_key": errors.IdempotencyConflict,
    "adjustments_adjustment_id_key": errors.IdempotencyConflict,
    "rewards_stock_check": errors.OutOfStock,
}


def problem_response(request: Request[Any, Any, Any] | None, exc: errors.KonvertError) -> Response[Problem]:
    problem = Problem(
        type=f"urn:konvert:problem:{exc.code}",
        title=exc.title,
        status=exc.status,
        code=exc.code,
        detail=exc.detail,
        instance=request.url.path if request is not None else "",
        request_id=request_id_var.get(),
        errors=[FieldError(**e) for e in exc.errors] if exc.errors else None,
    )
    headers = {"allow": exc.extra["allow"]} if "allow" in exc.extra else None
    return Response(problem, status_code=exc.status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def handle_konvert_error(request: Request[Any, Any, Any], exc: errors.KonvertError) -> Response[Problem]:
    return problem_response(request, exc)


_NAMED_FIELD = re.compile(r"(?:unknown|missing required) field `([^`]*)`")
_MSGSPEC_PATH = re.compile(r"^(?P<text>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)


def field_errors_from_validation(exc: ValidationException) -> list[dict[str, str]]:
    """Litestar hands msgspec's message through; turn ``... - at `$.lines[0].quantity``` into a field."""
    found = []
    for item in exc.extra if isinstance(exc.extra, list) else []:
        message = str(item.get("message", "")) if isinstance(item, dict) else str(item)
        key = item.get("key") if isinstance(item, dict) else None
        match = _MSGSPEC_PATH.match(message)
        text, path = (match["text"], match["path"]) if match else (message, None)
        # Litestar moves msgspec's path into `key` ("data" is the body itself); either names the field.
        field = (path or "").lstrip(".") or (str(key) if key and key != "data" else "")
        if named := _NAMED_FIELD.search(text):
            # msgspec reports an unknown or missing field at its parent object; name the field itself.
            field = f"{field}.{named[1]}" if field else named[1]
        found.append({"field": field or "body", "message": text})
    return found


def _has_no_body(exc: ValidationException) -> bool:
    # Litestar reports a request without any body as a KeyError ("'data'") on the body parameter.
    items = exc.extra if isinstance(exc.extra, list) else []
    return any(isinstance(i, dict) and i.get("key") == "data" and i.get("message") == "'data'" for i in items)


def handle_validation_error(request: Request[Any, Any, Any], exc: ValidationException) -> Response[Problem]:
    if _has_no_body(exc):
        return problem_response(request, errors.MalformedRequest("the request body is empty; send a JSON object"))
    field_errors = field_errors_from_validation(exc)
    if any(e["message"].startswith(("JSON is malformed", "Input data was truncated")) for e in field_errors):
        return problem_response(request, errors.MalformedRequest("the request body is not valid JSON"))
    where = ", ".join(sorted({e["field"] for e in field_errors})) or "request"
    return problem_response(
        request, errors.ValidationFailed(f"invalid value for {where}", errors=field_errors or None)
    )


def handle_http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Problem]:
    mapped: errors.KonvertError
    if isinstance(exc, NotFoundException):
        mapped = errors.NotFound(f"no resource at {request.url.path}")
    elif isinstance(exc, MethodNotAllowedException):
        allow = (exc.headers or {}).get("allow", "")
        mapped = errors.MethodNotAllowed(f"{request.method} is not allowed here", allow=allow)
    elif isinstance(exc, NotAuthorizedException):
        mapped = errors.Unauthenticated(exc.detail)
    elif isinstance(exc, PermissionDeniedException):
        mapped = errors.Forbidden(exc.detail)
    elif isinstance(exc, RequestEntityTooLarge):
        mapped = errors.PayloadTooLarge("the request body is larger than this server accepts")
    elif exc.status_code == 415:
        mapped = errors.UnsupportedMediaType(exc.detail)
    elif 400 <= exc.status_code < 500:
        mapped = errors.MalformedRequest(exc.detail)
    else:
        log.error("http error", extra={"status": exc.status_code, "detail": exc.detail})
        mapped = errors.ServiceUnavailable("the service cannot answer right now")
    return problem_response(request, mapped)


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
    log.exception("database error")
    return problem_response(request, errors.ServiceUnavailable("the database could not complete the request"))


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
    Exception: handle_unexpected,
}
