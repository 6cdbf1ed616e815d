"""Preferences for points, consent, export and erasure against real PostgreSQL and Redis.

The test program's catalog (conftest.TEST_PROGRAM): favourite_categories (multi_choice, 50
points, personalisation/marketing), clothing_size (choice S/M/L, 20, personalisation/support),
birthday (month_day, 30, personalisation/marketing), newsletter (boolean, 0, marketing),
delivery_notes (text up to 40, 10, support).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from litestar.testing import AsyncTestClient

from konvert import auth, composition
from konvert.app import create_app
from konvert.cache import ABOVE_ANY_VERSION
from konvert.ledger.audit import run_audit
from konvert.ledger.book import Book
from konvert.ledger.book import Member as LockedMember
from konvert.program import parse_program
from konvert.services import Erasure, Services
from tests.conftest import TEST_PROGRAM, cached_entry, make_settings, purchase_body
from tests.integration.test_purchases import RECENT, line, purchase

ALL = ("personalisation", "marketing", "support")


class Api:
    """The member portal (a members:read + members:write key named "member-portal") and an admin."""

    def __init__(self, client: AsyncTestClient, member_headers: dict[str, str], admin_headers: dict[str, str]) -> None:
        self.client = client
        self.member_headers = member_headers
        self.admin_headers = admin_headers

    async def share(self, member: str, key: str, value: Any, consent: tuple[str, ...] | list[str] = ()):
        body = {"value": value, "consent": list(consent)}
        return await self.client.put(f"/v1/members/{member}/preferences/{key}", json=body, headers=self.member_headers)

    async def shared(
        self, member: str, key: str, value: Any, consent: tuple[str, ...] | list[str] = ()
    ) -> dict[str, Any]:
        response = await self.share(member, key, value, consent)
        assert response.status_code == 200, response.text
        return response.json()

    async def preferences(self, member: str, purpose: str | None = None):
        params = {"purpose": purpose} if purpose else {}
        return await self.client.get(f"/v1/members/{member}/preferences", params=params, headers=self.member_headers)

    async def keys_for(self, member: str, purpose: str | None = None) -> list[str]:
        response = await self.preferences(member, purpose)
        assert response.status_code == 200, response.text
        return [item["key"] for item in response.json()["items"]]

    async def withdraw(self, member: str, key: str):
        return await self.client.delete(f"/v1/members/{member}/preferences/{key}", headers=self.member_headers)

    async def consents(self, member: str):
        return await self.client.get(f"/v1/members/{member}/consents", headers=self.member_headers)

    async def set_consents(self, member: str, **purposes: bool) -> dict[str, Any]:
        response = await self.client.put(
            f"/v1/members/{member}/consents", json={"purposes": purposes}, headers=self.member_headers
        )
        assert response.status_code == 200, response.text
        return response.json()

    async def balance(self, member: str) -> dict[str, Any]:
        response = await self.client.get(f"/v1/members/{member}/balance", headers=self.admin_headers)
        assert response.status_code == 200, response.text
        return response.json()

    async def activity(self, member: str) -> list[dict[str, Any]]:
        response = await self.client.get(f"/v1/members/{member}/activity", headers=self.admin_headers)
        assert response.status_code == 200, response.text
        return response.json()["items"]

    async def export(self, member: str):
        return await self.client.get(f"/v1/members/{member}/export", headers=self.member_headers)

    async def erase(self, member: str):
        return await self.client.delete(f"/v1/members/{member}", headers=self.admin_headers)

    async def admin_post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = await self.client.post(path, json=body, headers=self.admin_headers)
        assert response.status_code == 201, response.text
        return response.json()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def api(client, make_key, admin_headers) -> Api:
    member_key = await make_key("members:read", "members:write", name="member-portal")
    return Api(client, bearer(member_key), admin_headers)


async def _insert_key(database_url: str, name: str, scopes: list[str]) -> str:
    conn = await asyncpg.connect(database_url)
    try:
        return (await auth.insert_key(conn, name, scopes))[0]
    finally:
        await conn.close()


async def _own_api(database_url: str, redis_url: str, program_text: str) -> AsyncIterator[Api]:
    """An app of its own (its program, its database) and an Api on it."""
    settings = make_settings(database_url, redis_url)
    member_key = await _insert_key(database_url, "member-portal", ["members:read", "members:write"])
    admin_key = await _insert_key(database_url, "operator", ["admin"])
    async with AsyncTestClient(create_app(settings, parse_program(program_text))) as client:
        yield Api(client, bearer(member_key), bearer(admin_key))


async def _audit(database_url: str) -> list[Any]:
    conn = await asyncpg.connect(database_url)
    try:
        return await run_audit(conn, composition.AUDIT_CHECKS)
    finally:
        await conn.close()


async def _preference_transfers(database_url: str, member: str) -> list[tuple[str, int, str]]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            """
            select t.code, t.amount, t.reason from transfers t join members m using (member_uid)
            where m.member_id = $1 and t.cause_type = 'preference' order by t.transfer_id
            """,
            member,
        )
        return [(r["code"], r["amount"], r["reason"]) for r in rows]
    finally:
        await conn.close()


# --- the catalog ---------------------------------------------------------------------------


async def test_the_catalog_shows_what_can_be_shared_for_how_many_points(api):
    response = await api.client.get("/v1/preferences", headers=api.member_headers)

    assert response.status_code == 200
    catalog = response.json()
    assert catalog["purposes"] == list(ALL)
    by_key = {item["key"]: item for item in catalog["items"]}
    assert set(by_key) == {"favourite_categories", "clothing_size", "birthday", "newsletter", "delivery_notes"}
    assert by_key["clothing_size"] == {
        "key": "clothing_size",
        "label": "Clothing size",
        "type": "choice",
        "purposes": ["personalisation", "support"],
        "choices": ["S", "M", "L"],
        "max_length": None,
        "points": 20,
    }
    assert by_key["delivery_notes"]["max_length"] == 40


# --- points for the first share, once ------------------------------------------------------


async def test_the_first_share_earns_the_catalog_points_once_across_update_delete_and_reshare(
    api, database_url, new_id
):
    member = new_id("m")

    first = await api.shared(member, "favourite_categories", ["books"], ["marketing"])
    changed = await api.shared(member, "favourite_categories", ["music", "books"], ["marketing", "personalisation"])
    deleted = await api.withdraw(member, "favourite_categories")
    reshared = await api.shared(member, "favourite_categories", ["outdoor"], [])

    assert (first["points_awarded"], first["first_shared"]) == (50, True)
    assert (changed["points_awarded"], changed["first_shared"]) == (0, False)
    # Stored as a set in the catalog's order; consent likewise.
    assert (changed["value"], changed["consent"]) == (["books", "music"], ["personalisation", "marketing"])
    assert deleted.status_code == 200
    assert deleted.json() == {"key": "favourite_categories", "deleted": True, "points_clawed_back": 0, "shortfall": 0}
    assert (reshared["points_awarded"], reshared["first_shared"]) == (0, False)
    balance = await api.balance(member)
    assert (balance["available"], balance["lifetime_earned"]) == (50, 50)
    assert await _preference_transfers(database_url, member) == [
        ("earn", 50, "preference_shared: favourite_categories")
    ]
    earned = (await api.activity(member))[0]
    assert (earned["code"], earned["delta"], earned["cause"]) == (
        "earn",
        50,
        {"type": "preference", "ref": "favourite_categories"},
    )


async def test_each_key_pays_once_and_a_zero_point_key_pays_nothing(api, new_id):
    member = new_id("m")

    paid = [
        (await api.shared(member, key, value))["points_awarded"]
        for key, value in (
            ("clothing_size", "M"),
            ("birthday", "02-29"),
            ("newsletter", True),
            ("delivery_notes", "back door"),
        )
    ]

    assert paid == [20, 30, 0, 10]
    assert (await api.balance(member))["available"] == 60
    newsletter_again = await api.shared(member, "newsletter", False, ["marketing"])
    assert (newsletter_again["points_awarded"], newsletter_again["first_shared"]) == (0, False)


async def test_the_same_put_again_changes_nothing(api, new_id):
    member = new_id("m")
    first = await api.shared(member, "clothing_size", "L", ["support"])

    again = await api.shared(member, "clothing_size", "L", ["support"])

    assert again["updated_at"] == first["updated_at"]
    assert (again["points_awarded"], again["first_shared"]) == (0, False)
    log = (await api.export(member)).json()["privacy_log"]
    assert [entry["kind"] for entry in log] == ["preference_set", "exported"]


async def test_concurrent_first_shares_award_once(api, database_url, new_id):
    member = new_id("m")  # a new member, created by whichever request comes first

    responses = await asyncio.gather(
        *(api.share(member, "birthday", f"01-{day:02d}", ["marketing"]) for day in range(1, 21)),
        *(api.share(member, "clothing_size", size, ["support"]) for size in ("S", "M", "L") * 4),
    )

    assert {r.status_code for r in responses} == {200}
    results = [r.json() for r in responses]
    for key, points in (("birthday", 30), ("clothing_size", 20)):
        shares = [r for r in results if r["key"] == key]
        assert sum(r["first_shared"] for r in shares) == 1
        assert sum(r["points_awarded"] for r in shares) == points
    assert (await api.balance(member))["available"] == 50
    assert sorted(await _preference_transfers(database_url, member)) == [
        ("earn", 20, "preference_shared: clothing_size"),
        ("earn", 30, "preference_shared: birthday"),
    ]


# --- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("clothing_size", "XL", "one of S, M, L"),
        ("clothing_size", 3, "one of S, M, L"),
        ("favourite_categories", ["books", "cars"], "a list of one or more of books, music, outdoor, kitchen"),
        ("favourite_categories", [], "a list of one or more of books, music, outdoor, kitchen"),
        ("birthday", "1990-02-01", 'a month and day as "MM-DD", e.g. "03-14"'),
        ("birthday", "02-30", 'a month and day as "MM-DD", e.g. "03-14"'),
        ("newsletter", "yes", "true or false"),
        ("newsletter", None, "true or false"),
        ("delivery_notes", "x" * 41, "text of 1 to 40 characters"),
        ("delivery_notes", "", "text of 1 to 40 characters"),
    ],
)
async def test_an_invalid_value_is_422_naming_the_key_and_what_it_allows(api, new_id, key, value, allowed):
    member = new_id("m")

    response = await api.share(member, key, value, [])

    assert (response.status_code, response.json()["code"]) == (422, "invalid_preference_value")
    problem = response.json()
    assert problem["detail"] == f"{key}: must be {allowed}"
    assert problem["errors"] == [{"field": "value", "message": problem["detail"]}]
    # Nothing was written, not even the member.
    assert (await api.preferences(member)).status_code == 404


async def test_consent_beyond_the_preferences_purposes_is_422_naming_them(api, new_id):
    response = await api.share(new_id("m"), "clothing_size", "M", ["support", "marketing"])

    assert (response.status_code, response.json()["code"]) == (422, "purpose_not_allowed")
    assert response.json()["detail"] == "clothing_size may be used for personalisation, support only, not marketing"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"value": "M"}, 422, "validation_failed"),
        ({"consent": []}, 422, "validation_failed"),
        ({"value": "M", "consent": [], "ip": "1.2.3.4"}, 422, "validation_failed"),
        ({"value": "M", "consent": "support"}, 422, "validation_failed"),
    ],
)
async def test_malformed_bodies_are_refused(api, new_id, body, status, code):
    response = await api.client.put(
        f"/v1/members/{new_id('m')}/preferences/clothing_size", json=body, headers=api.member_headers
    )
    assert (response.status_code, response.json()["code"]) == (status, code)


async def test_unknown_keys_purposes_and_members(api, new_id):
    member = new_id("m")
    await api.shared(member, "clothing_size", "M", ["support"])

    unknown_key = await api.share(member, "shoe_size", "42", [])
    unknown_delete = await api.withdraw(member, "shoe_size")
    unknown_purpose = await api.preferences(member, "tracking")
    unknown_member = await api.preferences(new_id("ghost"))
    unknown_member_consents = await api.consents(new_id("ghost"))
    unknown_member_delete = await api.withdraw(new_id("ghost"), "clothing_size")

    assert (unknown_key.status_code, unknown_key.json()["code"]) == (404, "unknown_preference")
    assert "clothing_size" in unknown_key.json()["detail"]
    assert (unknown_delete.status_code, unknown_delete.json()["code"]) == (404, "unknown_preference")
    assert (unknown_purpose.status_code, unknown_purpose.json()["code"]) == (422, "unknown_purpose")
    assert "personalisation, marketing, support" in unknown_purpose.json()["detail"]
    for response in (unknown_member, unknown_member_consents, unknown_member_delete):
        assert (response.status_code, response.json()["code"]) == (404, "member_not_found")


async def test_deleting_a_preference_that_is_not_shared_changes_nothing(api, new_id):
    member = new_id("m")
    await api.shared(member, "clothing_size", "M")

    response = await api.withdraw(member, "birthday")

    assert response.status_code == 200
    assert response.json() == {"key": "birthday", "deleted": False, "points_clawed_back": 0, "shortfall": 0}


async def test_scopes(api, make_key, new_id):
    reader = bearer(await make_key("members:read", name="marketing-system"))
    writer = bearer(await make_key("members:write", name="member-app"))
    member = new_id("m")

    write_with_read = await api.client.put(
        f"/v1/members/{member}/preferences/newsletter", json={"value": True, "consent": []}, headers=reader
    )
    erase_with_write = await api.client.delete(f"/v1/members/{member}", headers=writer)

    assert (write_with_read.status_code, write_with_read.json()["code"]) == (403, "forbidden")
    assert (erase_with_write.status_code, erase_with_write.json()["code"]) == (403, "forbidden")


# --- purposes and consent ------------------------------------------------------------------


async def test_reading_for_a_purpose_returns_only_what_the_member_consented_to_and_granted(api, new_id):
    member = new_id("m")
    await api.shared(member, "favourite_categories", ["books"], ["personalisation", "marketing"])
    await api.shared(member, "clothing_size", "M", ["support"])
    await api.shared(member, "birthday", "07-04", ["personalisation"])
    await api.shared(member, "newsletter", True, ["marketing"])
    await api.shared(member, "delivery_notes", "ring twice", [])  # shared for no purpose at all

    # Nothing is granted yet: no purpose reads anything.
    assert [await api.keys_for(member, purpose) for purpose in ALL] == [[], [], []]
    await api.set_consents(member, marketing=True, support=True)

    assert await api.keys_for(member, "marketing") == ["favourite_categories", "newsletter"]
    assert await api.keys_for(member, "support") == ["clothing_size"]
    assert await api.keys_for(member, "personalisation") == []
    # The member's own view: everything, purpose or not.
    assert await api.keys_for(member) == [
        "birthday",
        "clothing_size",
        "delivery_notes",
        "favourite_categories",
        "newsletter",
    ]
    marketing = (await api.preferences(member, "marketing")).json()
    assert marketing["purpose"] == "marketing"
    assert marketing["items"][0] | {"updated_at": None} == {
        "key": "favourite_categories",
        "label": "Favourite categories",
        "type": "multi_choice",
        "value": ["books"],
        "consent": ["personalisation", "marketing"],
        "updated_at": None,
    }


async def test_withdrawing_consent_hides_the_preferences_at_once(api, new_id):
    member = new_id("m")
    await api.shared(member, "newsletter", True, ["marketing"])
    await api.shared(member, "birthday", "12-24", ["personalisation", "marketing"])
    await api.set_consents(member, marketing=True, personalisation=True)
    assert await api.keys_for(member, "marketing") == ["birthday", "newsletter"]

    await api.set_consents(member, marketing=False)

    assert await api.keys_for(member, "marketing") == []
    assert await api.keys_for(member, "personalisation") == ["birthday"]
    # Withdrawing consent for one preference hides just that one.
    await api.set_consents(member, marketing=True)
    await api.shared(member, "birthday", "12-24", ["personalisation"])
    assert await api.keys_for(member, "marketing") == ["newsletter"]


async def test_consents_per_purpose_record_when_and_through_which_client(api, make_key, new_id):
    member = new_id("m")
    await api.shared(member, "newsletter", True, ["marketing"])
    before = await api.consents(member)
    other_client = bearer(await make_key("members:write", name="pos-terminal"))

    granted = await api.set_consents(member, marketing=True, support=True)
    withdrawn = await api.client.put(
        f"/v1/members/{member}/consents", json={"purposes": {"support": False, "marketing": True}}, headers=other_client
    )

    assert before.status_code == 200
    assert before.json() == {
        "member_id": member,
        "purposes": {p: {"granted": False, "changed_at": None, "changed_by": None} for p in ALL},
    }
    assert granted["purposes"]["marketing"]["granted"] is True
    assert granted["purposes"]["marketing"]["changed_by"] == "member-portal"
    state = withdrawn.json()["purposes"]
    # marketing was restated, not changed: its time and client are the first change's.
    assert state["marketing"] == granted["purposes"]["marketing"]
    assert (state["support"]["granted"], state["support"]["changed_by"]) == (False, "pos-terminal")
    assert state["support"]["changed_at"] >= granted["purposes"]["support"]["changed_at"]
    assert state["personalisation"] == {"granted": False, "changed_at": None, "changed_by": None}
    assert (await api.consents(member)).json() == withdrawn.json()
    log = [
        (e["kind"], e["subject"], e["old_value"], e["new_value"], e["client"])
        for e in (await api.export(member)).json()["privacy_log"]
    ]
    assert log[1:4] == [
        ("consent_changed", "marketing", None, True, "member-portal"),
        ("consent_changed", "support", None, True, "member-portal"),
        ("consent_changed", "support", True, False, "pos-terminal"),
    ]


async def test_consents_for_unknown_purposes_are_refused_and_change_nothing(api, new_id):
    member = new_id("m")
    await api.shared(member, "newsletter", True, ["marketing"])

    response = await api.client.put(
        f"/v1/members/{member}/consents",
        json={"purposes": {"marketing": True, "tracking": True}},
        headers=api.member_headers,
    )
    empty = await api.client.put(f"/v1/members/{member}/consents", json={"purposes": {}}, headers=api.member_headers)

    assert (response.status_code, response.json()["code"]) == (422, "unknown_purpose")
    assert response.json()["errors"] == [{"field": "purposes.tracking", "message": "unknown purpose"}]
    assert (empty.status_code, empty.json()["code"]) == (422, "validation_failed")
    assert (await api.consents(member)).json()["purposes"]["marketing"]["granted"] is False


async def test_a_key_the_catalog_no_longer_has_is_read_by_no_purpose_but_the_member_can_delete_it(
    api, database_url, redis_url, new_id
):
    member = new_id("m")
    await api.shared(member, "delivery_notes", "side door", ["support"])
    await api.set_consents(member, support=True)
    without_notes = TEST_PROGRAM[: TEST_PROGRAM.index('[[preferences.catalog]]\nkey = "delivery_notes"')]

    async for other in _own_api(database_url, redis_url, without_notes):
        own_view = (await other.preferences(member)).json()["items"]
        assert [(i["key"], i["label"], i["type"], i["value"]) for i in own_view] == [
            ("delivery_notes", None, None, "side door")
        ]
        assert await other.keys_for(member, "support") == []
        assert (await other.share(member, "delivery_notes", "x", [])).json()["code"] == "unknown_preference"
        deleted = await other.withdraw(member, "delivery_notes")
        assert deleted.json()["deleted"] is True
        assert await other.keys_for(member) == []


# --- the privacy log -----------------------------------------------------------------------


async def test_every_preference_change_is_logged_with_its_values_and_client(api, new_id):
    member = new_id("m")
    await api.shared(member, "clothing_size", "S", ["support"])
    await api.shared(member, "clothing_size", "M", ["support", "personalisation"])
    await api.withdraw(member, "clothing_size")
    await api.withdraw(member, "clothing_size")  # not shared any more: nothing to log

    log = (await api.export(member)).json()["privacy_log"]

    assert [(e["kind"], e["subject"], e["old_value"], e["new_value"], e["points"], e["client"]) for e in log] == [
        ("preference_set", "clothing_size", None, {"value": "S", "consent": ["support"]}, 20, "member-portal"),
        (
            "preference_set",
            "clothing_size",
            {"value": "S", "consent": ["support"]},
            {"value": "M", "consent": ["personalisation", "support"]},
            0,
            "member-portal",
        ),
        (
            "preference_deleted",
            "clothing_size",
            {"value": "M", "consent": ["personalisation", "support"]},
            None,
            0,
            "member-portal",
        ),
        ("exported", None, None, None, 0, "member-portal"),
    ]
    assert log == sorted(log, key=lambda e: e["log_id"])


async def test_the_privacy_log_cannot_be_edited_or_deleted(api, database_url, new_id):
    member = new_id("m")
    await api.shared(member, "clothing_size", "S", ["support"])
    conn = await asyncpg.connect(database_url)
    try:
        uid = await conn.fetchval("select member_uid from members where member_id = $1", member)
        for statement in (
            "update privacy_log set client = 'someone else' where member_uid = $1",
            "update privacy_log set new_value = null where member_uid = $1",
            "delete from privacy_log where member_uid = $1",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                await conn.execute(statement, uid)
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            async with conn.transaction():
                await conn.execute("truncate privacy_log")
        # The erasure transaction may blank values, and nothing else.
        transaction = conn.transaction()
        await transaction.start()
        try:
            await conn.execute("set local konvert.erasure = 'on'")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                async with conn.transaction():  # a savepoint
                    await conn.execute(
                        "update privacy_log set old_value = null, new_value = null, client = 'x' where member_uid = $1",
                        uid,
                    )
            blanked = await conn.execute(
                "update privacy_log set old_value = null, new_value = null where member_uid = $1", uid
            )
            assert blanked == "UPDATE 1"
        finally:
            await transaction.rollback()
        assert (
            await conn.fetchval("select count(*) from privacy_log where member_uid = $1 and new_value is not null", uid)
            == 1
        )
    finally:
        await conn.close()


# --- clawback on withdrawal ----------------------------------------------------------------


CLAWBACK_PROGRAM = TEST_PROGRAM.replace("[preferences]\n", "[preferences]\nclaw_back_on_withdrawal = true\n")
CLAWBACK_NO_NEGATIVE_PROGRAM = CLAWBACK_PROGRAM.replace(
    "allow_negative_balance = true", "allow_negative_balance = false"
)


async def test_clawback_on_withdrawal_takes_the_points_back_and_a_reshare_pays_them_again(
    fresh_database_url, redis_url
):
    async for api in _own_api(fresh_database_url, redis_url, CLAWBACK_PROGRAM):
        await api.shared("ann", "favourite_categories", ["books"], ["marketing"])
        await api.shared("ann", "clothing_size", "M")
        deleted = await api.withdraw("ann", "favourite_categories")
        assert deleted.json() == {
            "key": "favourite_categories",
            "deleted": True,
            "points_clawed_back": 50,
            "shortfall": 0,
        }
        assert (await api.balance("ann"))["available"] == 20
        assert (await api.balance("ann"))["lifetime_earned"] == 20

        reshared = await api.shared("ann", "favourite_categories", ["music"])
        assert (reshared["points_awarded"], reshared["first_shared"]) == (50, False)
        changed = await api.shared("ann", "favourite_categories", ["outdoor"])
        assert changed["points_awarded"] == 0
        assert (await api.balance("ann"))["available"] == 70
        assert [(t["code"], t["delta"]) for t in await api.activity("ann")] == [
            ("earn", 50),
            ("clawback", -50),
            ("earn", 20),
            ("earn", 50),
        ]

        # Spent points: the clawback takes the balance below zero (the program allows it), and
        # the next points repay the debt.
        await api.shared("bob", "birthday", "05-05")
        await api.admin_post("/v1/members/bob/redemptions", {"redemption_id": "bob-r1", "points": 25})
        clawed = (await api.withdraw("bob", "birthday")).json()
        assert (clawed["points_clawed_back"], clawed["shortfall"]) == (30, 0)
        assert (await api.balance("bob"))["available"] == -25
        await api.shared("bob", "clothing_size", "S")
        assert (await api.balance("bob"))["available"] == -5

    async for api in _own_api(fresh_database_url, redis_url, CLAWBACK_NO_NEGATIVE_PROGRAM):
        await api.shared("cem", "birthday", "05-05")
        await api.admin_post("/v1/members/cem/redemptions", {"redemption_id": "cem-r1", "points": 25})
        clawed = (await api.withdraw("cem", "birthday")).json()
        # Only what is there is taken; the rest is recorded as shortfall, and a re-share pays
        # back only what was taken: the member never holds more than one award per key.
        assert (clawed["points_clawed_back"], clawed["shortfall"]) == (5, 25)
        assert (await api.balance("cem"))["available"] == 0
        assert (await api.shared("cem", "birthday", "05-06"))["points_awarded"] == 5
        assert (await api.balance("cem"))["available"] == 5

    assert await _audit(fresh_database_url) == []


PREFERENCE_CORRUPTIONS = {
    "4 preference points equal their transfers": (
        "update preference_awards set points_awarded = points_awarded - 1, points = points - 1 where key = 'birthday'"
    ),
    "4 every shared preference had its first share recorded": (
        "insert into preferences (member_uid, key, value, consent)"
        " select member_uid, 'shoe_size', '\"42\"', '{}' from members where member_id = 'dan'"
    ),
    "privacy erased members hold no personal data": (
        "insert into consents (member_uid, purpose, granted, changed_by)"
        " select member_uid, 'marketing', true, 'x' from members where erased_at is not null"
    ),
}


@pytest.mark.parametrize("invariant", sorted(PREFERENCE_CORRUPTIONS))
async def test_audit_names_a_broken_preference_invariant(fresh_database_url, redis_url, invariant):
    async for api in _own_api(fresh_database_url, redis_url, TEST_PROGRAM):
        await api.shared("dan", "birthday", "03-03")
        await api.shared("eve", "birthday", "04-04")
        assert (await api.erase("eve")).status_code == 204
    assert await _audit(fresh_database_url) == []
    conn = await asyncpg.connect(fresh_database_url)
    try:
        await conn.execute(PREFERENCE_CORRUPTIONS[invariant])
    finally:
        await conn.close()

    assert invariant in {v.invariant for v in await _audit(fresh_database_url)}


# --- export --------------------------------------------------------------------------------


class Member:
    """What build_member created, and the personal values to look for afterwards."""

    def __init__(self, member_id: str, tag: str, birthday: str, categories: list[str]) -> None:
        self.member_id = member_id
        self.birthday = birthday
        self.categories = categories
        self.friend = f"friend-{tag}"
        self.delivery_notes = f"notes-{tag}"
        self.redemption_note = f"redemption-note-{tag}"
        self.adjustment_note = f"adjustment-note-{tag}"
        self.refund_reason = f"refund-reason-{tag}"

    def personal_values(self) -> list[str]:
        # Values distinctive enough to search every column for (a size "M" or a boolean is not).
        return [
            self.member_id,
            self.delivery_notes,
            self.birthday,
            *self.categories,
            self.redemption_note,
            self.adjustment_note,
            self.refund_reason,
        ]


def month_day_unlike_any_date_stored(*candidates: str) -> str:
    """A birthday that no timestamp written today can contain (created, occurred, vests and
    expires dates are within a few weeks of today, or a year on), so that a scan for it finds
    only the birthday."""
    today = datetime.now(UTC)
    near = {(today + timedelta(days=d)).strftime("%m-%d") for d in (*range(-35, 25), *range(355, 375))}
    return next(candidate for candidate in candidates if candidate not in near)


async def build_member(
    api: Api, member_id: str, birthday: str = "02-29", categories: tuple[str, str] = ("kitchen", "outdoor")
) -> Member:
    """A member with every kind of data konvert holds."""
    tag = uuid.uuid4().hex[:8]
    m = Member(member_id, tag, birthday, list(categories))
    settled = f"{tag}-p1"
    await api.admin_post("/v1/purchases", purchase(member_id, settled, line("a", 2, 5000, "toys")))
    await api.admin_post(
        "/v1/purchases", purchase(member_id, f"{tag}-p2", line("a", 1, 3000, "toys"), occurred_at=RECENT)
    )
    await api.admin_post(
        f"/v1/purchases/{settled}/refunds", {"refund_id": f"{tag}-rf1", "amount": 1000, "reason": m.refund_reason}
    )
    await api.admin_post(
        f"/v1/members/{member_id}/redemptions", {"redemption_id": f"{tag}-rd1", "points": 10, "note": m.redemption_note}
    )
    await api.admin_post(
        f"/v1/members/{member_id}/adjustments",
        {"adjustment_id": f"{tag}-adj1", "points": 5, "reason_code": "goodwill", "note": m.adjustment_note},
    )
    await api.shared(member_id, "favourite_categories", list(categories), ["personalisation", "marketing"])
    await api.shared(member_id, "clothing_size", "L", ["support"])
    await api.withdraw(member_id, "clothing_size")
    await api.shared(member_id, "clothing_size", "M", ["support"])
    await api.shared(member_id, "birthday", birthday, ["marketing"])
    await api.shared(member_id, "newsletter", True, ["marketing"])
    await api.shared(member_id, "delivery_notes", m.delivery_notes, ["support"])
    await api.set_consents(member_id, marketing=True, support=True, personalisation=True)
    await api.set_consents(member_id, personalisation=False)
    now = datetime.now(UTC).isoformat()
    kudos = {"source": "forum", "thread_id": f"{tag}-t1", "kind": "like", "occurred_at": now}
    await api.admin_post(
        "/v1/kudos",
        kudos | {"kudos_id": f"{tag}-k1", "post_id": f"{tag}-post1", "author_id": member_id, "giver_id": m.friend},
    )
    await api.admin_post(
        "/v1/kudos",
        kudos | {"kudos_id": f"{tag}-k2", "post_id": f"{tag}-post2", "author_id": m.friend, "giver_id": member_id},
    )
    return m


async def test_export_holds_everything_konvert_holds_on_the_member(api, new_id):
    m = await build_member(api, new_id("m"))

    response = await api.export(m.member_id)

    assert response.status_code == 200, response.text
    export = response.json()
    assert export["format"] == "konvert.member-export/1"
    assert export["truncated"] == []
    member = export["member"]
    assert member["member_id"] == m.member_id
    balance = await api.balance(m.member_id)
    assert member["balances"] == {
        "available": balance["available"],
        "pending": balance["pending"],
        "held": balance["held"],
        "debt": 0,
        "lifetime_earned": balance["lifetime_earned"],
        "reputation": balance["reputation"],
    }
    assert balance["reputation"] > 0
    preferences = {p["key"]: (p["value"], p["consent"]) for p in export["preferences"]}
    assert preferences == {
        "favourite_categories": (["outdoor", "kitchen"], ["personalisation", "marketing"]),
        "clothing_size": ("M", ["support"]),
        "birthday": ("02-29", ["marketing"]),
        "newsletter": (True, ["marketing"]),
        "delivery_notes": (m.delivery_notes, ["support"]),
    }
    awards = {a["key"]: (a["points"], a["points_awarded"]) for a in export["preference_awards"]}
    assert awards == {
        "favourite_categories": (50, 50),
        "clothing_size": (20, 20),
        "birthday": (30, 30),
        "newsletter": (0, 0),
        "delivery_notes": (10, 10),
    }
    consents = export["consents"]
    assert {p: c["granted"] for p, c in consents.items()} == {
        "personalisation": False,
        "marketing": True,
        "support": True,
    }
    assert consents["marketing"]["changed_by"] == "member-portal"
    kinds = [e["kind"] for e in export["privacy_log"]]
    assert kinds.count("preference_set") == 6 and kinds.count("preference_deleted") == 1
    assert kinds.count("consent_changed") == 4 and kinds[-1] == "exported"
    assert {"value": "L", "consent": ["support"]} in [e["old_value"] for e in export["privacy_log"]]
    codes = [t["code"] for t in export["transfers"]]
    assert {"earn", "refund", "redeem", "adjust"} <= set(codes)
    assert any(t["asset"] == "reputation" for t in export["transfers"])
    assert [t["transfer_id"] for t in export["transfers"]] == sorted(t["transfer_id"] for t in export["transfers"])
    assert len(export["transfers"]) == len(await api.activity(m.member_id))
    assert {lot["state"] for lot in export["lots"]} == {"available", "pending"}
    assert [(p["points"], len(p["refunds"])) for p in export["purchases"]] == [(100, 1), (30, 0)]
    assert export["purchases"][0]["refunds"][0]["amount"] == 1000
    assert [(r["points"], r["note"]) for r in export["redemptions"]] == [(10, m.redemption_note)]
    assert [(a["points"], a["note"], a["made_by"]) for a in export["adjustments"]] == [(5, m.adjustment_note, "test")]
    assert [(k["kind"], k["kudos_id"][-3:]) for k in export["kudos_received"]] == [("like", "-k1")]
    assert [(k["kind"], k["kudos_id"][-3:]) for k in export["kudos_given"]] == [("like", "-k2")]
    assert not {"request_hash", "response", "giver_uid"} & set(export["kudos_received"][0])


async def test_export_of_an_unknown_member_is_404(api, new_id):
    response = await api.export(new_id("ghost"))
    assert (response.status_code, response.json()["code"]) == (404, "member_not_found")


# --- erasure -------------------------------------------------------------------------------


async def _columns_containing(conn: asyncpg.Connection, needle: str) -> list[str]:
    """Every column of every table of the schema whose text holds ``needle``."""
    columns = await conn.fetch(
        """
        select c.table_name, c.column_name, c.data_type
        from information_schema.columns c
        join information_schema.tables t on t.table_schema = c.table_schema and t.table_name = c.table_name
        where c.table_schema = 'public' and t.table_type = 'BASE TABLE'
          and c.data_type in ('text', 'character varying', 'character', 'json', 'jsonb', 'ARRAY', 'bytea')
        order by 1, 2
        """
    )
    assert len(columns) > 20, "the scan would prove nothing"
    found = []
    for table, column, data_type in columns:
        name = f'"{table}"."{column}"'
        condition = (
            f"position(convert_to($1, 'UTF8') in {name}) > 0"
            if data_type == "bytea"
            else f"strpos({name}::text, $1) > 0"
        )
        if await conn.fetchval(f'select exists (select 1 from "{table}" where {condition})', needle):
            found.append(f"{table}.{column}")
    return found


async def test_erasure_removes_personal_data_from_every_table_and_the_books_still_balance(
    fresh_database_url, redis_url
):
    async for api in _own_api(fresh_database_url, redis_url, TEST_PROGRAM):
        m = await build_member(api, "erin-" + uuid.uuid4().hex[:8], month_day_unlike_any_date_stored("02-29", "08-31"))
        friend = await build_member(
            api, "frank-" + uuid.uuid4().hex[:8], month_day_unlike_any_date_stored("11-30", "05-31"), ("books", "music")
        )
        before = await api.balance(m.member_id)
        conn = await asyncpg.connect(fresh_database_url)
        try:
            assert "members.member_id" in await _columns_containing(conn, m.member_id)  # the scan finds what is there
            uid = await conn.fetchval("select member_uid from members where member_id = $1", m.member_id)
            assert "preferences.value" in await _columns_containing(conn, m.delivery_notes)
        finally:
            await conn.close()

        erased = await api.erase(m.member_id)
        again = await api.erase(m.member_id)

        assert (erased.status_code, again.status_code) == (204, 204)
        for response in (
            await api.client.get(f"/v1/members/{m.member_id}/balance", headers=api.admin_headers),
            await api.preferences(m.member_id),
            await api.consents(m.member_id),
            await api.export(m.member_id),
        ):
            assert (response.status_code, response.json()["code"]) == (404, "member_not_found")
        conn = await asyncpg.connect(fresh_database_url)
        try:
            for value in m.personal_values():
                assert await _columns_containing(conn, value) == [], value
            # The pseudonym keeps the amounts, nothing personal.
            pseudonym = await conn.fetchrow(
                "select member_id, erased_at, points_available, reputation from members where member_uid = $1", uid
            )
            assert pseudonym["member_id"].startswith("erased-") and pseudonym["erased_at"] is not None
            assert (pseudonym["points_available"], pseudonym["reputation"]) == (
                before["available"],
                before["reputation"],
            )
            assert await conn.fetchval("select count(*) from preferences where member_uid = $1", uid) == 0
            assert await conn.fetchval("select count(*) from consents where member_uid = $1", uid) == 0
            log = await conn.fetch(
                "select kind, old_value, new_value from privacy_log where member_uid = $1 order by log_id", uid
            )
            assert log[-1]["kind"] == "erased"
            assert all(r["old_value"] is None and r["new_value"] is None for r in log)
            assert await conn.fetchval("select count(*) from members where erased_at is not null") == 1
            # The friend's own data is untouched.
            assert await _columns_containing(conn, friend.delivery_notes) == [
                "preferences.value",
                "privacy_log.new_value",
            ]
        finally:
            await conn.close()
        assert (await api.export(friend.member_id)).json()["member"]["member_id"] == friend.member_id
        assert (await api.erase(pseudonym["member_id"])).status_code == 204

        # An old request cannot be replayed into the pseudonym; a new one starts a new member.
        replayed = await api.client.post(
            "/v1/purchases",
            json=purchase(m.member_id, f"{m.refund_reason[-8:]}-p1", line("a", 2, 5000, "toys")),
            headers=api.admin_headers,
        )
        assert (replayed.status_code, replayed.json()["code"]) == (409, "idempotency_conflict")
        await api.admin_post("/v1/purchases", purchase(m.member_id, "after-erasure", line("a", 1, 1000)))
        assert (await api.balance(m.member_id))["available"] == 10
        assert (await api.shared(m.member_id, "birthday", m.birthday))["first_shared"] is True

    assert await _audit(fresh_database_url) == []
    env = {k: v for k, v in os.environ.items() if not k.startswith("KONVERT_")}
    env |= {"KONVERT_DATABASE_URL": fresh_database_url, "KONVERT_REDIS_URL": redis_url}
    cli = subprocess.run(
        [sys.executable, "-m", "konvert", "audit"], env=env, capture_output=True, text=True, timeout=60
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "audit passed" in cli.stdout


async def test_erasure_is_idempotent_under_concurrency(api, database_url, new_id):
    member = new_id("m")
    await api.shared(member, "birthday", "02-29", ["marketing"])
    conn = await asyncpg.connect(database_url)
    try:
        uid = await conn.fetchval("select member_uid from members where member_id = $1", member)

        responses = await asyncio.gather(*(api.erase(member) for _ in range(5)))

        assert [r.status_code for r in responses] == [204] * 5
        assert (
            await conn.fetchval("select count(*) from privacy_log where member_uid = $1 and kind = 'erased'", uid) == 1
        )
    finally:
        await conn.close()
    assert (await api.erase(new_id("never-existed"))).status_code == 204


async def test_an_erased_pseudonym_cannot_be_written_to(api, database_url, new_id):
    member = new_id("m")
    await api.shared(member, "newsletter", True, ["marketing"])
    conn = await asyncpg.connect(database_url)
    try:
        uid = await conn.fetchval("select member_uid from members where member_id = $1", member)
        assert (await api.erase(member)).status_code == 204
        pseudonym = await conn.fetchval("select member_id from members where member_uid = $1", uid)
    finally:
        await conn.close()

    for response in (
        await api.share(pseudonym, "newsletter", True, ["marketing"]),
        await api.client.put(
            f"/v1/members/{pseudonym}/consents", json={"purposes": {"marketing": True}}, headers=api.member_headers
        ),
        await api.preferences(pseudonym),
        await api.export(pseudonym),
    ):
        assert (response.status_code, response.json()["code"]) == (404, "member_not_found")


@contextlib.contextmanager
def erasure_with(services: Services, *, step: Any = None, after: Any = None) -> Iterator[None]:
    """The app's erasure with one more step (in the transaction) and/or clean-up (after the
    commit), after konvert's own; restored after."""
    original = services.erasure
    services.erasure = Erasure(
        steps=(*composition.ERASURE.steps, *([step] if step else [])),
        after=(*composition.ERASURE.after, *([after] if after else [])),
    )
    try:
        yield
    finally:
        services.erasure = original


