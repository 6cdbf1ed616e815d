"""The portal's pages: server-rendered HTML forms over the features' services, for the one member
a session belongs to.

Every page reads the member from the session, never from the URL or a form, so no request can
reach another member's data. The session lives in Redis (Litestar's server-side sessions,
HttpOnly and SameSite=Lax cookie, idle and absolute timeouts, a new id at every entry: see
``sessions``); the card opened from a link shows without one. Every form that changes something
carries a CSRF token (Litestar's CSRF middleware, double-submit cookie signed with a secret
every process shares).
"""

from __future__ import annotations

import functools
import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, cast

import msgspec
from jinja2 import BaseLoader, Environment, FileSystemLoader, TemplateNotFound, select_autoescape
from litestar import Controller, Litestar, Request, Response, Router, get, post
from litestar.config.csrf import CSRFConfig
from litestar.connection import ASGIConnection
from litestar.datastructures import CacheControlHeader, Cookie, ResponseHeader
from litestar.enums import RequestEncodingType
from litestar.exceptions import HTTPException, NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware import DefineMiddleware
from litestar.middleware.csrf import CSRFMiddleware
from litestar.middleware.session.server_side import ServerSideSessionConfig
from litestar.params import Body, PathParameter, QueryParameter
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.response import Redirect, Template
from litestar.static_files import create_static_files_router
from litestar.stores.redis import RedisStore
from litestar.template.config import TemplateConfig
from redis.asyncio import Redis
from redis.exceptions import RedisError

from konvert import errors
from konvert.auth import Principal
from konvert.db import Queryable
from konvert.portal import i18n, links, sessions, views
from konvert.portal.model import LOCALES, Locale
from konvert.preferences import service as preferences
from konvert.preferences.model import ConsentsIn
from konvert.privacy import service as privacy
from konvert.problems import RETRY_AFTER_SECONDS, UNREACHABLE
from konvert.redemption import service as redemption
from konvert.redemption.model import RedemptionId, RedemptionIn, RedemptionOut, RewardId
from konvert.services import Services, Svc
from konvert.settings import Settings

PACKAGE = resources.files("konvert.portal")
SESSION_STORE = "konvert-portal-sessions"
CSRF_COOKIE = "konvert_csrf"
# Changes made in the portal are recorded as made by this client (consents, exports, erasure).
PORTAL = Principal(key_id=0, name="member portal", scopes=frozenset())
HTML = "text/html; charset=utf-8"
# Pages load nothing from elsewhere, run no inline script, and may not be framed (the card says
# who may frame it).
_CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; script-src 'self'; form-action 'self'; "
    "base-uri 'none'; frame-ancestors {ancestors}"
)
PAGE_CSP = _CSP.format(ancestors="'none'")
# Where a portal link may lead after it signed the member in.
_VIEWS = {"overview": "/portal", "card": "/portal/card", "rewards": "/portal/rewards", "privacy": "/portal/privacy"}
_redemption = msgspec.json.Decoder(RedemptionOut).decode


class SessionEnded(errors.Unauthenticated):
    code, title = "portal_session_ended", "Your portal session has ended"


class LinkNotValid(errors.Unauthenticated):
    code, title = "portal_link_not_valid", "This link cannot be used"


@functools.cache
def asset(name: str) -> str:
    """The URL of a static file, with a digest of its content: browsers may keep it for a year,
    and a new konvert with another file links to another URL."""
    digest = hashlib.sha256(PACKAGE.joinpath("static", name).read_bytes()).hexdigest()[:12]
    return f"/portal/static/{name}?v={digest}"


class LocaleLoader(BaseLoader):
    """Loads "de/overview.html" from overview.html (compiled under its own name, with its locale)."""

    def __init__(self, templates: FileSystemLoader) -> None:
        self.templates = templates

    def get_source(self, environment: Environment, template: str) -> tuple[str, str | None, Callable[[], bool] | None]:
        locale, _, name = template.partition("/")
        if locale not in LOCALES:
            raise TemplateNotFound(template)
        return self.templates.get_source(environment, name)


