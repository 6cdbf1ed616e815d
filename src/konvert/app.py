"""The composition root: ``create_app(settings)`` wires routes, lifespan, auth, errors and OpenAPI."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from litestar import Litestar, Request
from litestar.di import Provide
from litestar.exceptions import SerializationException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import ScalarRenderPlugin, SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme

from konvert import __version__, direct, health, jobs
from konvert.auth import authorize
from konvert.earning.api import PURCHASES_PATH, PurchaseController, serve_purchase_directly
from konvert.earning.service import purchase_batcher
from konvert.ledger.api import BalanceController, serve_balance_directly
from konvert.observability import RequestObserver, flush_tally_periodically
from konvert.preferences import api as preferences_api
from konvert.problems import EXCEPTION_HANDLERS
from konvert.program import Program, load_program
from konvert.redemption import api as redemption_api
from konvert.redemption.service import seed_rewards
from konvert.reputation import api as reputation_api
from konvert.services import Services
from konvert.settings import Settings

log = logging.getLogger("konvert.app")

ROUTE_HANDLERS: list[Any] = [
    *health.ROUTES,
    BalanceController,
    PurchaseController,
    *redemption_api.ROUTES,
    *reputation_api.ROUTES,
    *preferences_api.ROUTES,
]


class KonvertRequest(Request[Any, Any, Any]):
    """A request whose JSON body, nested deeper than the decoder recurses, is the client's
    malformed body (400), not the server's error: msgspec raises RecursionError for it."""

    async def json(self) -> Any:
        await self.body()  # read (and kept) outside the try: only decoding may recurse too deep
        try:
            return await super().json()
        except RecursionError:
            raise SerializationException("the request body is nested too deeply") from None


class KonvertApp(Litestar):
    """Litestar with one outer layer that every response passes, 404s and errors included, and
    direct answers to plain balance reads, purchase postings and liveness probes (konvert.direct)."""

    observer: RequestObserver
    # Tests turn this off to compare the direct answers with the routes'.
    direct_paths: bool = True

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await self.observer.observe(scope, receive, send, self._serve_http)
        else:
            await super().__call__(scope, receive, send)

    async def _serve_http(self, scope: Any, receive: Any, send: Any) -> None:
        # The most frequent requests, answered without the framework when they are the plain
        # kind; everything else, and anything the framework would refuse, goes to the routes.
        if self.direct_paths and direct.takes_on(scope):
            path = scope["path"]
            if path.startswith("/v1/members/"):
                if await serve_balance_directly(self.state.services, scope, send):
                    return
            elif path == PURCHASES_PATH:
                receive = await serve_purchase_directly(self.state.services, scope, receive, send)
                if receive is None:  # answered
                    return
            elif path == health.LIVE_PATH and await health.serve_live_directly(scope, send):
                return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings, program: Program | None = None) -> KonvertApp:
    """Build the ASGI app. Needs reachable PostgreSQL and Redis at start-up (the lifespan)."""
    program = program or load_program(settings.program_file)

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        services = await Services.open(settings, program)
        app.state.services = services
        await seed_rewards(services)
        await services.accounts.warm(services.pool, system_accounts(program))
        services.purchases = purchase_batcher(services)
        services.purchases.start()
        runner = (
            asyncio.create_task(jobs.run_forever(services)) if settings.jobs_interval_seconds > 0 else None
        )
        tally = asyncio.create_task(flush_tally_periodically())
        try:
            yield
        finally:
            for task in (runner, tally):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await services.purchases.stop()
            await services.close()

    app = KonvertApp(
        route_handlers=ROUTE_HANDLERS,
        lifespan=[lifespan],
        guards=[authorize],
        dependencies={"services": Provide(_services, sync_to_thread=False)},
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
            render_plugins=[ScalarRenderPlugin(), SwaggerRenderPlugin(path="/swagger")],
            components=Components(
                security_schemes={
                    "apiKey": SecurityScheme(type="http", scheme="bearer", description="kvt_... API key")
                }
            ),
            security=[{"apiKey": []}],
        ),
        debug=False,
        # konvert configures logging itself (JSON lines with request ids); Litestar must not.
        logging_config=None,
    )
    app.observer = RequestObserver(settings)
    return app


def system_accounts(program: Program) -> list[tuple[str, str]]:
    """The system accounts this program's writes use (kudos sources are created as they come)."""
    names = [("points", f"issued:{partner.id}") for partner in program.partners]
    names += [("points", name) for name in ("redeemed", "expired", "adjustments", "preferences")]
    return names


def _services(request: Request[Any, Any, Any]) -> Services:
    return request.app.state.services


def app_from_environment() -> KonvertApp:
    """The app for ``konvert serve``'s worker processes, which get their settings from KONVERT_*."""
    from konvert.observability import configure_logging
    from konvert.settings import load_settings

    settings = load_settings()
    configure_logging(settings)
    return create_app(settings)