async def test_erasure_runs_the_registered_steps_and_clean_ups(api, new_id):
    member = new_id("m")
    await api.shared(member, "newsletter", True, ["marketing"])
    calls: list[tuple[str, str, str | None]] = []
    failures = [RuntimeError("redis down")]

    async def step(book: Book, locked: LockedMember, pseudonym: str) -> None:
        # Inside the transaction, with the member locked and not yet renamed.
        assert await book.conn.fetchval("select member_id from members where member_uid = $1", locked.uid) == member
        calls.append(("step", locked.id, pseudonym))

    async def clean_up(services: Any, old_member_id: str, pseudonym: str | None) -> None:
        calls.append(("after", old_member_id, pseudonym))
        if failures:
            raise failures.pop()

    with erasure_with(api.client.app.state.services, step=step, after=clean_up):
        failed = await api.erase(member)
        retried = await api.erase(member)

    # The first clean-up failed after the commit: 503, and the retry finishes the clean-up.
    assert (failed.status_code, failed.json()["code"]) == (503, "service_unavailable")
    assert retried.status_code == 204
    pseudonym = calls[0][2]
    assert pseudonym is not None and pseudonym.startswith("erased-")
    assert calls == [("step", member, pseudonym), ("after", member, pseudonym), ("after", member, None)]
    assert (await api.preferences(member)).status_code == 404


