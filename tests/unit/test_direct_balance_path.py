"""The direct balance path's member id pattern must accept no id that the route's MemberId refuses."""

from __future__ import annotations

import msgspec
import pytest

from konvert.ledger.api import _BALANCE_PATH
from konvert.ledger.model import MemberId

SAMPLES = [
    "m1",
    "a" * 128,
    "a" * 129,
    "é" * 128,  # characters, not bytes, in both
    "é" * 129,
    "with space",
    "tab\there",
    "new\nline",
    "trailing\n",
    "nul\x00",
    "del\x7f",
    "unit\x1fsep",
    "%2F",
    "ümlaut-✓",
]


def _member_id_ok(member_id: str) -> bool:
    try:
        msgspec.convert(member_id, MemberId)
    except msgspec.ValidationError:
        return False
    return True


@pytest.mark.parametrize("member_id", SAMPLES, ids=repr)
def test_the_direct_path_takes_on_exactly_the_ids_the_route_accepts(member_id: str) -> None:
    taken = _BALANCE_PATH.fullmatch(f"/v1/members/{member_id}/balance") is not None

    assert taken == _member_id_ok(member_id)


def test_an_id_with_a_slash_is_left_to_the_router() -> None:
    assert _BALANCE_PATH.fullmatch("/v1/members/a/b/balance") is None
