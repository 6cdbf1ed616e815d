"""The OpenAPI document tells the truth: every response a route really sends, and who may call it.

A route declares what it may refuse beyond the common cases as ``opt={"problems": (...codes)}``;
:class:`ProblemResponses` adds the cases every route of its kind shares (a key: 401, 403, 429; a
body: 400, 408, 413, 415; parameters: 422; PostgreSQL or Redis away: 503) and documents each
status as ``application/problem+json`` with one example per ``code``. The status of a code is
the one its error class in :mod:`konvert.errors` answers, so the table cannot drift from the
responses. Routes with a key carry the ``apiKey`` security requirement; public ones none.

:class:`SequenceSchemas` keeps what bounded tuples and dicts say in the document; :func:`finish`
adds what Litestar leaves out of it: ``additionalProperties: false`` on bodies that refuse unknown
fields, and links from writes to the operations that use what they made.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import msgspec
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Example, Link, OpenAPI, OpenAPIResponse, OpenAPIType, Schema
from litestar.params import KwargDefinition
from litestar.plugins import OpenAPISchemaPlugin, ReceiveRoutePlugin
from litestar.routes import BaseRoute, HTTPRoute
from litestar.typing import FieldDefinition

from konvert import errors
from konvert.problems import PROBLEM_MEDIA_TYPE, Problem

SECURITY_SCHEME = "apiKey"
API_KEY: list[dict[str, list[str]]] = [{SECURITY_SCHEME: []}]


def _error_classes(base: type[errors.KonvertError]) -> Iterator[type[errors.KonvertError]]:
    for sub in base.__subclasses__():
        yield sub
        yield from _error_classes(sub)


# Every problem konvert answers, by code: its status and title come from its error class.
PROBLEMS: dict[str, type[errors.KonvertError]] = {cls.code: cls for cls in _error_classes(errors.KonvertError)}
# Never documented: a bug (500), and a client that left before its answer (499, only in metrics).
UNDOCUMENTED = frozenset({"internal_error", "client_closed_request"})

KEYED = ("unauthenticated", "forbidden", "rate_limited")
BODY = ("malformed_request", "request_timeout", "payload_too_large", "unsupported_media_type", "validation_failed")
PARAMETERS = ("malformed_request", "validation_failed")
PATH = ("not_found",)  # a path parameter holding "/" matches no route
ALWAYS = ("service_unavailable",)

# The codes whose answers carry Retry-After (every 503 does).
_RETRY_AFTER_CODES = frozenset({"rate_limited"})
_NOT_PARAMETERS = frozenset({"self", "request", "services", "data"})


def route_problems(route: HTTPRoute, opt: Mapping[str, Any], parameters: set[str]) -> list[str]:
    """The codes a handler of ``route`` may answer: its kind's, then its own ``opt["problems"]``."""
    codes: list[str] = []
    if opt.get("scope"):
        codes += KEYED
    if opt.get("body"):
        codes += BODY
    if parameters - _NOT_PARAMETERS or route.path_parameters:
        codes += PARAMETERS
    if route.path_parameters:
        codes += PATH
    if not opt.get("no_backend"):
        codes += ALWAYS
    codes += opt.get("problems", ())
    unknown = [code for code in codes if code not in PROBLEMS or code in UNDOCUMENTED]
    if unknown:
        raise ValueError(f"{route.path}: unknown problem codes {unknown}")
    return list(dict.fromkeys(codes))


def problem_responses(codes: list[str]) -> dict[int, ResponseSpec]:
    """One problem+json response per status, with an example per code."""
    by_status: dict[int, list[type[errors.KonvertError]]] = {}
    for code in codes:
        by_status.setdefault(PROBLEMS[code].status, []).append(PROBLEMS[code])
    responses = {}
    for status, kinds in sorted(by_status.items()):
        listed = ", ".join(f"`{kind.code}`" for kind in kinds)
        waits = [f"`{kind.code}`" for kind in kinds if status == 503 or kind.code in _RETRY_AFTER_CODES]
        retry = f" {', '.join(waits)} carry `Retry-After` (seconds)." if waits else ""
        responses[status] = ResponseSpec(
            data_container=Problem,
            generate_examples=False,
            description=f"{kinds[0].title if len(kinds) == 1 else 'Problem'}: {listed}.{retry}",
            media_type=PROBLEM_MEDIA_TYPE,
            examples=[
                Example(
                    summary=f"{kind.code}: {kind.title}",
                    value={
                        "type": f"urn:konvert:problem:{kind.code}",
                        "title": kind.title,
                        "status": status,
                        "code": kind.code,
                        "detail": "",
                        "request_id": "",
                    },
                )
                for kind in kinds
            ],
        )
    return responses