async def test_a_failing_erasure_step_erases_nothing(api, new_id):
    member = new_id("m")
    await api.shared(member, "newsletter", True, ["marketing"])

    async def step(book: Book, locked: LockedMember, pseudonym: str) -> None:
        await book.conn.execute("delete from preferences where member_uid = $1", locked.uid)
        raise RuntimeError("the feature could not erase its data")

    with erasure_with(api.client.app.state.services, step=step):
        response = await api.erase(member)

    assert response.status_code == 500
    assert await api.keys_for(member) == ["newsletter"]


# --- no connection data --------------------------------------------------------------------


async def test_the_schema_has_no_place_for_connection_data(database_url):
    conn = await asyncpg.connect(database_url)
    try:
        suspicious = await conn.fetch(
            """
            select table_name || '.' || column_name from information_schema.columns
            where table_schema = 'public' and (
                column_name ilike any (array['%ip\\_addr%', '%ip%address%', '%remote\\_addr%', '%client\\_ip%',
                                             '%user\\_agent%', '%useragent%', '%last\\_login%', '%login\\_at%',
                                             '%logged\\_in%', '%last\\_seen%', '%session%', '%fingerprint%'])
                or column_name in ('ip', 'ua')
                or udt_name in ('inet', 'cidr', 'macaddr', 'macaddr8'))
            """
        )
    finally:
        await conn.close()
    assert [r[0] for r in suspicious] == []


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_access_logs_name_the_route_not_the_member(settings, program, make_key, new_id):
    member = new_id("m")
    headers = bearer(await make_key("members:read", name="access-log"))
    access = logging.getLogger("konvert.access")
    handler, level = _Records(), access.level
    # The app decides at creation whether it logs access; the handler is attached to the logger
    # itself, since the app serves (and logs) from another event loop.
    access.setLevel(logging.INFO)
    access.addHandler(handler)
    try:
        lines: dict[bool, list[str]] = {}
        for log_member_ids in (False, True):
            handler.records.clear()
            async with AsyncTestClient(create_app(settings.replace(log_member_ids=log_member_ids), program)) as client:
                response = await client.get(f"/v1/members/{member}/preferences?purpose=marketing", headers=headers)
                assert response.status_code == 404
            lines[log_member_ids] = [
                logging.Formatter().format(r) + " " + repr(vars(r))
                for r in handler.records
                if r.name == "konvert.access"
            ]
    finally:
        access.removeHandler(handler)
        access.setLevel(level)

    assert len(lines[False]) == 1 and "/v1/members/{member_id}/preferences" in lines[False][0]
    assert member not in lines[False][0]
    # Configured to (KONVERT_LOG_MEMBER_IDS), the path with the id is logged: the check above can see it.
    assert member in lines[True][0]