class PortalEnvironment(Environment):
    """Templates by locale: "de/overview.html" is overview.html with its messages in German
    (``i18n.CompiledMessages``), and the templates it extends or includes are its locale's too."""

    def join_path(self, template: str, parent: str) -> str:
        locale = parent.partition("/")[0]
        return f"{locale}/{template}" if locale in LOCALES else template


def environment() -> Environment:
    env = PortalEnvironment(
        loader=LocaleLoader(FileSystemLoader(str(PACKAGE.joinpath("templates")))),
        extensions=[i18n.CompiledMessages],
        autoescape=select_autoescape(default=True),
        trim_blocks=True,
        lstrip_blocks=True,
        # The templates ship with the package and change only with it: no stat() per page.
        auto_reload=False,
    )
    env.globals.update(i18n.GLOBALS, asset=asset)
    env.filters.update(i18n.FILTERS)
    return env


TEMPLATES = TemplateConfig(instance=JinjaTemplateEngine.from_environment(environment()))


# --- the session ---------------------------------------------------------------------------------


@dataclass
class MemberSession:
    member_id: str
    locale: Locale
    return_url: str | None


def session_of(request: ASGIConnection[Any, Any, Any, Any]) -> MemberSession:
    data = request.session
    locale = data.get("locale") or i18n.from_accept_language(request.headers.get("accept-language"))
    return MemberSession(data["member_id"], locale, data.get("return_url"))