class ProblemResponses(ReceiveRoutePlugin):
    """Documents each route's problem responses and security as Litestar registers it."""

    def receive_route(self, route: BaseRoute) -> None:
        if not isinstance(route, HTTPRoute):
            return
        for handler in route.route_handlers:
            if handler.fn.__module__.startswith("litestar."):
                continue  # Litestar's own: OPTIONS, the OpenAPI documents
            opt = handler.opt
            parameters = set(handler.parsed_fn_signature.parameters)
            codes = route_problems(route, opt, parameters)
            handler.responses = {**problem_responses(codes), **(handler.responses or {})}
            if opt.get("scope"):
                handler.security = API_KEY


def documented_codes(operation: Mapping[str, Any]) -> dict[int, set[str]]:
    """The problem codes an OpenAPI operation documents, by status (for tests and clients)."""
    found: dict[int, set[str]] = {}
    for status, response in operation.get("responses", {}).items():
        media = response.get("content", {}).get(PROBLEM_MEDIA_TYPE)
        if media:
            found[int(status)] = {example["value"]["code"] for example in media.get("examples", {}).values()}
    return found


# Links from a write's answer to the operations that use what it made: documentation for clients,
# and the paths schemathesis' stateful tests walk. (from, to, to's parameters as runtime expressions)
LINKS: tuple[tuple[tuple[str, str], tuple[str, str], dict[str, str]], ...] = (
    (
        ("post", "/v1/purchases"),
        ("post", "/v1/purchases/{purchase_id}/refunds"),
        {"purchase_id": "$response.body#/purchase_id"},
    ),
    (("post", "/v1/purchases"), ("get", "/v1/members/{member_id}/balance"), {"member_id": "$response.body#/member_id"}),
    *(
        (
            ("post", "/v1/members/{member_id}/redemptions"),
            ("post", f"/v1/redemptions/{{redemption_id}}/{action}"),
            {"redemption_id": "$response.body#/redemption_id"},
        )
        for action in ("capture", "release", "cancel")
    ),
    (("post", "/v1/kudos"), ("delete", "/v1/kudos/{kudos_id}"), {"kudos_id": "$response.body#/kudos_id"}),
    *(
        (("put", "/v1/integrations/{name}"), target, {"name": "$request.path.name"})
        for target in (
            ("get", "/v1/integrations/{name}"),
            ("get", "/v1/integrations/{name}/deliveries"),
            ("post", "/v1/integrations/{name}/deliveries/retry"),
            ("delete", "/v1/integrations/{name}"),
        )
    ),
    *(
        (("put", "/v1/webhook-endpoints/{endpoint_id}"), target, {"endpoint_id": "$request.path.endpoint_id"})
        for target in (
            ("get", "/v1/webhook-endpoints/{endpoint_id}"),
            ("get", "/v1/webhook-endpoints/{endpoint_id}/messages"),
            ("post", "/v1/webhook-endpoints/{endpoint_id}/rotate-secret"),
            ("delete", "/v1/webhook-endpoints/{endpoint_id}"),
        )
    ),
    (
        ("put", "/v1/members/{member_id}/preferences/{key}"),
        ("delete", "/v1/members/{member_id}/preferences/{key}"),
        {"member_id": "$request.path.member_id", "key": "$request.path.key"},
    ),
    (
        ("put", "/v1/members/{member_id}/identities/{integration}/{external_id}"),
        ("delete", "/v1/members/{member_id}/identities/{integration}/{external_id}"),
        {
            "member_id": "$request.path.member_id",
            "integration": "$request.path.integration",
            "external_id": "$request.path.external_id",
        },
    ),
)


def finish(openapi: OpenAPI) -> None:
    """What Litestar's document leaves out: closed request objects, and links."""
    refuse_unknown_fields(openapi)
    add_links(openapi)