async def test_a_repeated_erasure_keeps_the_old_balance_out_of_the_cache(
    api, services, database_url, redis_client, new_id
):
    """A reader (or `konvert cache warm`) that fetched the balance before the erasure and fills the
    cache only after a repeated DELETE must not put it back under the old id: the repeat used
    to delete the first erasure's tombstone."""
    member = new_id("m")
    await api.shared(member, "birthday", "02-29", ["marketing"])
    body = (await api.client.get(f"/v1/members/{member}/balance", headers=api.member_headers)).content
    conn = await asyncpg.connect(database_url)
    try:
        version = await conn.fetchval("select version from members where member_id = $1", member)
    finally:
        await conn.close()

    assert (await api.erase(member)).status_code == 204
    await redis_client.delete(services.cache.key(member))  # as if the first tombstone was lost
    assert (await api.erase(member)).status_code == 204  # nothing left to erase
    # The repeat leaves a tombstone above any version the member's row could reach.
    assert await cached_entry(redis_client, member, services.cache.key(member)) == (ABOVE_ANY_VERSION, None)
    assert await services.cache.put_many([(member, version, body)])  # the late fill (Redis took the call)

    assert await services.cache.get(member) is None
    response = await api.client.get(f"/v1/members/{member}/balance", headers=api.member_headers)
    assert response.status_code == 404


