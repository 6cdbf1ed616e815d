"""The member portal in a real browser: Debian's Chromium, driven by Playwright.

The app is served by uvicorn on a loopback port, on a database of its own (its program seeds
rewards the shared database must not get). JavaScript is off in the browser for every flow: the
portal is forms and links. It is on only where axe-core runs in the page.

The pages that embed the card are served by small servers of the test's own on loopback ports,
named ``localhost`` so that they are another site than konvert's ``127.0.0.1`` (and the browser
lets a loopback page frame a loopback address).

Screenshots go to the test's temporary directory, or, with KONVERT_TEST_SCREENSHOTS_DIR set, to
that directory (the README's pictures: see "The member portal" there).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import html
import os
import re
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

import asyncpg
import httpx
import pytest
import redis.asyncio as redis
import uvicorn
from babel.dates import format_date
from litestar.stores.redis import RedisStore

from konvert import auth
from konvert.app import create_app
from konvert.portal.pages import SESSION_STORE
from konvert.problems import RETRY_AFTER_SECONDS
from konvert.program import parse_program
from tests.conftest import RUN_ID, AppClient, _create_database, _drop_database, make_settings, serve
from tests.portal_support import portal_program_text

CHROMIUM = "/usr/bin/chromium"
NOW = datetime.now(UTC)
SETTLED = (NOW - timedelta(days=30)).isoformat()
RECENT = (NOW - timedelta(hours=1)).isoformat()
PAGES = ["/portal", "/portal/activity", "/portal/rewards", "/portal/reputation", "/portal/privacy"]

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="needs Debian's chromium (.ci/run installs it: apt-get install chromium)"
)


@dataclass
class Portal:
    client: AppClient
    headers: dict[str, str]
    redis_url: str

    async def api(self, method: str, path: str, body: dict[str, Any] | None = None, expect: int = 200) -> Any:
        response = await self.client.request(method, path, json=body, headers=self.headers)
        assert response.status_code == expect, response.text
        return response.json() if response.content else None

    async def purchase(self, member_id: str, euros: int, occurred_at: str = SETTLED) -> dict[str, Any]:
        line = {"line_id": "1", "sku": "S", "category": "outdoor", "quantity": 1, "unit_price": euros * 100}
        body = {
            "purchase_id": f"p-{uuid.uuid4().hex[:10]}",
            "member_id": member_id,
            "partner": "webshop",
            "currency": "EUR",
            "occurred_at": occurred_at,
            "lines": [line],
        }
        return await self.api("POST", "/v1/purchases", body, expect=201)

    async def link(self, member_id: str, **body: Any) -> str:
        made = await self.api("POST", f"/v1/members/{member_id}/portal-sessions", body, expect=201)
        url: str = made["url"]
        return url

    def url(self, path: str) -> str:
        return str(self.client.base_url).rstrip("/") + path

    async def balance(self, member_id: str) -> dict[str, Any]:
        balance: dict[str, Any] = await self.api("GET", f"/v1/members/{member_id}/balance")
        return balance


@dataclass
class Site:
    """A shop's or forum's page that frames what ``?src=`` names."""

    origin: str


async def _embedding_page(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    src = html.escape(parse_qs(scope["query_string"].decode()).get("src", [""])[0])
    body = (
        '<!doctype html><html lang="en"><head><title>Shop</title></head><body><h1>Shop</h1>'
        f'<iframe title="Your points" src="{src}" width="400" height="260"></iframe></body></html>'
    ).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/html")]})
    await send({"type": "http.response.body", "body": body})


@contextlib.asynccontextmanager
async def _site() -> AsyncIterator[Site]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(_embedding_page, lifespan="off", log_config=None, access_log=False))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()  # start-up failed: raise its error here
            await asyncio.sleep(0.01)
        yield Site(f"http://localhost:{sock.getsockname()[1]}")
    finally:
        server.should_exit = True
        await task
        sock.close()


@pytest.fixture(scope="module")
async def sites() -> AsyncIterator[tuple[Site, Site]]:
    """A site the program lets frame the card, and one it does not."""
    async with _site() as allowed, _site() as blocked:
        yield allowed, blocked


@pytest.fixture(scope="module")
async def database_for_portal(server_database_url: str, template_database: str) -> AsyncIterator[str]:
    """A database of the module's own: the portal's program seeds rewards no other test expects."""
    name = f"konvert_portal_{RUN_ID}_{uuid.uuid4().hex[:6]}"
    yield await _create_database(server_database_url, name, template_database)
    await _drop_database(server_database_url, name)


@pytest.fixture(scope="module")
async def portal(
    database_for_portal: str, redis_url: str, redis_client: Any, sites: tuple[Site, Site]
) -> AsyncIterator[Portal]:
    conn = await asyncpg.connect(database_for_portal)
    try:
        key, _ = await auth.insert_key(conn, "shop backend", ["admin"])
    finally:
        await conn.close()
    settings = make_settings(database_for_portal, redis_url, portal_cookie_secure=False)
    program = parse_program(portal_program_text(sites[0].origin), "portal test program")
    async with serve(create_app(settings, program)) as client:
        yield Portal(client, {"Authorization": f"Bearer {key}"}, redis_url)


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM)
        yield launched
        await launched.close()


@pytest.fixture
async def context(browser: Any) -> AsyncIterator[Any]:
    """A browser profile of its own (no cookies from other tests), JavaScript off, English."""
    opened = await browser.new_context(
        java_script_enabled=False, locale="en-GB", viewport={"width": 1000, "height": 900}
    )
    yield opened
    await opened.close()


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    directory = Path(os.environ.get("KONVERT_TEST_SCREENSHOTS_DIR") or tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def digits(text: str) -> int:
    """A figure as the page shows it ("1,151", "1.151", or with a minus sign) as a number."""
    sign = -1 if text.strip().startswith(("-", "\u2212")) else 1
    return sign * int(re.sub(r"\D", "", text))


async def figure(page: Any, name: str) -> str:
    text: str = await page.locator(f"[data-figure={name}]").first.text_content()
    return text.strip()


async def a_member(portal: Portal, euros: int = 1000, pending_euros: int = 0) -> str:
    member_id = f"member-{uuid.uuid4().hex[:10]}"
    await portal.purchase(member_id, euros)
    if pending_euros:
        await portal.purchase(member_id, pending_euros, occurred_at=RECENT)
    return member_id


# --- entering ------------------------------------------------------------------------------------


async def test_the_overview_shows_every_figure_the_api_gives(portal: Portal, context: Any, screenshots: Path) -> None:
    member_id = await a_member(portal, euros=500, pending_euros=151)
    giver = await a_member(portal, euros=1)
    kudos = {
        "kudos_id": f"k-{uuid.uuid4().hex[:10]}",
        "source": "forum",
        "post_id": "post-1",
        "thread_id": "thread-1",
        "author_id": member_id,
        "giver_id": giver,
        "kind": "accepted_answer",
        "occurred_at": RECENT,
    }
    await portal.api("POST", "/v1/kudos", kudos, expect=201)
    balance = await portal.balance(member_id)
    reputation = await portal.api("GET", f"/v1/members/{member_id}/reputation")
    page = await context.new_page()

    response = await page.goto(await portal.link(member_id, return_url="https://shop.example.com/account"))

    assert response.status == 200 and page.url.endswith("/portal")
    assert await page.locator("h1").text_content() == "Your points"
    assert digits(await figure(page, "available")) == balance["available"] == 500
    assert digits(await figure(page, "pending")) == balance["pending"] == 151
    assert digits(await figure(page, "held")) == balance["held"] == 0
    assert digits(await figure(page, "reputation")) == balance["reputation"] == reputation["reputation"] == 15
    assert await figure(page, "tier") == balance["tier"]["name"]
    assert digits(await figure(page, "points-to-next-tier")) == balance["tier"]["points_to_next_tier"]
    assert await figure(page, "rank") == reputation["rank"]
    vesting = await page.locator("[data-vesting] td").all_text_contents()
    # The pending purchase happened at RECENT, and vests 14 days later.
    assert digits(vesting[0]) == 151 and vesting[1] == format_date(
        datetime.fromisoformat(RECENT) + timedelta(days=14), "medium", locale="en"
    )
    assert [
        (lot["points"], format_date(datetime.fromisoformat(lot["vests_at"]), "medium", locale="en"))
        for lot in balance["vesting"]
    ] == [(151, vesting[1])]
    expiring = await page.locator("[data-expiring] td").all_text_contents()
    shown = [(digits(expiring[i]), expiring[i + 1]) for i in range(0, len(expiring), 2)]
    assert shown == [
        (lot["points"], format_date(datetime.fromisoformat(lot["expires_at"]), "medium", locale="en"))
        for lot in balance["expiring"]
    ]
    assert await page.get_attribute("a.back", "href") == "https://shop.example.com/account"
    await page.screenshot(path=screenshots / "portal-overview.png", full_page=True)


async def test_a_used_or_expired_link_shows_a_friendly_401_page(portal: Portal, browser: Any) -> None:
    member_id = await a_member(portal)
    link = await portal.link(member_id)
    first = await browser.new_context(java_script_enabled=False)
    second = await browser.new_context(java_script_enabled=False)
    try:
        opened = await (await first.new_page()).goto(link)
        page = await second.new_page()
        again = await page.goto(link)
        again_text = await again.text()
        made_up = await (await second.new_page()).goto(link.rsplit("/", 1)[0] + "/" + "x" * 43)
        made_up_text = await made_up.text()
    finally:
        await first.close()
        await second.close()

    assert opened.status == 200
    assert again.status == 401 and made_up.status == 401
    assert again_text == made_up_text
    assert "This link cannot be used" in again_text
    assert "Traceback" not in again_text


async def test_opening_a_link_starts_a_new_session_whatever_cookie_the_browser_brought(
    portal: Portal, context: Any, redis_client: Any
) -> None:
    victim, attacker = await a_member(portal, euros=300), await a_member(portal, euros=700)
    # The attacker's own live session (and CSRF token), and an id no session ever had, planted in
    # the victim's browser.
    async with httpx.AsyncClient() as theirs:
        await theirs.get(await portal.link(attacker))
        planted, planted_csrf = theirs.cookies["konvert_portal"], theirs.cookies["konvert_csrf"]
    for brought in (planted, "f" * 64):
        await context.clear_cookies()
        await context.add_cookies(
            [
                {"name": name, "value": value, "domain": "127.0.0.1", "path": "/portal"}
                for name, value in (("konvert_portal", brought), ("konvert_csrf", planted_csrf))
            ]
        )
        page = await context.new_page()

        await page.goto(await portal.link(victim))

        assert digits(await figure(page, "available")) == 300
        cookies = {c["name"]: c["value"] for c in await context.cookies(portal.url("/portal"))}
        assert cookies["konvert_portal"] != brought
        assert cookies["konvert_csrf"] != planted_csrf
        async with httpx.AsyncClient(base_url=portal.url(""), cookies={"konvert_portal": brought}) as planter:
            seen = await planter.get("/portal")
        assert seen.status_code == 401 and "portal_session_ended" in seen.text
        prefix = portal.client.app.state.services.settings.redis_key_prefix
        assert await redis_client.exists(f"{prefix}:portal:session:{brought}") == 0
        await page.close()


async def test_a_page_renews_the_session_without_storing_it_again(portal: Portal, redis_client: Any) -> None:
    member_id = await a_member(portal)
    settings = portal.client.app.state.services.settings
    async with httpx.AsyncClient(base_url=portal.url("")) as member:
        await member.get(await portal.link(member_id))
        key = f"{settings.redis_key_prefix}:portal:session:{member.cookies['konvert_portal']}"
        await redis_client.expire(key, 60)

        shown = await member.get("/portal")
        renewed_ttl = await redis_client.ttl(key)
        token = re.search(r'name="_csrf_token" value="([^"]+)"', shown.text)
        assert token is not None
        switched = await member.post(
            "/portal/language", data={"_csrf_token": token.group(1), "locale": "de", "back": "/portal"}
        )
        german = await member.get("/portal")

    assert shown.status_code == 200 and "konvert_portal" not in shown.headers.get("set-cookie", "")
    assert settings.portal_session_idle_seconds - 5 <= renewed_ttl <= settings.portal_session_idle_seconds
    # A change is stored, under the same id.
    assert switched.status_code == 303 and "konvert_portal=" in switched.headers["set-cookie"]
    assert german.status_code == 200 and "Ihre Punkte" in german.text


async def test_a_session_sees_only_its_own_member(portal: Portal, context: Any) -> None:
    mine, other = await a_member(portal, euros=300), await a_member(portal, euros=700)
    page = await context.new_page()
    await page.goto(await portal.link(mine))

    await page.goto(portal.url(f"/portal?member_id={other}"))
    assert digits(await figure(page, "available")) == 300
    # A form that names another member changes the session's member, never that one.
    await page.goto(portal.url("/portal/privacy"))
    token = await page.locator("input[name=_csrf_token]").first.get_attribute("value")
    sent = await page.request.post(
        portal.url("/portal/privacy/consents"),
        form={"_csrf_token": token, "purpose": "marketing", "granted": "yes", "member_id": other},
    )
    assert sent.ok
    assert (await portal.api("GET", f"/v1/members/{mine}/consents"))["purposes"]["marketing"]["granted"] is True
    assert (await portal.api("GET", f"/v1/members/{other}/consents"))["purposes"]["marketing"]["granted"] is False
    # The session's cookie is no key to the API.
    api = await page.request.get(portal.url(f"/v1/members/{other}/balance"))
    assert api.status == 401


async def test_a_form_without_its_csrf_token_is_refused_and_changes_nothing(portal: Portal, context: Any) -> None:
    member_id = await a_member(portal)
    page = await context.new_page()
    await page.goto(await portal.link(member_id))

    refused = await page.request.post(
        portal.url("/portal/privacy/consents"),
        form={"purpose": "marketing", "granted": "yes"},
    )

    assert refused.status == 403
    assert "The form was too old" in await refused.text()
    assert (await portal.api("GET", f"/v1/members/{member_id}/consents"))["purposes"]["marketing"]["granted"] is False


# --- rewards -------------------------------------------------------------------------------------


async def test_redeeming_a_reward_asks_first_then_shows_the_lower_balance(portal: Portal, context: Any) -> None:
    member_id = await a_member(portal, euros=1000)
    page = await context.new_page()
    await page.goto(await portal.link(member_id))
    await page.click("text=Rewards")

    await page.click("text=Redeem Free coffee")
    assert await page.locator("h1").text_content() == "Confirm your redemption"
    assert (await portal.balance(member_id))["available"] == 1000  # asking changed nothing
    await page.click("text=Yes, redeem")

    assert await page.locator("h1").text_content() == "Redeemed"
    assert digits(await figure(page, "available")) == 850
    assert (await portal.balance(member_id))["available"] == 850


async def test_sending_the_confirmation_twice_redeems_once(portal: Portal, context: Any) -> None:
    member_id = await a_member(portal, euros=1000)
    page = await context.new_page()
    await page.goto(await portal.link(member_id))
    await page.goto(portal.url("/portal/rewards/coffee"))
    form = {
        name: await page.locator(f"form[action='/portal/rewards/coffee'] input[name={name}]").get_attribute("value")
        for name in ("_csrf_token", "redemption_id")
    }

    url = portal.url("/portal/rewards/coffee")
    first, second = await page.request.post(url, form=form), await page.request.post(url, form=form)

    assert first.status == second.status == 200
    assert "Your new balance: 850 points." in await second.text()
    assert (await portal.balance(member_id))["available"] == 850
    redemptions = await portal.api("GET", f"/v1/members/{member_id}/redemptions")
    assert [r["redemption_id"] for r in redemptions["items"]] == [form["redemption_id"]]


async def test_not_enough_points_says_why_and_spends_nothing(portal: Portal, context: Any) -> None:
    member_id = await a_member(portal, euros=100)
    page = await context.new_page()
    await page.goto(await portal.link(member_id))
    await page.click("text=Rewards")
    assert await page.locator("[data-reward=coffee] .note").text_content() == "You need 50 more points."

    await page.goto(portal.url("/portal/rewards/coffee"))
    async with page.expect_response(lambda r: r.request.method == "POST") as answer:
        await page.click("text=Yes, redeem")
    response = await answer.value
    response_text = await page.locator("[role=alert]").text_content()

    assert response.status == 409
    assert "You do not have enough points for this reward." in response_text
    assert (await portal.balance(member_id))["available"] == 100


# --- privacy -------------------------------------------------------------------------------------


async def test_granting_and_withdrawing_consent_in_the_portal(portal: Portal, context: Any) -> None:
    member_id = await a_member(portal)
    page = await context.new_page()
    await page.goto(await portal.link(member_id))
    await page.click("text=Privacy")

    await page.click("text=Allow marketing")
    assert await page.locator("[data-purpose=marketing] [data-consent]").text_content() == "allowed"
    granted = (await portal.api("GET", f"/v1/members/{member_id}/consents"))["purposes"]["marketing"]
    assert granted["granted"] is True and granted["changed_by"] == "member portal"

    await page.click("text=Withdraw consent for marketing")
    assert await page.locator("[data-purpose=marketing] [data-consent]").text_content() == "not allowed"
    assert (await portal.api("GET", f"/v1/members/{member_id}/consents"))["purposes"]["marketing"]["granted"] is False


async def test_the_export_downloads_the_members_data(portal: Portal, context: Any) -> None:
    member_id = await a_member(portal)
    page = await context.new_page()
    await page.goto(await portal.link(member_id))
    await page.click("text=Privacy")

    async with page.expect_download() as download_info:
        await page.click("text=Download everything we hold about you (JSON)")
    download = await download_info.value
    exported = Path(await download.path()).read_text("utf-8")  # noqa: ASYNC240 (a small file the test wrote)

    assert download.suggested_filename == "konvert-export.json"
    assert f'"member_id":"{member_id}"' in exported


async def test_erasing_the_account_needs_the_box_ticked_and_then_ends_the_session(portal: Portal, context: Any) -> None:
    member_id = await a_member(portal)
    page = await context.new_page()
    await page.goto(await portal.link(member_id))
    await page.click("text=Privacy")

    await page.click("text=Erase my account")
    assert "Tick the box" in await page.locator("[role=alert]").text_content()
    await portal.api("GET", f"/v1/members/{member_id}/balance")  # still there
    await page.check("#erase-confirm")
    await page.click("text=Erase my account")

    assert await page.locator("h1").text_content() == "Account erased"
    await portal.api("GET", f"/v1/members/{member_id}/balance", expect=404)
    after = await page.goto(portal.url("/portal"))
    assert after.status == 401


# --- languages -----------------------------------------------------------------------------------


async def test_switching_to_german_formats_numbers_and_dates_the_german_way(portal: Portal, context: Any) -> None:
    member_id = await a_member(portal, euros=1234)
    page = await context.new_page()
    await page.goto(await portal.link(member_id))
    assert await figure(page, "available") == "1,234"

    await page.select_option("#language-select", "de")
    await page.click("text=Change")

    assert await page.get_attribute("html", "lang") == "de"
    assert await page.locator("h1").text_content() == "Ihre Punkte"
    assert await figure(page, "available") == "1.234"
    expiry = (await portal.balance(member_id))["expiring"][0]["expires_at"]
    shown = await page.locator("[data-expiring] td").nth(1).text_content()
    assert shown == format_date(datetime.fromisoformat(expiry), "medium", locale="de")
    assert re.fullmatch(r"\d\d\.\d\d\.\d{4}", shown)


async def test_the_browsers_language_or_the_links_locale_chooses_the_language(portal: Portal, browser: Any) -> None:
    member_id = await a_member(portal)
    german_browser = await browser.new_context(java_script_enabled=False, locale="de-DE")
    english_browser = await browser.new_context(java_script_enabled=False, locale="en-US")
    try:
        page = await german_browser.new_page()
        await page.goto(await portal.link(member_id))
        by_browser = await page.locator("h1").text_content()
        page = await english_browser.new_page()
        await page.goto(await portal.link(member_id, locale="de"))
        by_link = await page.locator("h1").text_content()
    finally:
        await german_browser.close()
        await english_browser.close()

    assert by_browser == by_link == "Ihre Punkte"


# --- the card ------------------------------------------------------------------------------------


async def _embedding(context: Any, site: Site, link: str) -> Any:
    """A page of ``site`` that frames the card, opened by ``link``."""
    page = await context.new_page()
    await page.goto(f"{site.origin}/account?src={quote(link + '?next=card')}")
    return page


async def test_the_card_shows_in_a_page_of_an_allowed_origin(
    portal: Portal, context: Any, sites: tuple[Site, Site], screenshots: Path
) -> None:
    member_id = await a_member(portal, euros=1151)

    page = await _embedding(context, sites[0], await portal.link(member_id))

    card = page.frame_locator("iframe")
    assert digits(await card.locator("[data-figure=available]").text_content()) == 1151
    assert await card.locator("[data-figure=tier]").text_content() == "Silver"
    await page.locator("iframe").screenshot(path=screenshots / "portal-card.png")
    # The card started no session: a frame of another site would get no SameSite=Lax cookie back.
    assert "konvert_portal" not in {c["name"] for c in await context.cookies(portal.url("/portal"))}
    # Its link into the portal is a link of its own, opened as a page of its own.
    async with context.expect_page() as opening:
        await card.locator("text=Open your portal").click()
    portal_page = await opening.value
    await portal_page.wait_for_load_state()
    assert portal_page.url == portal.url("/portal")
    assert digits(await figure(portal_page, "available")) == 1151


async def test_the_card_refuses_to_show_in_a_page_of_another_origin(
    portal: Portal, context: Any, sites: tuple[Site, Site]
) -> None:
    member_id = await a_member(portal, euros=1151)
    answers: list[Any] = []
    context.on("response", lambda r: answers.append(r) if r.url.startswith(portal.url("/portal/start/")) else None)

    page = await _embedding(context, sites[1], await portal.link(member_id))

    assert [a.status for a in answers] == [200]  # konvert answered; the browser would not show it
    assert await page.frame_locator("iframe").locator("[data-figure=available]").count() == 0
    shown = [await frame.content() for frame in page.frames[1:]]
    assert shown and not any("data-figure" in content for content in shown)
    assert f"frame-ancestors {sites[0].origin}" in (await answers[0].all_headers())["content-security-policy"]
    assert "konvert_portal" not in {c["name"] for c in await context.cookies(portal.url("/portal"))}


# --- accessibility -------------------------------------------------------------------------------


async def test_no_page_has_serious_or_critical_accessibility_violations(portal: Portal, browser: Any) -> None:
    from axe_playwright_python.async_playwright import Axe

    member_id = await a_member(portal, euros=1000, pending_euros=50)
    context = await browser.new_context(locale="en-GB", viewport={"width": 320, "height": 800})
    found: dict[str, list[str]] = {}
    try:
        page = await context.new_page()
        await page.goto(await portal.link(member_id))
        base = str(portal.client.base_url).rstrip("/")
        for path in [*PAGES, "/portal/rewards/coffee", "/portal/card"]:
            await page.goto(base + path)
            await _audit(Axe(), page, path, found)
        await page.goto(base + "/portal/rewards/coffee")
        await page.click("text=Yes, redeem")
        await _audit(Axe(), page, "redeemed", found)
        await page.goto(base + "/portal/start/" + "x" * 43)
        await _audit(Axe(), page, "error", found)
        # No horizontal scrolling at 320 px.
        await page.goto(base + "/portal")
        assert await page.evaluate("document.documentElement.scrollWidth") <= 320
    finally:
        await context.close()

    assert found == {}


async def _audit(axe: Any, page: Any, name: str, found: dict[str, list[str]]) -> None:
    results = await axe.run(page)
    serious = [
        f"{v['id']} ({v['impact']}): {v['help']}"
        for v in results.response["violations"]
        if v["impact"] in ("serious", "critical")
    ]
    if serious:
        found[name] = serious


# --- the API's side ------------------------------------------------------------------------------


async def test_a_return_url_off_the_allowed_origins_is_refused(portal: Portal) -> None:
    member_id = await a_member(portal)

    response = await portal.client.post(
        f"/v1/members/{member_id}/portal-sessions",
        json={"return_url": "https://evil.example.net/phish"},
        headers=portal.headers,
    )

    assert response.status_code == 422
    assert response.json()["code"] == "validation_failed"


async def test_a_link_for_no_member_is_404(portal: Portal) -> None:
    response = await portal.client.post("/v1/members/nobody-at-all/portal-sessions", json={}, headers=portal.headers)

    assert response.status_code == 404 and response.json()["code"] == "member_not_found"


async def test_the_session_cookie_is_http_only_and_same_site_lax(portal: Portal) -> None:
    member_id = await a_member(portal)
    link = await portal.link(member_id)

    async with httpx.AsyncClient() as client:
        response = await client.get(link)

    cookies = {c.split("=", 1)[0]: c for c in response.headers.get_list("set-cookie")}
    assert response.status_code == 303 and response.headers["location"] == "/portal"
    for name in ("konvert_portal", "konvert_csrf"):
        attributes = cookies[name].lower()
        assert "httponly" in attributes and "samesite=lax" in attributes and "path=/portal" in attributes


async def test_the_session_cookie_is_secure_unless_configured_otherwise(
    portal: Portal, database_for_portal: str
) -> None:
    member_id = await a_member(portal)
    settings = make_settings(database_for_portal, portal.redis_url)  # portal_cookie_secure: the default
    program = parse_program(portal_program_text(), "portal test program")
    async with serve(create_app(settings, program)) as secure_app:
        made = await secure_app.post(f"/v1/members/{member_id}/portal-sessions", json={}, headers=portal.headers)
        response = await secure_app.get(made.json()["url"])

    cookies = [c.lower() for c in response.headers.get_list("set-cookie")]
    assert len(cookies) == 2 and all("; secure" in c for c in cookies)


async def test_the_session_ends_after_the_absolute_timeout(portal: Portal) -> None:
    member_id = await a_member(portal)
    services = portal.client.app.state.services
    async with httpx.AsyncClient(base_url=portal.url(""), cookies=httpx.Cookies()) as member:
        assert (await member.get(await portal.link(member_id))).status_code == 303
        assert (await member.get("/portal")).status_code == 200
        original = services.clock
        absolute = services.settings.portal_session_absolute_seconds
        services.clock = lambda: original() + timedelta(seconds=absolute + 1)
        try:
            ended = await member.get("/portal")
        finally:
            services.clock = original
        after = await member.get("/portal")

    assert ended.status_code == 401 and "portal_session_ended" in ended.text
    assert after.status_code == 401  # the session was cleared, not only refused once


async def test_the_stylesheet_is_linked_by_its_digest_and_kept_for_a_year(portal: Portal) -> None:
    member_id = await a_member(portal)
    async with httpx.AsyncClient(base_url=portal.url("")) as member:
        await member.get(await portal.link(member_id))
        shown = await member.get("/portal")
        linked = re.search(r'<link rel="stylesheet" href="([^"]+)"', shown.text)
        assert linked is not None
        sheet = await member.get(html.unescape(linked.group(1)))

    digest = hashlib.sha256(sheet.content).hexdigest()[:12]
    assert linked.group(1) == f"/portal/static/portal.css?v={digest}"
    assert sheet.status_code == 200 and sheet.headers["content-type"].startswith("text/css")
    directives = {d.strip() for d in sheet.headers["cache-control"].split(",")}
    assert {"public", "immutable", "max-age=31536000"} <= directives


async def test_redis_forgets_a_session_after_the_idle_timeout(portal: Portal, redis_client: Any) -> None:
    member_id = await a_member(portal)
    settings = portal.client.app.state.services.settings
    async with httpx.AsyncClient(base_url=portal.url("")) as member:
        await member.get(await portal.link(member_id))
        session_id = member.cookies["konvert_portal"]
        await member.get("/portal")

    ttl = await redis_client.ttl(f"{settings.redis_key_prefix}:portal:session:{session_id}")

    assert settings.portal_session_idle_seconds - 5 <= ttl <= settings.portal_session_idle_seconds


async def test_without_redis_the_portal_answers_503_with_retry_after(portal: Portal) -> None:
    member_id = await a_member(portal)
    link = await portal.link(member_id)
    app = portal.client.app
    working = app.stores.get(SESSION_STORE)
    # A Redis nobody listens on: port 1 on loopback refuses every connection.
    gone = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    async with httpx.AsyncClient(base_url=portal.url("")) as member:
        assert (await member.get(link)).status_code == 303
        app.stores.register(SESSION_STORE, RedisStore(gone, namespace="gone"), allow_override=True)
        try:
            down = await member.get("/portal")
        finally:
            app.stores.register(SESSION_STORE, working, allow_override=True)
            await gone.aclose()
        back = await member.get("/portal")

    assert down.status_code == 503 and down.headers["retry-after"] == str(RETRY_AFTER_SECONDS)
    assert down.headers["content-type"].startswith("text/html")
    assert "The portal is unavailable for a moment" in down.text
    assert back.status_code == 200


async def test_activity_says_what_happened_in_plain_words(portal: Portal, context: Any) -> None:
    member_id = f"member-{uuid.uuid4().hex[:10]}"
    bought = await portal.purchase(member_id, 1000)
    redemption = {"redemption_id": f"r-{uuid.uuid4().hex[:10]}", "reward_id": "coffee"}
    await portal.api("POST", f"/v1/members/{member_id}/redemptions", redemption, expect=201)
    page = await context.new_page()
    await page.goto(await portal.link(member_id))

    await page.click("text=Activity")

    lines = [" ".join(text.split()) for text in await page.locator("tbody tr").all_text_contents()]
    assert len(lines) == 2
    assert "Redeemed: reward coffee" in lines[0] and "\u2212150 points" in lines[0]
    assert f"Purchase {bought['purchase_id']} at webshop" in lines[1] and "+1,000 points" in lines[1]
