"""What konvert is made of, in one place: every feature's routes, background jobs, audit checks,
part in erasing a member, and per-process start-up. konvert.app builds the HTTP service from
this, konvert.cli its commands; adding a feature means adding it here.

The features (earning, redemption, reputation, preferences) import nothing from one another and
the ledger core imports no feature: where one concern crosses them, it is wired here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from konvert import health
from konvert.earning import api as earning_api
from konvert.earning import audit as earning_audit
from konvert.earning import privacy as earning_privacy
from konvert.events import api as events_api
from konvert.events import audit as events_audit
from konvert.events import openapi as events_openapi
from konvert.events import publisher as events_publisher
from konvert.integrations import api as integrations_api
from konvert.integrations import privacy as integrations_privacy
from konvert.integrations import service as integrations
from konvert.ledger import adjustments
from konvert.ledger import api as ledger_api
from konvert.ledger import audit as ledger_audit
from konvert.ledger import jobs as ledger_jobs
from konvert.ledger.accounts import ADJUSTMENTS, EXPIRED, REDEEMED, SystemAccount, SystemAccounts, issued
from konvert.portal import api as portal_api
from konvert.portal.pages import TEMPLATES, PortalPages
from konvert.preferences import api as preferences_api
from konvert.preferences import audit as preferences_audit
from konvert.preferences import privacy as preferences_privacy
from konvert.preferences.service import SYSTEM_ACCOUNT as PREFERENCES_ACCOUNT
from konvert.privacy import api as privacy_api
from konvert.program import Program
from konvert.redemption import api as redemption_api
from konvert.redemption import audit as redemption_audit
from konvert.redemption import privacy as redemption_privacy
from konvert.redemption import service as redemption
from konvert.reputation import api as reputation_api
from konvert.reputation import audit as reputation_audit
from konvert.reputation import privacy as reputation_privacy
from konvert.reputation.credits import BRIDGE_ACCOUNT
from konvert.services import Erasure, Services
from konvert.settings import Settings
from konvert.tiers import service as tiers

ROUTES: list[Any] = [
    *health.ROUTES,
    *ledger_api.ROUTES,
    *earning_api.ROUTES,
    *redemption_api.ROUTES,
    *reputation_api.ROUTES,
    *preferences_api.ROUTES,
    *privacy_api.ROUTES,
    *integrations_api.ROUTES,
    *events_api.ROUTES,
    *portal_api.ROUTES,
]

# The events konvert sends, as OpenAPI webhooks.
OPENAPI_WEBHOOKS = events_openapi.WEBHOOKS

# The member portal's pages, their templates and static files (under /portal).
PAGE_TEMPLATES = TEMPLATES


def pages(settings: Settings) -> PortalPages:
    return PortalPages(settings)


# Run in this order by every service process and by `konvert jobs run`, each in bounded batches;
# each result counts the rows worked.
JOBS: dict[str, Callable[[Services], Awaitable[int]]] = {
    "vested_lots": ledger_jobs.vest_due_lots,
    "released_holds": redemption.release_timed_out_holds,
    "expired_lots": ledger_jobs.expire_due_lots,
    "tiers_reevaluated": tiers.reevaluate_due,
    "parked_deliveries_dropped": integrations.drop_expired_parked,
    "expiring_soon_announced": ledger_jobs.announce_expiring_lots,
    "events_pruned": events_publisher.prune,
}

AUDIT_CHECKS = (
    *ledger_audit.CHECKS,
    *earning_audit.CHECKS,
    *redemption_audit.CHECKS,
    *reputation_audit.CHECKS,
    *preferences_audit.CHECKS,
    *events_audit.CHECKS,
)

ERASURE = Erasure(
    steps=(
        adjustments.forget,
        earning_privacy.forget,
        redemption_privacy.forget,
        reputation_privacy.forget,
        preferences_privacy.forget,
        integrations_privacy.forget,
    ),
    after=(reputation_privacy.rebuild_leaderboards,),
)


def system_accounts(program: Program) -> list[SystemAccount]:
    """The system accounts this program's writes use (kudos sources are created as they come)."""
    return [issued(partner.id) for partner in program.partners] + [
        REDEEMED,
        EXPIRED,
        ADJUSTMENTS,
        PREFERENCES_ACCOUNT,
        BRIDGE_ACCOUNT,
    ]


async def open_services(settings: Settings, program: Program) -> Services:
    """A process's Services, with every feature wired in."""
    return await Services.open(settings, program, ERASURE)


async def publish_events(services: Services) -> None:
    """A service process's event publisher (konvert.events), until cancelled."""
    await events_publisher.run_forever(services)


async def prepare(services: Services) -> None:
    """What a serving process does before its first request: the program's rewards in the catalog,
    its system accounts created."""
    await redemption.seed_rewards(services)
    await services.shared(SystemAccounts).create(services.pool, system_accounts(services.program))