async def _waiting_on(conn: asyncpg.Connection, table: str) -> None:
    """Until some transaction waits for a lock on the table."""
    query = "select count(*) from pg_locks where relation = $1::regclass and not granted"
    async with asyncio.timeout(10):
        while not await conn.fetchval(query, table):  # noqa: ASYNC110 (PostgreSQL signals nothing)
            await asyncio.sleep(0.01)


async def test_an_open_export_does_not_hold_back_the_members_purchases(
    api, client, admin_headers, database_url, new_id
):
    member = new_id("m")
    first = await client.post("/v1/purchases", json=purchase_body(member), headers=admin_headers)
    assert first.status_code == 201, first.text
    locker = await asyncpg.connect(database_url)
    try:
        # The export reads adjustments last: locked away, they keep its transaction open.
        holding = locker.transaction()
        await holding.start()
        await locker.execute("lock table adjustments in access exclusive mode")
        export = asyncio.create_task(api.export(member))
        await _waiting_on(locker, "adjustments")

        async with asyncio.timeout(10):  # an export that locked the member would hold these back
            during = await asyncio.gather(
                *(client.post("/v1/purchases", json=purchase_body(member), headers=admin_headers) for _ in range(5))
            )
        assert [r.status_code for r in during] == [201] * 5
        await holding.rollback()
        exported = await export
    finally:
        await locker.close()

    assert exported.status_code == 200, exported.text
    # Its snapshot was taken before those purchases; its log entry was written after.
    assert len(exported.json()["purchases"]) == 1
    assert [e["kind"] for e in exported.json()["privacy_log"]] == ["exported"]
    assert (await api.balance(member))["lifetime_earned"] == 6 * first.json()["points"]