def add_links(openapi: OpenAPI) -> None:
    """The :data:`LINKS` on every 2xx answer of their source operations."""
    for (from_method, from_path), (to_method, to_path), parameters in LINKS:
        source = getattr(openapi.paths[from_path], from_method) if openapi.paths else None
        target = getattr(openapi.paths[to_path], to_method) if openapi.paths else None
        if source is None or target is None or target.operation_id is None:
            raise ValueError(f"link {from_method} {from_path} -> {to_method} {to_path}: no such operation")
        for status, response in (source.responses or {}).items():
            if status.startswith("2") and isinstance(response, OpenAPIResponse):
                link = Link(operation_id=target.operation_id, parameters=dict(parameters))
                response.links = {**(response.links or {}), target.operation_id: link}


def refuse_unknown_fields(openapi: OpenAPI) -> None:
    """Objects whose Struct refuses unknown fields (the request bodies) say so in the document,
    with ``additionalProperties: false``; Litestar leaves it out."""
    forbidding: dict[str, set[bool]] = {}
    for struct in _subclasses(msgspec.Struct):
        forbidding.setdefault(struct.__name__, set()).add(bool(struct.__struct_config__.forbid_unknown_fields))
    components = openapi.components.schemas if openapi.components else None
    for name, schema in (components or {}).items():
        if forbidding.get(name) == {True} and isinstance(schema, Schema):
            schema.additional_properties = False


def _subclasses(base: type[msgspec.Struct]) -> Iterator[type[msgspec.Struct]]:
    for sub in base.__subclasses__():
        yield sub
        yield from _subclasses(sub)


class SequenceSchemas(OpenAPISchemaPlugin):
    """Bounded collections as their msgspec types say: a variadic tuple
    (``Annotated[tuple[X, ...], Meta(max_length=...)]``) as an array of X with X's own bounds, a
    bounded dict as an object with its bounds and its keys' pattern. Litestar's generic path made
    such a tuple's items ``oneOf[X, {}]``, which admits anything, and dropped the rest."""

    def is_plugin_supported_field(self, field_definition: FieldDefinition) -> bool:
        return _variadic_tuple(field_definition) is not None or _bounded_dict(field_definition)

    def to_openapi_schema(self, field_definition: FieldDefinition, schema_creator: Any) -> Schema:
        bounds = _meta_bounds(field_definition.metadata)
        item = _variadic_tuple(field_definition)
        if item is not None:
            return Schema(
                type=OpenAPIType.ARRAY,
                items=schema_creator.for_field_definition(_bounded(item)),
                min_items=bounds.get("min_length"),
                max_items=bounds.get("max_length"),
            )
        key, value = field_definition.inner_types
        return Schema(
            type=OpenAPIType.OBJECT,
            additional_properties=schema_creator.for_field_definition(_bounded(value)),
            property_names=schema_creator.for_field_definition(_bounded(key)),
            min_properties=bounds.get("min_length"),
            max_properties=bounds.get("max_length"),
        )


def _meta_bounds(metadata: Iterable[Any]) -> dict[str, Any]:
    """The bounds the msgspec Meta among ``metadata`` states, by name."""
    bounds: dict[str, Any] = {}
    for meta in metadata:
        if isinstance(meta, msgspec.Meta):
            for name in ("pattern", "min_length", "max_length", "ge", "gt", "le", "lt", "description"):
                if getattr(meta, name) is not None:
                    bounds[name] = getattr(meta, name)
    return bounds


def _bounded(field_definition: FieldDefinition) -> FieldDefinition:
    """An item's field definition carrying its own Meta bounds (Litestar reads them only off fields)."""
    bounds = _meta_bounds(field_definition.metadata)
    if not bounds or field_definition.annotation not in (str, int):
        return field_definition
    return FieldDefinition.from_annotation(field_definition.annotation, kwarg_definition=KwargDefinition(**bounds))


def _variadic_tuple(field_definition: FieldDefinition) -> FieldDefinition | None:
    inner = field_definition.inner_types
    if field_definition.origin is tuple and len(inner) == 2 and inner[1].annotation is Ellipsis:
        return inner[0]
    return None


def _bounded_dict(field_definition: FieldDefinition) -> bool:
    return (
        field_definition.origin is dict
        and len(field_definition.inner_types) == 2
        and bool(_meta_bounds(field_definition.metadata))
    )
