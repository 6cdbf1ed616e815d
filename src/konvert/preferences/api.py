"""Preference and consent routes."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, delete, get, put
from litestar.params import JSONBody, QueryParameter

from konvert.auth import principal_of
from konvert.ledger.api import MemberPath
from konvert.paths import path_parameter
from konvert.preferences import service
from konvert.preferences.model import (
    Catalog,
    ConsentsIn,
    ConsentsOut,
    PreferenceDeleted,
    PreferenceIn,
    PreferenceKey,
    PreferenceList,
    PreferenceOut,
    Purpose,
)
from konvert.services import Svc

KeyPath = Annotated[PreferenceKey, path_parameter(PreferenceKey, "A key of the program's preference catalog.")]


class CatalogController(Controller):
    path = "/v1/preferences"
    tags = ["preferences"]

    @get("/", opt={"scope": "members:read"})
    async def catalog(self, services: Svc) -> Catalog:
        """What members may share: each preference's type, allowed values, the points its first
        share earns, and the purposes it may be used for."""
        return service.catalog(services)


class MemberPreferenceController(Controller):
    path = "/v1/members/{member_id:str}"
    tags = ["preferences"]

    @get(
        "/preferences",
        opt={"scope": "members:read", "problems": ("member_not_found", "purpose_forbidden", "unknown_purpose")},
    )
    async def list_preferences(
        self,
        request: Request[Any, Any, Any],
        member_id: MemberPath,
        services: Svc,
        purpose: Annotated[
            Purpose | None,
            QueryParameter(
                description=(
                    "Only preferences readable for this purpose: the member consented to it for the "
                    "preference and granted it in their consents. Systems other than the member's own "
                    "app must always pass it."
                )
            ),
        ] = None,
    ) -> PreferenceList:
        """The member's shared preferences; with `?purpose=`, only what that purpose may read.

        A key bound to purposes (`konvert keys create --purpose`) reads only what those may: without
        `?purpose=`, what any of them may read; a purpose outside them answers 403
        `purpose_forbidden`."""
        return await service.list_preferences(services, member_id, purpose, principal_of(request))

    @put(
        "/preferences/{key:str}",
        status_code=200,
        opt={
            "scope": "members:write",
            "body": True,
            "idempotency_key": "key",
            "problems": (
                "member_not_found",
                "unknown_preference",
                "invalid_preference_value",
                "purpose_not_allowed",
                "unknown_purpose",
                "conflict",
            ),
        },
    )
    async def share(
        self,
        request: Request[Any, Any, Any],
        member_id: MemberPath,
        key: KeyPath,
        data: JSONBody[PreferenceIn],
        services: Svc,
    ) -> PreferenceOut:
        """Share or change a preference and the purposes it may be used for.

        The value is checked against the catalog (422 `invalid_preference_value` names the key and
        what it allows; 422 `purpose_not_allowed` names the allowed purposes; 404
        `unknown_preference` for a key not in the catalog). The first share of a key, ever, earns
        the catalog's points; changes, and deleting and sharing again, earn nothing more. PUT is
        naturally idempotent: the same request again changes nothing.
        """
        return await service.share(services, member_id, key, data, principal_of(request))

    @delete(
        "/preferences/{key:str}",
        status_code=200,
        opt={
            "scope": "members:write",
            "idempotency_key": "key",
            "problems": ("member_not_found", "unknown_preference"),
        },
    )
    async def withdraw(
        self, request: Request[Any, Any, Any], member_id: MemberPath, key: KeyPath, services: Svc
    ) -> PreferenceDeleted:
        """Delete a shared preference. Earned points stay unless the program sets
        `claw_back_on_withdrawal`. Deleting what is not shared changes nothing."""
        return await service.withdraw(services, member_id, key, principal_of(request))

    @get("/consents", opt={"scope": "members:read", "problems": ("member_not_found",)})
    async def consents(self, member_id: MemberPath, services: Svc) -> ConsentsOut:
        """The member's consent per purpose: granted or not, when it last changed and through
        which client. A purpose the member never granted is not granted."""
        return await service.consents(services, member_id)

    @put(
        "/consents",
        status_code=200,
        opt={
            "scope": "members:write",
            "body": True,
            "idempotency_key": "member_id",
            "problems": ("member_not_found", "unknown_purpose", "conflict"),
        },
    )
    async def change_consents(
        self, request: Request[Any, Any, Any], member_id: MemberPath, data: JSONBody[ConsentsIn], services: Svc
    ) -> ConsentsOut:
        """Grant (`true`) or withdraw (`false`) purposes, e.g. `{"purposes": {"marketing": false}}`.

        Takes effect at once: a withdrawn purpose no longer reads any of the member's preferences.
        Purposes not named keep their state; every change is recorded in the privacy log.
        """
        return await service.change_consents(services, member_id, data, principal_of(request))


ROUTES: list[Any] = [CatalogController, MemberPreferenceController]