async def test_exports_beside_the_members_purchases_never_fail(api, client, admin_headers, new_id):
    member = new_id("m")
    assert (await client.post("/v1/purchases", json=purchase_body(member), headers=admin_headers)).status_code == 201

    answers = await asyncio.gather(
        *(client.post("/v1/purchases", json=purchase_body(member), headers=admin_headers) for _ in range(40)),
        *(api.export(member) for _ in range(20)),
    )

    assert sorted(r.status_code for r in answers) == [200] * 20 + [201] * 40, [
        r.text for r in answers if r.status_code >= 300
    ]
    log = (await api.export(member)).json()["privacy_log"]
    assert [e["kind"] for e in log] == ["exported"] * 21


async def test_a_key_bound_to_purposes_reads_only_what_they_may(api, client, database_url, new_id):
    member = new_id("m")
    await api.shared(member, "newsletter", True, ["marketing"])
    await api.shared(member, "clothing_size", "M", ["support"])
    await api.shared(member, "birthday", "05-17", ["personalisation", "marketing"])
    await api.set_consents(member, **dict.fromkeys(ALL, True))
    conn = await asyncpg.connect(database_url)
    try:
        key = (await auth.insert_key(conn, "mailer", ["members:read"], purposes=["marketing"]))[0]
    finally:
        await conn.close()
    mailer = bearer(key)
    path = f"/v1/members/{member}/preferences"

    unasked = await client.get(path, headers=mailer)
    asked = await client.get(path, params={"purpose": "marketing"}, headers=mailer)
    outside = await client.get(path, params={"purpose": "support"}, headers=mailer)
    export = await client.get(f"/v1/members/{member}/export", headers=mailer)
    everything = await client.get(path, headers=api.member_headers)

    assert unasked.status_code == 200, unasked.text
    assert sorted(i["key"] for i in unasked.json()["items"]) == ["birthday", "newsletter"]
    assert unasked.json()["purposes"] == ["marketing"]
    assert asked.json()["items"] == unasked.json()["items"]
    assert (outside.status_code, outside.json()["code"]) == (403, "purpose_forbidden")
    assert (export.status_code, export.json()["code"]) == (403, "purpose_forbidden")
    assert sorted(i["key"] for i in everything.json()["items"]) == ["birthday", "clothing_size", "newsletter"]