async def member_session(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """The portal's guard: a page needs a live session (started within the absolute timeout;
    Redis forgets it after the idle timeout)."""
    if not handler.opt.get("member_session"):
        return
    services: Services = connection.app.state.services
    data = connection.session
    started = data.get("started_at")
    now = services.clock().timestamp()
    if not data.get("member_id") or not isinstance(started, int | float):
        raise SessionEnded("open the portal again from the shop or forum")
    if now - started > services.settings.portal_session_absolute_seconds:
        connection.clear_session()
        raise SessionEnded("open the portal again from the shop or forum")


def page(
    request: Request[Any, Any, Any],
    name: str,
    context: dict[str, Any],
    status_code: int = 200,
    headers: dict[str, str] | None = None,
    session: MemberSession | None = None,
) -> Template:
    session = session or session_of(request)
    base = {
        **i18n.messages(session.locale),
        "locale": session.locale,
        "locales": LOCALES,
        "return_url": session.return_url,
        "program": request.app.state.services.program.name,
        "path": request.url.path,
    }
    return Template(
        template_name=f"{session.locale}/{name}",
        context=base | context,
        status_code=status_code,
        media_type=HTML,
        headers=headers,
    )


def _error_page(request: Request[Any, Any, Any], exc: errors.KonvertError) -> Template:
    data = request.scope.get("session") or {}
    locale = (data.get("locale") if isinstance(data, dict) else None) or i18n.from_accept_language(
        request.headers.get("accept-language")
    )
    context = {
        **i18n.messages(locale),
        "locale": locale,
        "locales": LOCALES,
        "return_url": data.get("return_url") if isinstance(data, dict) else None,
        "program": request.app.state.services.program.name,
        "error": exc,
        "path": request.url.path,
    }
    headers = {"content-security-policy": PAGE_CSP, "cache-control": "no-store"}
    if exc.status == 503:
        headers["retry-after"] = str(RETRY_AFTER_SECONDS)
    return Template(
        template_name=f"{locale}/error.html", context=context, status_code=exc.status, media_type=HTML, headers=headers
    )


def _handle_konvert_error(request: Request[Any, Any, Any], exc: errors.KonvertError) -> Template:
    return _error_page(request, exc)


def _handle_http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Template:
    mapped: errors.KonvertError
    if isinstance(exc, PermissionDeniedException):
        mapped = errors.Forbidden("the form was too old or did not come from this page; go back and send it again")
    elif isinstance(exc, NotAuthorizedException):
        mapped = SessionEnded("open the portal again from the shop or forum")
    elif exc.status_code < 500:
        mapped = errors.MalformedRequest("the form did not hold what this page expects")
    else:
        mapped = errors.ServiceUnavailable("the portal cannot answer right now")
    return _error_page(request, mapped)


def _handle_unreachable(request: Request[Any, Any, Any], exc: Exception) -> Template:
    # PostgreSQL or Redis cannot be reached (the sessions live in Redis: without it no page knows
    # its member). The page says so, like the API's 503, and nothing is logged as a bug.
    return _error_page(request, errors.ServiceUnavailable("the portal is unavailable for a moment"))


# --- forms ----------------------------------------------------------------------------------------

Form = Body(media_type=RequestEncodingType.URL_ENCODED)


class RedeemForm(msgspec.Struct, frozen=True):
    # Made when the confirmation page was shown: sending the form twice redeems once.
    redemption_id: RedemptionId


class ConsentForm(msgspec.Struct, frozen=True):
    purpose: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    granted: Literal["yes", "no"]


class LanguageForm(msgspec.Struct, frozen=True):
    locale: Locale
    back: Annotated[str, msgspec.Meta(max_length=200)] = "/portal"


class EraseForm(msgspec.Struct, frozen=True):
    confirm: Literal["erase"] | None = None


def _back_to(path: str) -> str:
    """A portal path to return to after a form (never another site)."""
    return path if path.startswith("/portal") and "//" not in path and "\\" not in path else "/portal"


# --- pages ----------------------------------------------------------------------------------------


class EntryController(Controller):
    path = "/portal"
    opt = {"member_session": False}

    @get("/start/{token:str}", opt={"member_session": False})
    async def start(
        self,
        request: Request[Any, Any, Any],
        services: Svc,
        token: Annotated[str, PathParameter(max_length=200)],
        next_view: Annotated[
            Literal["overview", "card", "rewards", "privacy"], QueryParameter(name="next")
        ] = "overview",
    ) -> Response[Any] | Template:
        """Open a portal link: start the member's session (once per link) and go to the portal
        (with `?next=card`: show the card, for a frame)."""
        grant = await links.redeem(services, token)
        if grant is None:
            raise LinkNotValid("this link was used already or has expired; open the portal again from the shop")
        if next_view == "card":
            # The card is for a frame in the shop's or forum's page, where the browser keeps no
            # SameSite=Lax cookie (another site): it is shown from the link itself and starts no
            # session. Its way into the portal is a link of its own, opened as a page of its own.
            locale = grant.locale or i18n.from_accept_language(request.headers.get("accept-language"))
            member = MemberSession(grant.member_id, locale, grant.return_url)
            return await card_page(request, services, member, await links.reissue(services, grant))
        data = {
            "member_id": grant.member_id,
            "locale": grant.locale,
            "return_url": grant.return_url,
            "started_at": services.clock().timestamp(),
        }
        await sessions.begin(request, request.app.stores.get(SESSION_STORE), data)
        # A CSRF token the browser brought along goes too: the next page sets a new one.
        brought = request.cookies.get(CSRF_COOKIE)
        dropped = [Cookie(key=CSRF_COOKIE, value="", path="/portal", max_age=0)] if brought else None
        return Redirect(_VIEWS[next_view], status_code=303, cookies=dropped)


class PortalController(Controller):
    path = "/portal"
    opt = {"member_session": True}

    @get("/")
    async def overview(self, request: Request[Any, Any, Any], services: Svc) -> Template:
        """The member's points (available, pending by vesting date, held, expiring), tier and rank."""
        member = session_of(request)
        return page(request, "overview.html", await views.overview(services, member.member_id))

    @get("/activity")
    async def activity(
        self,
        request: Request[Any, Any, Any],
        services: Svc,
        cursor: Annotated[str | None, QueryParameter(max_length=100)] = None,
    ) -> Template:
        """The member's history in plain words, newest first, a page at a time."""
        member = session_of(request)
        return page(request, "activity.html", await views.activity(services, member.member_id, cursor))

    @get("/rewards")
    async def rewards(self, request: Request[Any, Any, Any], services: Svc) -> Template:
        """What the member can redeem now, with cost and stock."""
        member = session_of(request)
        return page(request, "rewards.html", await views.rewards(services, member.member_id))

    @get("/rewards/{reward_id:str}")
    async def confirm(
        self, request: Request[Any, Any, Any], services: Svc, reward_id: Annotated[RewardId, PathParameter()]
    ) -> Template:
        """Ask the member to confirm a redemption (the form carries its idempotency key)."""
        member = session_of(request)
        context = await views.reward(services, member.member_id, reward_id)
        if context["reward"] is None:
            raise errors.RewardNotFound("this reward is not available now")
        return page(request, "confirm.html", context | {"redemption_id": f"portal-{secrets.token_hex(16)}"})

    @post("/rewards/{reward_id:str}", status_code=200)
    async def redeem(
        self,
        request: Request[Any, Any, Any],
        services: Svc,
        reward_id: Annotated[RewardId, PathParameter()],
        data: Annotated[RedeemForm, Form],
    ) -> Template:
        """Redeem the reward through the redemption service (the API's), once per confirmation."""
        member = session_of(request)
        order = RedemptionIn(redemption_id=data.redemption_id, reward_id=reward_id)
        try:
            outcome = await redemption.redeem(services, member.member_id, order)
        except (errors.InsufficientPoints, errors.OutOfStock, errors.RewardUnavailable, errors.RewardNotFound) as exc:
            context = await views.reward(services, member.member_id, reward_id)
            return page(
                request,
                "confirm.html",
                context | {"refusal": exc.code, "redemption_id": data.redemption_id},
                status_code=exc.status,
            )
        context = await views.reward(services, member.member_id, reward_id)
        return page(request, "redeemed.html", context | {"redemption": _redemption(outcome.body)})

    @get("/reputation")
    async def reputation(self, request: Request[Any, Any, Any], services: Svc) -> Template:
        """Kudos by kind and source, today's capped total, the rank ladder and the leaderboards."""
        member = session_of(request)
        return page(request, "reputation.html", await views.reputation_page(services, member.member_id))

    @get("/privacy")
    async def privacy_page(self, request: Request[Any, Any, Any], services: Svc) -> Template:
        """Shared preferences and their points, consent per purpose, export and erasure."""
        member = session_of(request)
        return page(request, "privacy.html", await views.privacy(services, member.member_id))

    @post("/privacy/consents")
    async def change_consent(
        self, request: Request[Any, Any, Any], services: Svc, data: Annotated[ConsentForm, Form]
    ) -> Redirect:
        """Grant or withdraw one purpose (recorded as changed by the member portal)."""
        member = session_of(request)
        body = ConsentsIn(purposes={data.purpose: data.granted == "yes"})
        await preferences.change_consents(services, member.member_id, body, PORTAL)
        return Redirect("/portal/privacy#consents", status_code=303)

    @get("/privacy/export")
    async def export(self, request: Request[Any, Any, Any], services: Svc) -> Response[bytes]:
        """Download everything konvert holds on the member, as the API's export (JSON)."""
        member = session_of(request)
        document = await privacy.export(services, member.member_id, PORTAL)
        return Response(
            views.to_json(document),
            media_type="application/json",
            headers={"content-disposition": 'attachment; filename="konvert-export.json"'},
        )

    @post("/privacy/erase", status_code=200)
    async def erase(self, request: Request[Any, Any, Any], services: Svc, data: Annotated[EraseForm, Form]) -> Template:
        """Erase the member's account (the documented erasure), after an explicit confirmation."""
        member = session_of(request)
        if data.confirm != "erase":
            context = await views.privacy(services, member.member_id)
            return page(request, "privacy.html", context | {"erase_unconfirmed": True}, status_code=422)
        await privacy.erase(services, member.member_id, PORTAL)
        response = page(request, "erased.html", {})
        request.clear_session()
        return response

    @post("/language")
    async def language(self, request: Request[Any, Any, Any], data: Annotated[LanguageForm, Form]) -> Redirect:
        """Show the portal in another language for the rest of the session."""
        request.session["locale"] = data.locale
        return Redirect(_back_to(data.back), status_code=303)

    @get("/card")
    async def card(self, request: Request[Any, Any, Any], services: Svc) -> Template:
        """A compact balance, tier and rank card to embed in the program's allowed origins."""
        return await card_page(request, services, session_of(request), "/portal")


async def card_page(
    request: Request[Any, Any, Any], services: Services, member: MemberSession, onward: str
) -> Template:
    """The card, which only pages of the program's portal.frame_ancestors may frame; ``onward``
    is where its link to the portal leads."""
    current = await views.balance(services, member.member_id)
    ancestors = " ".join(services.program.portal.frame_ancestors) or "'none'"
    context = {"balance": current, "onward": onward, **views.standing(services, current)}
    headers = {"content-security-policy": _CSP.format(ancestors=ancestors)}
    return page(request, "card.html", context, headers=headers, session=member)


# --- wiring ---------------------------------------------------------------------------------------


@dataclass
class PortalPages:
    """The portal's routes and what they need from the app: a session store in Redis and the
    CSRF secret, both set up by ``prepare`` in the app's lifespan."""

    settings: Settings
    # The secret is read per request; prepare() puts the deployment's own in before the first.
    csrf: CSRFConfig = field(init=False)
    router: Router = field(init=False)

    def __post_init__(self) -> None:
        settings = self.settings
        self.csrf = CSRFConfig(
            secret=secrets.token_hex(32),
            cookie_name=CSRF_COOKIE,
            cookie_path="/portal",
            cookie_secure=settings.portal_cookie_secure,
            cookie_httponly=True,
            cookie_samesite="lax",
        )
        session_config = ServerSideSessionConfig(
            store=SESSION_STORE,
            key=sessions.COOKIE,
            path="/portal",
            # The cookie's lifetime; Redis keeps a session for the idle timeout after its last use.
            max_age=settings.portal_session_absolute_seconds,
            renew_on_access=True,
            secure=settings.portal_cookie_secure,
            httponly=True,
            samesite="lax",
        )
        static = create_static_files_router(
            path="/portal/static",
            directories=[Path(str(PACKAGE.joinpath("static")))],
            opt={"public": True},
            # Pages link them with a digest of their content (``asset``).
            cache_control=CacheControlHeader(max_age=365 * 24 * 3600, public=True, immutable=True),
            include_in_schema=False,
        )
        pages = Router(
            path="/",
            route_handlers=[EntryController, PortalController],
            middleware=[
                sessions.middleware(session_config, settings.portal_session_idle_seconds),
                DefineMiddleware(CSRFMiddleware, config=self.csrf),
            ],
            guards=[member_session],
            exception_handlers={
                errors.KonvertError: _handle_konvert_error,
                HTTPException: _handle_http_exception,
                RedisError: _handle_unreachable,
                # As specific as the API's handlers of the same errors, which they override here.
                **dict.fromkeys(UNREACHABLE, _handle_unreachable),
            },
            response_headers=[
                ResponseHeader(name="content-security-policy", value=PAGE_CSP),
                ResponseHeader(name="cache-control", value="no-store"),
                ResponseHeader(name="x-content-type-options", value="nosniff"),
                ResponseHeader(name="referrer-policy", value="no-referrer"),
            ],
            include_in_schema=False,
        )
        self.router = Router(path="/", route_handlers=[pages, static], include_in_schema=False)

    async def prepare(self, app: Litestar, services: Services) -> None:
        """Sessions in this deployment's Redis; the CSRF secret every process shares."""
        # A session is one key, read with a one-key script: a Redis Cluster client serves the store
        # as well as the single-server one it is typed for.
        client = cast(Redis, services.redis)
        store = RedisStore(client, namespace=f"{services.settings.redis_key_prefix}:portal:session")
        app.stores.register(SESSION_STORE, store, allow_override=True)
        self.csrf.secret = await shared_secret(services.pool, "csrf")


async def shared_secret(conn: Queryable, name: str) -> str:
    """The deployment's secret called ``name``: made by the first process that asks, then read."""
    await conn.execute(
        "insert into portal_secrets (name, secret) values ($1, $2) on conflict (name) do nothing",
        name,
        secrets.token_hex(32),
    )
    secret: str = await conn.fetchval("select secret from portal_secrets where name = $1", name)
    return secret
