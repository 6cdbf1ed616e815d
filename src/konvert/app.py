"""The HTTP service: ``create_app(settings)`` wires routes, lifespan, middleware, auth, errors and
OpenAPI, from what konvert.composition says konvert is made of. Every request goes through
Litestar's router, middleware and guards."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
from litestar import Litestar, Request
from litestar.di import Provide
from litestar.exceptions import SerializationException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from litestar.static_files import create_static_files_router
from swagger_ui_bundle import swagger_ui_path

from konvert import __version__, composition, errors, jobs
from konvert.auth import authorize
from konvert.contract import SECURITY_SCHEME, ProblemResponses, SequenceSchemas
from konvert.contract import finish as finish_document
from konvert.observability import RequestObserver
from konvert.problems import EXCEPTION_HANDLERS
from konvert.program import Program, load_program
from konvert.services import Services
from konvert.settings import Settings

# The API docs' Swagger UI comes from the swagger-ui-bundle-v2 wheel and is served by konvert itself,
# so the docs work without reaching any CDN (an air-gapped installation, a strict CSP).
DOCS_ASSETS_PATH = "/schema/assets"


def _api_docs() -> tuple[SwaggerRenderPlugin, Any]:
    """Swagger UI at /schema and /schema/swagger, and the static files it loads."""
    plugin = SwaggerRenderPlugin(
        path="/swagger",
        js_url=f"{DOCS_ASSETS_PATH}/swagger-ui-bundle.js",
        css_url=f"{DOCS_ASSETS_PATH}/swagger-ui.css",
        standalone_preset_js_url=f"{DOCS_ASSETS_PATH}/swagger-ui-standalone-preset.js",
        favicon=f"<link rel='icon' type='image/png' href='{DOCS_ASSETS_PATH}/favicon-32x32.png'>",
    )
    assets = create_static_files_router(
        path=DOCS_ASSETS_PATH, directories=[Path(str(swagger_ui_path))], include_in_schema=False, name="docs-assets"
    )
    return plugin, assets


class KonvertRequest(Request[Any, Any, Any]):
    """A request whose JSON body is decoded straight into the handler's body Struct, strictly.

    Litestar converts what ``json()`` returns with ``strict=False`` (right for path and query
    strings, wrong for JSON): it took ``"enabled": 0`` for false and ``"points": "5"`` for 5,
    which the OpenAPI document refuses. Decoding here holds a body to its JSON types, and Litestar's
    conversion of the decoded Struct is then a pass-through. A body nested deeper than the decoder
    recurses is the client's malformed body (400), not the server's error: msgspec raises
    RecursionError for it.
    """

    async def json(self) -> Any:
        body = await self.body()  # read (and kept) outside the try: only decoding may recurse too deep
        target = _body_struct(self.route_handler) if body else None
        try:
            return await super().json() if target is None else _decode(body, target)
        except RecursionError:
            raise SerializationException("the request body is nested too deeply") from None
        except msgspec.DecodeError:
            raise SerializationException("the request body is not valid JSON") from None


def _decode(body: bytes, target: type[msgspec.Struct]) -> Any:
    """The body as ``target``, holding it to its JSON types; ValidationFailed if it is not one. A body
    that is not one even with Litestar's coercions goes back to Litestar as JSON, which names what is
    wrong with it beside any bad path or query parameter."""
    try:
        return msgspec.json.decode(body, type=target)
    except msgspec.ValidationError as exc:
        if _invalid_even_coerced(body, target):
            return msgspec.json.decode(body)
        message, _, where = str(exc).partition(" - at `$")
        field = where.rstrip("`").lstrip(".") or "body"
        raise errors.ValidationFailed(
            f"invalid value for {field}", errors=[{"field": field, "message": message}]
        ) from None


def _invalid_even_coerced(body: bytes, target: type[msgspec.Struct]) -> bool:
    try:
        msgspec.convert(msgspec.json.decode(body), target, strict=False)
    except msgspec.ValidationError:
        return True
    return False


def _body_struct(handler: Any) -> type[msgspec.Struct] | None:
    """The msgspec Struct a handler takes as its body, if it takes one."""
    data = handler.parsed_fn_signature.parameters.get("data")
    annotation = getattr(data, "annotation", None)
    return annotation if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct) else None


def create_app(settings: Settings, program: Program | None = None) -> Litestar:
    """Build the ASGI app. Needs reachable PostgreSQL and Redis at start-up (the lifespan)."""
    program = program or load_program(settings.program_file)
    pages = composition.pages(settings)
    docs, docs_assets = _api_docs()

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        services = await composition.open_services(settings, program)
        app.state.services = services
        await composition.prepare(services)
        await pages.prepare(app, services)
        runners = []
        if settings.jobs_interval_seconds > 0:
            runners.append(asyncio.create_task(jobs.run_forever(services)))
        if settings.events_publish:
            runners.append(asyncio.create_task(composition.publish_events(services)))
        try:
            yield
        finally:
            for runner in runners:
                runner.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await runner
            await services.close()

    app = Litestar(
        route_handlers=[*composition.ROUTES, pages.router, docs_assets],
        template_config=composition.PAGE_TEMPLATES,
        lifespan=[lifespan],
        middleware=[RequestObserver(settings)],
        guards=[authorize],
        # One Services per process: resolved once, then taken from Litestar's cache.
        dependencies={"services": Provide(_services, sync_to_thread=False, use_cache=True)},
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=settings.request_max_body_bytes,
        request_class=KonvertRequest,
        openapi_config=OpenAPIConfig(
            title="konvert",
            version=__version__,
            description=(
                "Loyalty points and reputation engine. Every /v1 route needs an API key "
                "(`Authorization: Bearer kvt_...`) with the scope the route names. Errors are "
                "RFC 9457 problem+json with a stable `code`."
            ),
            path="/schema",
            render_plugins=[docs],
            components=Components(
                security_schemes={
                    SECURITY_SCHEME: SecurityScheme(type="http", scheme="bearer", description="kvt_... API key")
                }
            ),
            webhooks=composition.OPENAPI_WEBHOOKS,
        ),
        plugins=[ProblemResponses(), SequenceSchemas()],
        debug=False,
        # konvert configures logging itself (JSON lines with request ids); Litestar must not.
        logging_config=None,
    )
    # Built now (every route is registered), and finished where Litestar leaves things out.
    finish_document(app.openapi_schema)
    return app


def _services(request: Request[Any, Any, Any]) -> Services:
    services: Services = request.app.state.services
    return services


def app_from_environment() -> Litestar:
    """The app for ``konvert serve``'s worker processes, which get their settings from KONVERT_*."""
    from konvert.observability import configure_logging
    from konvert.serving import stop_when_orphaned
    from konvert.settings import load_settings

    stop_when_orphaned()
    settings = load_settings()
    configure_logging(settings)
    return create_app(settings)
